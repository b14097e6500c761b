"""Dynamic MLM masking and batching: samples -> the model's unpadded (or padded) batch.

BERT's recipe: select 15% of the maskable tokens of each sequence (never [CLS], [SEP], [PAD], [MASK] or other
special tokens), at most ``max_predictions`` of them; replace 80% of the selected with [MASK], 10% with a random
token, keep 10%. The ``masking`` scheme says what is selected (``MASKING_SCHEMES``):

- ``token``: single tokens, each by its own draw (BERT);
- ``whole-word``: a word (a token and the ``##`` continuations after it) is selected whole or not at all;
- ``span``: SpanBERT's spans (Joshi et al. 2020). Repeatedly a span length in words is drawn from a geometric
  distribution with p = 0.2 clipped at 10 (renormalised), a start word among the words not yet taken, and the span's
  words are taken from there, cut short by a taken word, a token that cannot be masked ([SEP]) or the row's end,
  until the budget is spent. Each span is replaced as a whole: 80% [MASK], 10% random tokens, 10% unchanged.

Both word schemes stop short of the budget rather than split a word at its edge.

Every random draw is a hash of ``(seed, epoch, sample index, token position or draw counter, purpose)``, so a
sample is masked the same way whatever the world size, micro-batch, batch composition or number of DataLoader
workers (the cap on predictions, too, comes from the sequence's own length). The per-sequence count is
``0.15 * maskable`` with stochastic rounding, so the selected fraction is 15% in expectation at every sequence
length (the word schemes fall a little short of it). The masking runs in the C++ extension
(``csrc/wordpiece/masking.cc``); ``MaskingCollator.mask_reference`` is the definition it is tested against.
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
MASKING_SCHEMES = ("token", "whole-word", "span")  # the C++ masker's kMaskSchemeNames, in this order
SPAN_GEOMETRIC_P, MAX_SPAN_WORDS = 0.2, 10  # SpanBERT's span lengths in words
# P(span length <= k + 1 words) for k < MAX_SPAN_WORDS: the geometric distribution clipped at MAX_SPAN_WORDS and
# renormalised; the C++ masker draws from this very table.
SPAN_LENGTH_CDF = np.cumsum(SPAN_GEOMETRIC_P * (1 - SPAN_GEOMETRIC_P) ** np.arange(MAX_SPAN_WORDS))
SPAN_LENGTH_CDF /= SPAN_LENGTH_CDF[-1]

_SELECT, _ROUND, _REPLACE, _RANDOM_ID, _SPAN_LENGTH, _SPAN_START = 1, 2, 3, 4, 5, 6  # purposes: independent draws


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
        masking: str = "token",
        continuation_ids: Sequence[int] = (),
        padded: bool = False,
        pad_id: int = 0,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if masking not in MASKING_SCHEMES:
            raise ValueError(f"masking must be one of {', '.join(MASKING_SCHEMES)}, got {masking!r}")
        if mask_id not in special_ids:
            special_ids = [*special_ids, mask_id]
        self.vocab_size, self.mask_id, self.pad_id, self.seed = vocab_size, mask_id, pad_id, seed
        self.mlm_probability, self.max_predictions = mlm_probability, max_predictions
        self.masking, self.padded = masking, padded
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[np.asarray(list(special_ids), dtype=np.int64)] = True
        self.is_continuation = np.zeros(vocab_size, dtype=bool)
        self.is_continuation[np.asarray(list(continuation_ids), dtype=np.int64)] = True
        self.random_ids = np.flatnonzero(~self.is_special)  # random replacements are ordinary tokens
        self._special_bytes = self.is_special.view(np.uint8)
        self._continuation_bytes = self.is_continuation.view(np.uint8)

    def max_predictions_for(self, lengths: np.ndarray) -> np.ndarray:
        """The most predictions for sequences of ``lengths`` tokens: ``max_predictions``, or by default BERT's 20 per
        128 tokens at its 15% rate, scaled with ``mlm_probability`` (40 per 128 at 30%), so that the cap never
        undoes a higher rate. It depends on the sequence alone, not on the batch it is in."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.max_predictions is not None:
            return np.full_like(lengths, self.max_predictions)
        per_token = PREDICTIONS_PER_TOKEN * (self.mlm_probability / MLM_PROBABILITY)
        return np.maximum(1, np.round(lengths * per_token)).astype(np.int64)

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
            self.masking,
            SPAN_LENGTH_CDF,
            IGNORE_INDEX,
        )

    def mask_reference(
        self, ids: np.ndarray, lengths: np.ndarray, samples: np.ndarray, epochs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`mask` in numpy over the whole batch: the readable definition the C++ path is tested against."""
        batch, seq = ids.shape
        pos = np.arange(seq)[None, :]
        s, e = samples[:, None], epochs[:, None]
        maskable, count = self._budgets(ids, lengths, samples, epochs)
        replace_at = pos.repeat(batch, 0)  # the position whose draw decides a selected token's replacement
        if self.masking == "span":
            selected = np.zeros_like(maskable)
            for b in range(batch):
                for begin, end, _ in self._row_spans(ids[b], maskable[b], count[b], samples[b], epochs[b]):
                    selected[b, begin:end] = True
                    replace_at[b, begin:end] = begin  # a span is replaced as a whole, by its first token's draw
        else:
            selected = self._select_in_draw_order(ids, maskable, count, s, e)
        roll = random_uniform(self.seed, e, s, replace_at, _REPLACE)
        draw = random_uniform(self.seed, e, s, pos, _RANDOM_ID)
        random_tokens = self.random_ids[(draw * len(self.random_ids)).astype(np.int64)]
        masked = np.where(selected & (roll < MASK_FRACTION), self.mask_id, ids)
        masked = np.where(
            selected & (roll >= MASK_FRACTION) & (roll < MASK_FRACTION + RANDOM_FRACTION), random_tokens, masked
        )
        labels = np.where(selected, ids, IGNORE_INDEX)
        return masked, labels

    def spans_reference(
        self, ids: np.ndarray, lengths: np.ndarray, samples: np.ndarray, epochs: np.ndarray
    ) -> list[list[tuple[int, int, int]]]:
        """The spans ``masking="span"`` selects in each row of a padded ``[B, S]`` id matrix, in the order they
        are drawn: (first token, end token, drawn length in words)."""
        maskable, count = self._budgets(ids, lengths, samples, epochs)
        return [self._row_spans(ids[b], maskable[b], count[b], samples[b], epochs[b]) for b in range(len(ids))]

    def _budgets(
        self, ids: np.ndarray, lengths: np.ndarray, samples: np.ndarray, epochs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which tokens may be predicted ``[B, S]``, and how many are ``[B]``: ``mlm_probability`` of them,
        stochastically rounded, at most the row's cap."""
        pos = np.arange(ids.shape[1])[None, :]
        maskable = (pos < lengths[:, None]) & ~self.is_special[ids]
        want = maskable.sum(1) * self.mlm_probability
        count = np.floor(want) + (
            random_uniform(self.seed, epochs, samples, np.zeros_like(samples), _ROUND) < want - np.floor(want)
        )
        return maskable, np.minimum(count, self.max_predictions_for(lengths)).astype(np.int64)

    def _select_in_draw_order(
        self, ids: np.ndarray, maskable: np.ndarray, count: np.ndarray, s: np.ndarray, e: np.ndarray
    ) -> np.ndarray:
        """Token and whole-word selection: the first ``count`` maskable tokens of each row in the order of one draw
        per token, or per word (a continuation shares the draw of the word it continues)."""
        batch, seq = ids.shape
        pos = np.arange(seq)[None, :]
        word_start = pos.repeat(batch, 0)
        whole_word = self.masking == "whole-word"
        if whole_word:
            starts_word = ~(self.is_continuation[ids] & maskable)
            word_start = np.maximum.accumulate(np.where(starts_word, pos, 0), axis=1)
        key = random_uniform(self.seed, e, s, word_start, _SELECT)
        key = np.where(maskable, key, np.inf)
        order = np.argsort(key, axis=1, kind="stable")
        ranked = np.take_along_axis(maskable, order, axis=1)
        if whole_word:
            # Take whole words in draw order while the running token count stays within the budget.
            taken = np.cumsum(ranked, axis=1) <= count[:, None]
            ws = np.take_along_axis(word_start, order, axis=1)
            over = ~taken & ranked
            first_over = np.where(over.any(axis=1), np.take_along_axis(ws, over.argmax(axis=1)[:, None], 1)[:, 0], -1)
            taken &= ws != first_over[:, None]  # never split a word at the budget's edge
        else:
            taken = pos < count[:, None]
        selected = np.zeros_like(maskable)
        np.put_along_axis(selected, order, taken & ranked, axis=1)
        return selected

    def _words(self, row: np.ndarray, maskable: np.ndarray) -> list[list[int]]:
        """A row's words as [begin, end): runs of maskable tokens, each a token and the ``##`` continuations after
        it (a continuation after [SEP] starts a word)."""
        words: list[list[int]] = []
        for p in np.flatnonzero(maskable).tolist():
            if words and words[-1][1] == p and self.is_continuation[row[p]]:
                words[-1][1] = p + 1
            else:
                words.append([p, p + 1])
        return words

    def _row_spans(
        self, row: np.ndarray, maskable: np.ndarray, budget: int, sample: np.int64, epoch: np.int64
    ) -> list[tuple[int, int, int]]:
        """SpanBERT's selection in one row: (first token, end token, drawn length in words) per span. Span number k
        draws its start word among the words not yet taken and its length from ``SPAN_LENGTH_CDF``, both at
        counter k; masking ends when the budget is spent or a span's first word would overshoot it."""
        words = self._words(row, maskable)
        counters = np.arange(len(words))  # every span takes a word, so there are at most this many
        start_draws = random_uniform(self.seed, epoch, sample, counters, _SPAN_START)
        length_draws = random_uniform(self.seed, epoch, sample, counters, _SPAN_LENGTH)
        span_lengths = 1 + (length_draws[:, None] >= SPAN_LENGTH_CDF[None, :-1]).sum(1)
        free, taken, covered, spans = list(range(len(words))), [False] * len(words), 0, []
        for span in counters:
            if covered >= budget or not free:
                break
            first = free[int(start_draws[span] * len(free))]
            w = first
            # The span runs over consecutive untaken words, never across a token that cannot be masked.
            while w < len(words) and w - first < span_lengths[span] and not taken[w]:
                begin, end = words[w]
                if (w > first and begin != words[w - 1][1]) or covered + end - begin > budget:
                    break
                covered += end - begin
                taken[w] = True
                w += 1
            if w == first:
                break  # the span's first word would overshoot the budget
            spans.append((words[first][0], words[w - 1][1], int(span_lengths[span])))
            free = [x for x in free if not taken[x]]
        return spans

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
