"""The Python face of the C++ WordPiece tokenizer (``fastbert._wordpiece``), with an API shaped like HF's.

It owns loading and saving (vocab.txt + tokenizer_config.json), the batch-level bookkeeping of ``__call__``
(special tokens, truncation, padding, tensors) and decoding. Text never goes through Python a word at a time:
normalization, splitting and WordPiece matching are the extension's, run on C++ threads without the GIL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastbert import _wordpiece
from fastbert.atomic import write_atomic

VocabError = _wordpiece.VocabError

SPECIAL_TOKEN_ROLES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
PADDING_STRATEGIES = ("longest", "max_length")
CONTINUATION = "##"


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer, producing the same ids as HF's ``BertTokenizerFast`` for the same vocabulary."""

    def __init__(
        self,
        vocab: _wordpiece.Vocab,
        do_lower_case: bool = True,
        *,
        model_max_length: int = 512,
        source: str = "<memory>",
        **special_tokens: str,
    ) -> None:
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_ROLES)
        if unknown:
            raise TypeError(f"unknown special token roles {sorted(unknown)}; expected some of {SPECIAL_TOKEN_ROLES}")
        self.special_tokens = {**DEFAULT_SPECIAL_TOKENS, **special_tokens}
        for role, token in self.special_tokens.items():
            if token not in vocab:
                raise VocabError(f"{source}: the vocabulary has no {role} {token!r}")
        self.vocab = vocab
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        specials = list(dict.fromkeys(self.special_tokens[r] for r in SPECIAL_TOKEN_ROLES))
        self._core = _wordpiece.Tokenizer(
            vocab,
            do_lower_case,
            specials,
            self.special_tokens["unk_token"],
            self.special_tokens["cls_token"],
            self.special_tokens["sep_token"],
        )
        self.all_special_ids = {vocab.token_to_id(t) for t in specials}
        self.pad_token_id: int = vocab.token_to_id(self.special_tokens["pad_token"])
        self.cls_token_id: int = vocab.token_to_id(self.special_tokens["cls_token"])
        self.sep_token_id: int = vocab.token_to_id(self.special_tokens["sep_token"])
        self.unk_token_id: int = vocab.token_to_id(self.special_tokens["unk_token"])
        self.mask_token_id: int = vocab.token_to_id(self.special_tokens["mask_token"])
        self._device_tries: dict[int, Any] = {}  # CUDA device index -> the trie uploaded there (encode on a GPU)

    # Loading and saving.

    @classmethod
    def from_vocab(cls, path: str | os.PathLike, do_lower_case: bool = True, **kwargs: Any) -> WordPieceTokenizer:
        """A tokenizer over a BERT vocab.txt; the file is validated (errors name the file and line)."""
        return cls(_wordpiece.Vocab.from_file(os.fspath(path)), do_lower_case, source=os.fspath(path), **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> WordPieceTokenizer:
        """Loads vocab.txt and, when present, tokenizer_config.json (casing, special tokens, model_max_length)."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from None
        do_lower_case = config.get("do_lower_case", True)
        strip_accents = config.get("strip_accents")
        if strip_accents is not None and strip_accents != do_lower_case:
            raise ValueError(
                f"{config_path}: strip_accents={strip_accents} with do_lower_case={do_lower_case} is "
                "not supported (accents are stripped exactly when lowercasing)"
            )
        if not config.get("tokenize_chinese_chars", True):
            raise ValueError(f"{config_path}: tokenize_chinese_chars=false is not supported")
        specials = {}
        for role in SPECIAL_TOKEN_ROLES:
            value = config.get(role)
            if isinstance(value, dict):  # an AddedToken serialized by older transformers
                value = value.get("content")
            if value is not None:
                specials[role] = value
        max_length = config.get("model_max_length", 512)
        if not isinstance(max_length, int) or max_length > 1 << 30:  # HF writes a huge float for "no limit"
            max_length = 1 << 30
        return cls.from_vocab(directory / "vocab.txt", do_lower_case, model_max_length=max_length, **specials)

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Writes vocab.txt and tokenizer_config.json (each to a temporary name, then renamed into place)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_path, config_path = directory / "vocab.txt", directory / "tokenizer_config.json"
        write_atomic(vocab_path, "".join(token + "\n" for token in self.vocab.tokens).encode("utf-8"))
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "model_max_length": self.model_max_length,
            **self.special_tokens,
        }
        write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        return [vocab_path, config_path]

    # Vocabulary.

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.vocab.tokens)}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of tokens; tokens outside the vocabulary map to the [UNK] id."""
        if isinstance(tokens, str):
            found = self.vocab.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Tokens of ids; an id outside the vocabulary raises IndexError naming it."""
        if isinstance(ids, int):
            return self.vocab.id_to_token(ids)
        return [self.vocab.id_to_token(int(i)) for i in ids]

    # Encoding.

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of text, special tokens included where the text spells them."""
        return [self.vocab.id_to_token(i) for i in self._core.encode(text)]

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Ids of text (and pair): ``[CLS] text [SEP] pair [SEP]`` with special tokens."""
        ids_b = None if pair is None else self._core.encode(pair)
        return self._assemble(self._core.encode(text), None, ids_b, None, add_special_tokens)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        add_special_tokens: bool = True,
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Ids of every text (and pair), encoded on num_threads C++ threads (default: all cores). Items may also be
        UTF-8 bytes; invalid UTF-8 raises ValueError naming the item and the byte offset."""
        return self._core.encode_batch(
            _as_list(texts, "texts"),
            None if pairs is None else _as_list(pairs, "pairs"),
            add_special_tokens,
            num_threads or 0,
        )

    def encode_batch_flat(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        num_threads: int | None = None,
        device: Any = None,
    ) -> tuple[Any, Any]:
        """Every text's ids back to back, ``(ids int32[N], offsets int64[len(texts) + 1])``: text ``i`` is
        ``ids[offsets[i]:offsets[i + 1]]``. No Python int per id, so it is the fastest way to feed arrays.

        By default NumPy arrays, encoded on C++ threads. With ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``...)
        torch tensors on that device; for a CUDA device the WordPiece matching runs there (experimental): text is
        normalized and split into words on the CPU, the words are matched by the GPU kernel (the same matcher code as
        the CPU path, so the same ids), and the tokenizer's trie is uploaded to each device once."""
        texts = _as_list(texts, "texts")
        if device is None:
            return self._core.encode_batch_flat(texts, add_special_tokens, num_threads or 0)
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            ids, offsets = self._core.encode_batch_flat(texts, add_special_tokens, num_threads or 0)
            return torch.from_numpy(ids).to(device), torch.from_numpy(offsets).to(device)
        ids, offsets = self._encode_on_gpu(texts, add_special_tokens, device)
        return torch.from_numpy(ids).to(device), torch.from_numpy(offsets).to(device)

    def _encode_on_gpu(self, texts: list, add_special_tokens: bool, device) -> tuple[np.ndarray, np.ndarray]:
        """``encode_batch_flat``'s arrays, with the words matched by the CUDA kernel on ``device``."""
        import torch

        if not _wordpiece.with_cuda:
            raise RuntimeError(
                "fastbert._wordpiece was built without its CUDA kernel (nvcc was not found at install time); "
                "reinstall with FASTBERT_CUDA=1 on a machine with the CUDA toolkit"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        trie = self._device_tries.get(index)
        if trie is None:
            with torch.cuda.device(index):
                trie = self._device_tries[index] = _wordpiece.DeviceTrie(self._core)
        words, ends, specials, words_per_text = self._core.split_words_batch(texts)
        matched, counts = trie.match(words, ends)
        # Word w yields counts[w] ids from matched[begin_w:], or its special id alone.
        is_special = specials >= 0
        counts = np.where(is_special, 1, counts).astype(np.int64)
        begins = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
        word_of = np.repeat(np.arange(counts.size), counts)
        first_of_word = np.cumsum(counts) - counts
        body = matched[begins[word_of] + np.arange(word_of.size) - first_of_word[word_of]]
        body = np.where(is_special[word_of], specials[word_of], body).astype(np.int32)
        text_of_word = np.repeat(np.arange(len(texts)), words_per_text)
        lengths = np.bincount(text_of_word, weights=counts, minlength=len(texts)).astype(np.int64)
        if not add_special_tokens:
            return body, np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths + 2)])
        ids = np.empty(offsets[-1], np.int32)
        ids[offsets[:-1]] = self.cls_token_id
        ids[offsets[1:] - 1] = self.sep_token_id
        text_of_id = text_of_word[word_of]
        ids[np.arange(body.size) + 2 * text_of_id + 1] = body
        return ids, offsets

    def __call__(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: bool | str = False,
        padding: bool | str = False,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_offsets_mapping: bool = False,
        num_threads: int | None = None,
    ) -> dict[str, Any]:
        """Model inputs for texts (and pairs): input_ids, token_type_ids, attention_mask and, when asked for,
        offset_mapping as character spans into the original strings ((0, 0) for added and padding tokens).

        truncation: False, True (= "longest_first"), "longest_first", "only_first" or "only_second", to max_length
        (default model_max_length). padding: False, True (= "longest"), "longest" or "max_length", optionally
        rounded up to pad_to_multiple_of. return_tensors: None (lists), "np" or "pt" (int64).
        """
        texts, pairs, single = _as_batch(texts, pairs)
        strategy = _truncation_strategy(truncation)
        pad = _padding_strategy(padding)
        max_length = self._resolved_max_length(strategy, pad, max_length, pad_to_multiple_of)
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', not {return_tensors!r}")
        batch = self._encode_truncated(
            texts, pairs, add_special_tokens, strategy, max_length, return_offsets_mapping, num_threads or 0
        )
        if pad:
            self._pad(batch, pad, max_length, pad_to_multiple_of)
        if return_tensors is not None:
            return _to_tensors(batch, return_tensors)
        if single:
            return {key: value[0] for key, value in batch.items()}
        return batch

    def _resolved_max_length(
        self, strategy: str | None, pad: str | None, max_length: int | None, pad_to_multiple_of: int | None
    ) -> int | None:
        """``max_length``, defaulting to ``model_max_length`` where truncation or padding to it needs one."""
        if strategy and max_length is None:
            max_length = self.model_max_length
        if pad == "max_length" and max_length is None:
            max_length = self.model_max_length
        if strategy and pad and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise ValueError(
                f"truncation to max_length={max_length} would be padded past it to a multiple of "
                f"pad_to_multiple_of={pad_to_multiple_of}; make max_length a multiple of it"
            )
        return max_length

    def _encode_truncated(
        self,
        texts: list[str],
        pairs: list[str] | None,
        add_special_tokens: bool,
        strategy: str | None,
        max_length: int | None,
        return_offsets_mapping: bool,
        threads: int,
    ) -> dict[str, list]:
        """The unpadded batch: every text (and pair) encoded, truncated and wrapped in its special tokens."""
        firsts = self._core.encode_batch_offsets(texts, return_offsets_mapping, threads)
        seconds = self._core.encode_batch_offsets(pairs, return_offsets_mapping, threads, "pairs") if pairs else None
        added = (3 if pairs is not None else 2) if add_special_tokens else 0
        batch: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        if return_offsets_mapping:
            batch["offset_mapping"] = []
        for i, (ids_a, offs_a) in enumerate(firsts):
            ids_b, offs_b = seconds[i] if seconds is not None else (None, None)
            # As in HF, a max_length that the special tokens alone exceed truncates nothing.
            if strategy and max_length >= added:
                len_a, len_b = _truncated_lengths(
                    len(ids_a), None if ids_b is None else len(ids_b), max_length - added, strategy, index=i
                )
                ids_a, offs_a = ids_a[:len_a], offs_a and offs_a[:len_a]
                if ids_b is not None:
                    ids_b, offs_b = ids_b[:len_b], offs_b and offs_b[:len_b]
            ids, types, offsets = self._assemble(ids_a, offs_a, ids_b, offs_b, add_special_tokens)
            batch["input_ids"].append(ids)
            batch["token_type_ids"].append(types)
            batch["attention_mask"].append([1] * len(ids))
            if return_offsets_mapping:
                batch["offset_mapping"].append(offsets)
        return batch

    def _assemble(
        self,
        ids_a: list[int],
        offs_a: list | None,
        ids_b: list[int] | None,
        offs_b: list | None,
        add_special_tokens: bool,
    ) -> tuple[list[int], list[int], list | None]:
        """``[CLS] a [SEP] b [SEP]`` as (ids, token types, offsets or None): the one place in Python that adds the
        special tokens to lists (the C++ ``Tokenizer::encode_ids`` does it for ``encode_batch`` and
        ``encode_batch_flat``, the flat arrays of ``_encode_on_gpu`` place them by index)."""
        if add_special_tokens:
            ids = [self.cls_token_id, *ids_a, self.sep_token_id]
            offsets = None if offs_a is None else [(0, 0), *offs_a, (0, 0)]
        else:
            ids, offsets = list(ids_a), None if offs_a is None else list(offs_a)
        types = [0] * len(ids)
        if ids_b is not None:
            second = [*ids_b, self.sep_token_id] if add_special_tokens else list(ids_b)
            ids += second
            types += [1] * len(second)
            if offsets is not None:
                offsets += [*offs_b, (0, 0)] if add_special_tokens else list(offs_b)
        return ids, types, offsets

    def _pad(self, batch: dict[str, list], strategy: str, max_length: int | None, multiple: int | None) -> None:
        target = max((len(ids) for ids in batch["input_ids"]), default=0) if strategy == "longest" else max_length
        if multiple:
            target = -(-target // multiple) * multiple
        fill = {"input_ids": self.pad_token_id, "token_type_ids": 0, "attention_mask": 0, "offset_mapping": (0, 0)}
        for key, rows in batch.items():
            for row in rows:
                if len(row) < target:
                    row.extend([fill[key]] * (target - len(row)))

    # Decoding.

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True
    ) -> str:
        """Text of ids: continuation pieces are glued to the previous token, other tokens are separated by a space
        (and, with clean-up, no space is left before . ? ! , as BERT's WordPiece decoder does)."""
        pieces = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.all_special_ids:
                continue
            token = self.vocab.id_to_token(i)
            if pieces:
                token = token[len(CONTINUATION) :] if token.startswith(CONTINUATION) else " " + token
            if clean_up_tokenization_spaces:
                token = _clean_up(token)
            pieces.append(token)
        return "".join(pieces)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def _clean_up(token: str) -> str:
    for dirty, clean in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" do not", " don't"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        token = token.replace(dirty, clean)
    return token


