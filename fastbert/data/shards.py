"""The on-disk pretraining format: shards of token ids plus ``meta.json``, written atomically, read memory-mapped.

A shard is four ``.npy`` files: ``tokens`` (every sample's segment A then B, flat; uint16 when the vocabulary
fits), ``offsets`` (int64, ``[n + 1]``, where each sample starts), ``split`` (int32, length of segment A; equal to
the sample's length when there is no segment B) and ``labels`` (int8 sentence-objective label: 1 = IsNext / not
swapped, 0 = NotNext / swapped, -1 = none). Special tokens are not stored; ``ShardDataset`` adds ``[CLS] A [SEP]
B [SEP]`` when it reads a sample.

``meta.json`` is the table of contents: format version, vocabulary sha256, sequence length, objective, counts and
the sha256 of every file. Each file is written under a temporary name and renamed; ``meta.json`` is written last,
so a directory whose ``meta.json`` is missing or does not list a shard holds no shard that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastbert.atomic import write_atomic

FORMAT_VERSION = 1
META_NAME = "meta.json"
ARRAYS = ("tokens", "offsets", "split", "labels")


class ShardError(ValueError):
    """A shard directory that is incomplete, corrupt or made for another vocabulary."""


def vocab_sha256(tokens: list[str]) -> str:
    """The vocabulary's identity: sha256 of its tokens in id order, one per line (independent of line endings)."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class Sample:
    """One pretraining sample: token ids with specials, segment ids and the sentence-objective label (-1: none)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    sentence_label: int = -1


@dataclass
class SegmentPair:
    a: list[int]
    b: list[int]
    label: int = -1


class ShardWriter:
    """Collects samples and writes them as shards of ``shard_size`` samples; ``close()`` writes meta.json."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        vocab_tokens: list[str],
        special_ids: dict[str, int],
        seq_len: int,
        objective: str,
        seed: int,
        shard_size: int = 100_000,
        extra_meta: dict[str, Any] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / META_NAME).unlink(missing_ok=True)  # an old table of contents must not vouch for new files
        self.dtype = np.uint16 if len(vocab_tokens) <= 1 << 16 else np.uint32
        self.meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "vocab_sha256": vocab_sha256(vocab_tokens),
            "vocab_size": len(vocab_tokens),
            "special_ids": special_ids,
            "seq_len": seq_len,
            "objective": objective,
            "seed": seed,
            "dtype": np.dtype(self.dtype).name,
            "num_samples": 0,
            "num_tokens": 0,
            "shards": [],
            **(extra_meta or {}),
        }
        self.shard_size = shard_size
        # How often each id occurs in the shards (special tokens, added when a sample is read, not counted): the
        # unigram distribution a pretraining run starts its MLM output bias from (meta.json's "token_counts").
        self._token_counts = np.zeros(len(vocab_tokens), dtype=np.int64)
        self._pending: list[dict[str, np.ndarray]] = []  # blocks of samples not yet in a shard
        self._pending_count = 0

    def add_samples(self, tokens: np.ndarray, offsets: np.ndarray, split: np.ndarray, labels: np.ndarray) -> None:
        """Add samples given as arrays: sample ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (``offsets`` starts
        at 0), its first ``split[i]`` tokens being segment A, with sentence label ``labels[i]``."""
        if len(split):
            self._pending.append(
                {
                    "tokens": np.asarray(tokens),
                    "offsets": np.asarray(offsets, dtype=np.int64),
                    "split": np.asarray(split),
                    "labels": np.asarray(labels),
                }
            )
            self._pending_count += len(split)
        while self._pending_count >= self.shard_size:
            self._flush()

    def _take(self, count: int) -> dict[str, np.ndarray]:
        """The first ``count`` pending samples as one block (offsets from 0), removed from the pending blocks."""
        blocks, taken = [], 0
        while taken < count:
            block = self._pending[0]
            n = len(block["split"])
            if taken + n <= count:
                blocks.append(self._pending.pop(0))
                taken += n
                continue
            k = count - taken
            cut = block["offsets"][k]
            blocks.append(
                {
                    "tokens": block["tokens"][:cut],
                    "offsets": block["offsets"][: k + 1],
                    "split": block["split"][:k],
                    "labels": block["labels"][:k],
                }
            )
            self._pending[0] = {
                "tokens": block["tokens"][cut:],
                "offsets": block["offsets"][k:] - cut,
                "split": block["split"][k:],
                "labels": block["labels"][k:],
            }
            taken = count
        self._pending_count -= count
        base = np.cumsum([0] + [b["offsets"][-1] for b in blocks[:-1]])
        return {
            "tokens": np.concatenate([b["tokens"] for b in blocks]),
            "offsets": np.concatenate([[0]] + [b["offsets"][1:] + o for b, o in zip(blocks, base, strict=True)]),
            "split": np.concatenate([b["split"] for b in blocks]),
            "labels": np.concatenate([b["labels"] for b in blocks]),
        }

    def _flush(self) -> None:
        """Write the next shard: up to ``shard_size`` pending samples."""
        if not self._pending_count:
            return
        samples = self._take(min(self.shard_size, self._pending_count))
        name = f"shard-{len(self.meta['shards']):05d}"
        num_samples, num_tokens = len(samples["split"]), int(samples["offsets"][-1])
        arrays = {
            "tokens": samples["tokens"].astype(self.dtype),
            "offsets": samples["offsets"].astype(np.int64),
            "split": samples["split"].astype(np.int32),
            "labels": samples["labels"].astype(np.int8),
        }
        files = {}
        for key, array in arrays.items():
            path = self.out_dir / f"{name}.{key}.npy"
            write_atomic(path, _npy_bytes(array))
            files[key] = {"file": path.name, "sha256": file_sha256(path)}
        self.meta["shards"].append({"name": name, "num_samples": num_samples, "num_tokens": num_tokens, "files": files})
        self.meta["num_samples"] += num_samples
        self.meta["num_tokens"] += num_tokens
        self._token_counts += np.bincount(arrays["tokens"], minlength=len(self._token_counts))

    def close(self, **extra_meta: Any) -> dict[str, Any]:
        while self._pending_count:
            self._flush()
        self.meta.update(extra_meta)
        self.meta["token_counts"] = self._token_counts.tolist()
        # One line for the counts (a vocabulary's worth of numbers), the rest of the table of contents indented.
        text = json.dumps({**self.meta, "token_counts": "@COUNTS@"}, indent=2)
        text = text.replace('"@COUNTS@"', json.dumps(self.meta["token_counts"], separators=(",", ":")))
        write_atomic(self.out_dir / META_NAME, (text + "\n").encode())
        return self.meta


