"""Dynamic MLM masking and batching: samples -> the model's unpadded (or padded) batch.

BERT's recipe: select 15% of the maskable tokens of each sequence (never [CLS], [SEP], [PAD], [MASK] or other
special tokens), at most ``max_predictions`` of them; replace 80% of the selected with [MASK], 10% with a random
token, keep 10%. With ``whole_word`` a word's ``##`` continuations are selected together with it.

Every random draw is a hash of ``(seed, epoch, sample index, token position, purpose)``, so a sample is masked the
same way whatever the world size, micro-batch, batch composition or number of DataLoader workers (the cap on
predictions, too, comes from the sequence's own length). The per-sequence count is ``0.15 * maskable`` with
stochastic rounding, so the selected fraction is 15% in expectation at every sequence length. The masking runs in
the C++ extension (``csrc/wordpiece/masking.cc``); ``MaskingCollator.mask_reference`` is the numpy definition it
is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fastbert.config import IGNORE_INDEX
from fastbert.data.shards import Sample
from fastbert.data.splitmix import GOLDEN, mix64

MLM_PROBABILITY = 0.15
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # the remaining 10% keep the original token
# BERT's caps on predictions per sequence: 20 at length 128, 80 at 512; other lengths scale linearly.
PREDICTIONS_PER_TOKEN = 20 / 128

_SELECT, _ROUND, _REPLACE, _RANDOM_ID = 1, 2, 3, 4  # purposes, so that draws are independent


def random_uniform(seed: int, epoch: np.ndarray, sample: np.ndarray, position: np.ndarray, purpose: int) -> np.ndarray:
    """Uniform floats in [0, 1) that depend only on their arguments (broadcast together)."""
    with np.errstate(over="ignore"):
        h = mix64(np.uint64(seed) * np.uint64(GOLDEN) + np.uint64(purpose))
        h = mix64(h ^ epoch.astype(np.uint64))
        h = mix64(h ^ sample.astype(np.uint64))
        h = mix64(h ^ position.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class MaskingCollator:
    """Collates ``Sample``s into a masked batch for ``BertForPreTraining``.

    Returns (unpadded) ``input_ids [T]``, ``token_type_ids [T]``, ``position_ids [T]``, ``cu_seqlens [B + 1]``,
    ``max_seqlen``, ``labels [T]`` (-100 where not predicted), ``masked_positions [M]``, ``masked_labels [M]``,
    ``next_sentence_label [B]`` (when samples carry one), ``sample_index [B]``; with ``padded=True`` instead
    ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels`` as ``[B, S]``.
    """

    def __init__(
        self,
        vocab_size: int,
        special_ids: Sequence[int],
        mask_id: int,
        seed: int = 0,
        mlm_probability: float = MLM_PROBABILITY,
        max_predictions: int | None = None,
        whole_word: bool = False,
        continuation_ids: Sequence[int] = (),
        padded: bool = False,
        pad_id: int = 0,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_id not in special_ids:
            special_ids = [*special_ids, mask_id]
        self.vocab_size, self.mask_id, self.pad_id, self.seed = vocab_size, mask_id, pad_id, seed
        self.mlm_probability, self.max_predictions = mlm_probability, max_predictions
        self.whole_word, self.padded = whole_word, padded
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[np.asarray(list(special_ids), dtype=np.int64)] = True
        self.is_continuation = np.zeros(vocab_size, dtype=bool)
        self.is_continuation[np.asarray(list(continuation_ids), dtype=np.int64)] = True
        self.random_ids = np.flatnonzero(~self.is_special)  # random replacements are ordinary tokens
        self._special_bytes = self.is_special.view(np.uint8)
        self._continuation_bytes = self.is_continuation.view(np.uint8)

    def max_predictions_for(self, lengths: np.ndarray) -> np.ndarray:
        """The most predictions for sequences of ``lengths`` tokens: ``max_predictions``, or by default BERT's 20 per
        128 tokens. It depends on the sequence alone, not on the batch it is in."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.max_predictions is not None:
            return np.full_like(lengths, self.max_predictions)
        return np.maximum(1, np.round(lengths * PREDICTIONS_PER_TOKEN)).astype(np.int64)

    def mask(
        self, ids: np.ndarray, lengths: np.ndarray, samples: np.ndarray, epochs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mask a padded ``[B, S]`` id matrix; returns (masked ids, labels with -100 where not predicted).

        Runs in the C++ extension, one row at a time; :meth:`mask_reference` is the same computation in numpy."""
        from fastbert import _wordpiece

        lengths = np.asarray(lengths, dtype=np.int64)
        return _wordpiece.mask_batch(
            ids,
            lengths,
            samples,
            epochs,
            self.max_predictions_for(lengths),
            self._special_bytes,
            self._continuation_bytes,
            self.random_ids,
            self.mask_id,
            self.seed,
            self.mlm_probability,
            MASK_FRACTION,
            RANDOM_FRACTION,
            self.whole_word,
            IGNORE_INDEX,
        )

    def mask_reference(
        self, ids: np.ndarray, lengths: np.ndarray, samples: np.ndarray, epochs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`mask` in numpy over the whole batch: the readable definition the C++ path is tested against."""
        batch, seq = ids.shape
        pos = np.arange(seq)[None, :]
        s, e = samples[:, None], epochs[:, None]
        real = pos < lengths[:, None]
        maskable = real & ~self.is_special[ids]
        # Whole-word masking: a continuation token shares the draw of the word it continues.
        word_start = pos.repeat(batch, 0)
        if self.whole_word:
            starts_word = ~(self.is_continuation[ids] & maskable)
            word_start = np.maximum.accumulate(np.where(starts_word, pos, 0), axis=1)
        key = random_uniform(self.seed, e, s, word_start, _SELECT)
        key = np.where(maskable, key, np.inf)
        order = np.argsort(key, axis=1, kind="stable")
        want = maskable.sum(1) * self.mlm_probability
        count = np.floor(want) + (
            random_uniform(self.seed, epochs, samples, np.zeros_like(samples), _ROUND) < want - np.floor(want)
        )
        count = np.minimum(count, self.max_predictions_for(lengths)).astype(np.int64)
        ranked = np.take_along_axis(maskable, order, axis=1)
        if self.whole_word:
            # Take whole words in draw order while the running token count stays within the budget.
            taken = np.cumsum(ranked, axis=1) <= count[:, None]
            ws = np.take_along_axis(word_start, order, axis=1)
            over = ~taken & ranked
            first_over = np.where(over.any(axis=1), np.take_along_axis(ws, over.argmax(axis=1)[:, None], 1)[:, 0], -1)
            taken &= ws != first_over[:, None]  # never split a word at the budget's edge
        else:
            taken = np.arange(seq)[None, :] < count[:, None]
        selected = np.zeros_like(maskable)
        np.put_along_axis(selected, order, taken & ranked, axis=1)
        roll = random_uniform(self.seed, e, s, pos, _REPLACE)
        draw = random_uniform(self.seed, e, s, pos, _RANDOM_ID)
        random_tokens = self.random_ids[(draw * len(self.random_ids)).astype(np.int64)]
        masked = np.where(selected & (roll < MASK_FRACTION), self.mask_id, ids)
        masked = np.where(
            selected & (roll >= MASK_FRACTION) & (roll < MASK_FRACTION + RANDOM_FRACTION), random_tokens, masked
        )
        labels = np.where(selected, ids, IGNORE_INDEX)
        return masked, labels

    def __call__(self, samples: Sequence[Sample], indices: np.ndarray, epochs: np.ndarray) -> dict:
        lengths = np.array([len(x.input_ids) for x in samples], dtype=np.int64)
        seq = int(lengths.max())
        ids = np.full((len(samples), seq), self.pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        for i, x in enumerate(samples):
            ids[i, : lengths[i]] = x.input_ids
            types[i, : lengths[i]] = x.token_type_ids
        indices = np.array(indices, dtype=np.int64)  # a copy: callers may pass views with negative strides
        masked, labels = self.mask(ids, lengths, indices, np.asarray(epochs, dtype=np.int64))
        out: dict = {"sample_index": torch.from_numpy(indices)}
        sentence = np.array([x.sentence_label for x in samples], dtype=np.int64)
        if (sentence >= 0).all():
            out["next_sentence_label"] = torch.from_numpy(sentence)
        if self.padded:
            real = np.arange(seq)[None, :] < lengths[:, None]
            out.update(
                input_ids=torch.from_numpy(masked),
                attention_mask=torch.from_numpy(real.astype(np.int64)),
                token_type_ids=torch.from_numpy(types),
                labels=torch.from_numpy(labels),
            )
            return out
        real = np.arange(seq)[None, :] < lengths[:, None]
        flat_labels = labels[real]
        out.update(
            input_ids=torch.from_numpy(masked[real]),
            token_type_ids=torch.from_numpy(types[real]),
            position_ids=torch.from_numpy(np.nonzero(real)[1].astype(np.int64)),
            cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
            max_seqlen=seq,
            labels=torch.from_numpy(flat_labels),
            masked_positions=torch.from_numpy(np.flatnonzero(flat_labels != IGNORE_INDEX)),
            masked_labels=torch.from_numpy(flat_labels[flat_labels != IGNORE_INDEX]),
        )
        return out