def _as_batch(
    texts: str | Sequence[str], pairs: str | Sequence[str] | None
) -> tuple[list[str], list[str] | None, bool]:
    """Texts and pairs as lists of the same length, and whether a single text (a str) was given."""
    single = isinstance(texts, str)
    if single:
        texts = [texts]
        if pairs is not None and not isinstance(pairs, str):
            raise TypeError(f"pairs must be a str when texts is a str, not {type(pairs).__name__}")
        pairs = None if pairs is None else [pairs]
    texts = _as_list(texts, "texts")
    pairs = None if pairs is None else _as_list(pairs, "pairs")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"pairs has {len(pairs)} items but texts has {len(texts)}")
    return texts, pairs, single


def _as_list(items: Sequence[str], name: str) -> list[str]:
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of str, not a single {type(items).__name__}")
    return items if isinstance(items, list) else list(items)


def _truncation_strategy(truncation: bool | str) -> str | None:
    if truncation is True:
        return "longest_first"
    if truncation is False or truncation == "do_not_truncate":
        return None
    if truncation not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation must be a bool or one of {TRUNCATION_STRATEGIES}, not {truncation!r}")
    return truncation


def _padding_strategy(padding: bool | str) -> str | None:
    if padding is True:
        return "longest"
    if padding is False or padding == "do_not_pad":
        return None
    if padding not in PADDING_STRATEGIES:
        raise ValueError(f"padding must be a bool or one of {PADDING_STRATEGIES}, not {padding!r}")
    return padding