class ShardDataset:
    """Memory-mapped samples of a prepared directory, as ``Sample``s with special tokens added.

    ``verify``: ``"lazy"`` checks a shard's checksums the first time one of its samples is read, ``"full"`` checks
    every shard when opened, ``"none"`` trusts the files. ``vocab_tokens`` (the tokenizer's vocabulary) is compared
    with the vocabulary the shards were made with.
    """

    def __init__(self, directory: str | os.PathLike, *, vocab_tokens: list[str] | None = None, verify: str = "lazy"):
        if verify not in ("lazy", "full", "none"):
            raise ValueError(f"verify must be 'lazy', 'full' or 'none', got {verify!r}")
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        if not meta_path.exists():
            raise ShardError(
                f"{self.directory}: no {META_NAME}; the directory was not prepared, or prepare-data did not finish"
            )
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"{meta_path}: not a readable meta.json ({e}); prepare the data again") from e
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{meta_path}: format_version {self.meta.get('format_version')!r}, this fastbert reads {FORMAT_VERSION}"
            )
        if vocab_tokens is not None and vocab_sha256(vocab_tokens) != self.meta["vocab_sha256"]:
            raise ShardError(
                f"{self.directory}: the shards were made with vocabulary sha256 "
                f"{self.meta['vocab_sha256'][:16]}... but the tokenizer's is "
                f"{vocab_sha256(vocab_tokens)[:16]}...; prepare the data again with this vocabulary"
            )
        self.special_ids = self.meta["special_ids"]
        self.verify = verify
        self._verified: set[int] = set()
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        counts = [s["num_samples"] for s in self.meta["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if verify == "full":
            for i in range(len(counts)):
                self._verify(i)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]

    def _verify(self, shard: int) -> None:
        info = self.meta["shards"][shard]
        for key in ARRAYS:
            path = self.directory / info["files"][key]["file"]
            if not path.exists():
                raise ShardError(f"{path}: missing file of shard {info['name']}")
            if file_sha256(path) != info["files"][key]["sha256"]:
                raise ShardError(
                    f"{path}: checksum mismatch in shard {info['name']}; the file is corrupt or was "
                    f"changed after prepare-data"
                )
        self._verified.add(shard)

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(shard)
        if arrays is None:
            if self.verify == "lazy" and shard not in self._verified:
                self._verify(shard)
            info = self.meta["shards"][shard]
            # Plain ndarray views of the mapped files: indexing a np.memmap costs a Python-level __array_finalize__.
            arrays = {
                key: np.load(self.directory / info["files"][key]["file"], mmap_mode="r").view(np.ndarray)
                for key in ARRAYS
            }
            self._arrays[shard] = arrays
        return arrays

    def segments(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Sample ``index`` as (segment A ids, segment B ids, label), without special tokens."""
        tokens, start, cut, stop, label = self._locate(index)
        return tokens[start:cut].astype(np.int64), tokens[cut:stop].astype(np.int64), label

    def _locate(self, index: int) -> tuple[np.ndarray, int, int, int, int]:
        """Sample ``index``'s shard token array, its (start, end of segment A, stop) there, and its label."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside the dataset of {len(self)}")
        shard = int(self._starts.searchsorted(index, side="right")) - 1
        local = index - int(self._starts[shard])
        a = self._shard(shard)
        start, stop = a["offsets"][local : local + 2].tolist()
        return a["tokens"], start, start + int(a["split"][local]), stop, int(a["labels"][local])

    def __getitem__(self, index: int) -> Sample:
        tokens, start, cut, stop, label = self._locate(index)
        len_a, len_b = cut - start, stop - cut
        # [CLS] A [SEP] (B [SEP]), written into one array rather than concatenated from pieces
        n = len_a + 2 + (len_b + 1 if len_b else 0)
        ids = np.empty(n, np.int64)
        ids[0] = self.special_ids["cls"]
        ids[1 : len_a + 1] = tokens[start:cut]
        ids[len_a + 1] = self.special_ids["sep"]
        types = np.zeros(n, np.int64)
        if len_b:
            ids[len_a + 2 : n - 1] = tokens[cut:stop]
            ids[n - 1] = self.special_ids["sep"]
            types[len_a + 2 :] = 1
        return Sample(ids, types, label)
