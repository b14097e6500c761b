"""``fastbert train-vocab``: a WordPiece ``vocab.txt`` (and ``tokenizer_config.json``) learned from text files.

Inputs are what ``prepare-data`` reads (``.txt`` with a blank line between documents, ``.jsonl``, ``.parquet``;
files, directories or globs), read by its own readers. The ``tokenizers`` library's WordPiece trainer learns the
vocabulary, after BERT's normalization (lowercasing and accent stripping unless ``--cased``) and pre-tokenization.

Special tokens: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` take ids 0 to 4 (the layout of ``tokenizers``'
``BertWordPieceTokenizer``, not BERT's original ``[PAD]``=0, ``[unused*]``, ``[UNK]``=100 ...); the
``tokenizer_config.json`` written beside the vocabulary names them, so ``WordPieceTokenizer.from_pretrained`` and
transformers' ``BertTokenizerFast`` find them wherever they are.

Determinism: the same input gives the same file, byte for byte. The trainer itself is not deterministic across
processes, with any number of threads: it numbers the ``##`` continuation characters in the iteration order of a
randomly seeded hash map, and ties between equally frequent merges are broken by those numbers. So the
continuation characters are found here first (one pass with the same normalizer and pre-tokenizer) and handed to
the trainer, sorted, as initial tokens; every id and merge is then fixed by the input alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION = "##"


class VocabTrainingError(ValueError):
    """Input a vocabulary cannot be trained from; the message names the file or the option."""


def train_vocab(
    files: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    text_field: str = "text",
    errors: str = "strict",
    progress: bool = True,
) -> Path:
    """Train a WordPiece vocabulary on ``files`` and write ``out/vocab.txt`` and ``out/tokenizer_config.json``
    (atomically); returns the path of vocab.txt. ``files`` may hold directories and globs, as for prepare-data."""
    from fastbert import _wordpiece
    from fastbert.data.readers import input_files
    from fastbert.tokenizer import WordPieceTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise VocabTrainingError(f"--vocab-size must be more than {len(SPECIAL_TOKENS)}, got {vocab_size}")
    if min_frequency < 0:
        raise VocabTrainingError(f"--min-frequency must be 0 or more, got {min_frequency}")
    if not files:
        raise VocabTrainingError("no input files")
    paths = input_files([os.fspath(f) for f in files])
    tokenizer, normalizer, pre_tokenizer = _bert_pipeline(lowercase)
    documents, continuation = _read_documents(paths, normalizer, pre_tokenizer, text_field, errors, progress)
    if not any(doc.strip() for doc in documents):
        raise VocabTrainingError(f"no text in {', '.join(map(str, paths))} (empty files, or only blank lines)")
    tokens = _trained_tokens(tokenizer, documents, continuation, vocab_size, min_frequency, progress)
    vocab = _wordpiece.Vocab.from_text("".join(t + "\n" for t in tokens).encode("utf-8"), "<trained vocab>")
    out = Path(out)
    WordPieceTokenizer(vocab, lowercase, source=str(out / "vocab.txt")).save_pretrained(out)
    return out / "vocab.txt"


def _read_documents(
    paths: list[Path], normalizer, pre_tokenizer, text_field: str, errors: str, progress: bool
) -> tuple[list[str], set[str]]:
    """Every document of ``paths``, and every character that follows another inside a pre-tokenized word (the
    ``##`` continuations the trainer is seeded with; see the module docstring)."""
    from tqdm import tqdm

    from fastbert.data.readers import read_documents

    documents: list[str] = []
    continuation: set[str] = set()
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="train-vocab: read", disable=not progress or None) as bar:
        for path in paths:
            docs, size, _ = read_documents(path, errors=errors, text_field=text_field)
            for doc in docs:
                for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(doc)):
                    continuation.update(word[1:])
            documents += docs
            bar.update(size)
    return documents, continuation


def _trained_tokens(
    tokenizer, documents: list[str], continuation: set[str], vocab_size: int, min_frequency: int, progress: bool
) -> list[str]:
    """The trained vocabulary in id order, special tokens first."""
    from tokenizers import trainers

    initial = [*SPECIAL_TOKENS, *(CONTINUATION + c for c in sorted(continuation))]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=initial,
        continuing_subword_prefix=CONTINUATION,
        show_progress=progress,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    tokens = [token for token, _ in by_id]
    if tokens[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):  # the trainer puts its special tokens first
        raise RuntimeError(f"the WordPiece trainer moved the special tokens: {tokens[: len(SPECIAL_TOKENS)]}")
    return tokens


def _bert_pipeline(lowercase: bool):
    """A ``tokenizers`` WordPiece tokenizer with BERT's normalizer (accents stripped exactly when lowercasing, as
    fastbert's tokenizer does) and pre-tokenizer; and those two."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=CONTINUATION))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer, tokenizer.normalizer, tokenizer.pre_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``train-vocab`` on the ``fastbert`` command's subparsers."""
    parser = subparsers.add_parser(
        "train-vocab",
        help="learn a WordPiece vocab.txt from text files",
        description="Train a WordPiece vocabulary with the tokenizers library's trainer on .txt, .jsonl or .parquet "
        "files (as prepare-data reads them) and write OUT/vocab.txt and OUT/tokenizer_config.json. "
        "[PAD] [UNK] [CLS] [SEP] [MASK] get ids 0-4. The same input always gives the same vocabulary.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .parquet files, directories, globs")
    parser.add_argument("--out", required=True, help="output directory (vocab.txt, tokenizer_config.json)")
    parser.add_argument("--vocab-size", type=int, default=30522, help="tokens in the vocabulary (default 30522)")
    case = parser.add_mutually_exclusive_group()
    case.add_argument(
        "--lowercase", dest="lowercase", action="store_true", default=True, help="lowercase, strip accents (default)"
    )
    case.add_argument("--cased", dest="lowercase", action="store_false", help="keep case and accents")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="a merge must be seen this often to enter the vocabulary"
    )
    parser.add_argument("--text-field", default="text", help="field of .jsonl records / column of .parquet files")
    parser.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: fail naming the byte offset (strict) or replace",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``fastbert train-vocab``; returns the exit status."""
    try:
        path = train_vocab(
            args.inputs,
            args.out,
            vocab_size=args.vocab_size,
            lowercase=args.lowercase,
            min_frequency=args.min_frequency,
            text_field=args.text_field,
            errors=args.errors,
            progress=args.progress,
        )
    except (ValueError, OSError) as e:
        print(f"fastbert train-vocab: error: {e}", file=sys.stderr)
        return 1
    size = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"{size} tokens -> {path} (and {path.parent / 'tokenizer_config.json'})")
    return 0