def _truncated_lengths(n1: int, n2: int | None, limit: int, strategy: str, index: int) -> tuple[int, int | None]:
    """Lengths after truncation to `limit` tokens (special tokens already subtracted), as HF tokenizers computes
    them: longest_first shares the budget so that the shorter side keeps as much as it can."""
    total = n1 + (n2 or 0)
    if total <= limit:
        return n1, n2
    if limit == 0:
        return 0, None if n2 is None else 0
    if strategy == "longest_first":
        if n2 is None:
            return limit, None
        short, long_ = min(n1, n2), max(n1, n2)
        long_ = short if short > limit else max(short, limit - short)
        if short + long_ > limit:
            short, long_ = limit // 2, limit // 2 + limit % 2
        return (long_, short) if n1 > n2 else (short, long_)
    to_remove = total - limit
    if strategy == "only_second" and n2 is None:
        raise ValueError(f"texts[{index}]: truncation='only_second' needs pairs")
    target = n1 if strategy == "only_first" else n2
    if target <= to_remove:
        raise ValueError(
            f"texts[{index}]: truncation={strategy!r} cannot fit {total} tokens into {limit}: the "
            f"sequence to truncate has only {target}"
        )
    return (n1 - to_remove, n2) if strategy == "only_first" else (n1, n2 - to_remove)


def _to_tensors(batch: dict[str, list], kind: str) -> dict[str, Any]:
    lengths = {len(row) for row in batch["input_ids"]}
    if len(lengths) > 1:
        raise ValueError(
            f"return_tensors={kind!r} needs rows of one length, got lengths {sorted(lengths)}; "
            "pass padding=True or padding='max_length'"
        )
    import numpy as np

    arrays = {key: np.asarray(rows, dtype=np.int64) for key, rows in batch.items()}
    if "offset_mapping" in arrays:
        arrays["offset_mapping"] = arrays["offset_mapping"].reshape(len(batch["input_ids"]), -1, 2)
    if kind == "pt":
        import torch

        return {key: torch.from_numpy(array) for key, array in arrays.items()}
    return arrays
