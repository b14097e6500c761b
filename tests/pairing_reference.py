"""The pretraining pair recipe in plain Python: the readable definition that prepare-data's C++ pair cutter
(csrc/wordpiece/pairs.cc, ``fastbert._wordpiece.segment_pairs``) must reproduce sample for sample.

The product never runs this code; tests/test_prepare.py compares the two on real text and checks the recipe's
promises (labels balanced, negatives from another document, SOP swaps) here, where they are easy to read.
Documents come as nested lists, document -> sentence -> token ids (``nested_lists`` turns the encoder's flat
``Documents`` into them). Every random draw comes from ``PairRandom(seed, document index)``, in the order below.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from fastbert.data.encoding import Documents
from fastbert.data.prepare import PrepareOptions, PrepareStats
from fastbert.data.shards import SegmentPair
from fastbert.data.splitmix import GOLDEN, MASK64, mix64


class PairRandom:
    """A document's random stream: SplitMix64 seeded from (seed, document index)."""

    def __init__(self, seed: int, stream: int):
        self.state = mix64(mix64((seed + GOLDEN) & MASK64) ^ stream)

    def uniform(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        self.state = (self.state + GOLDEN) & MASK64
        return (mix64(self.state) >> 11) * 2.0**-53

    def randint(self, low: int, high: int) -> int:
        """An int in [low, high), from one uniform draw."""
        return low + int(self.uniform() * (high - low))


def nested_lists(documents: Documents) -> list[list[list[int]]]:
    """document -> sentence -> token ids, as Python lists (what ``document_pairs`` takes)."""
    sentences = np.split(documents.tokens, documents.sentence_offsets[1:-1])
    return [
        [s.tolist() for s in sentences[documents.doc_offsets[d] : documents.doc_offsets[d + 1]]]
        for d in range(len(documents))
    ]


def document_pairs(
    index: int, documents: list[list[list[int]]], options: PrepareOptions, stats: PrepareStats
) -> list[SegmentPair]:
    """The samples cut from ``documents[index]``; randomness from ``(seed, index)`` only."""
    rng = PairRandom(options.seed, index)
    doc = documents[index]
    if options.objective == "none":
        return packed(doc, options.seq_len - 2)
    max_tokens = options.seq_len - 3
    doc = _cut_long_sentences(doc, max(1, max_tokens // 2))
    pairs: list[SegmentPair] = []
    target, chunk, length, i = _draw_target(rng, max_tokens, options.short_seq_prob), [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk)) if len(chunk) >= 2 else 1
            a = list(chain.from_iterable(chunk[:a_end]))
            # Unlike the original recipe, a one-sentence chunk is not forced to be a negative (it is split by
            # _actual_next when it must be a positive), so IsNext stays at 50% however short the documents are.
            if options.objective == "nsp" and rng.uniform() < 0.5:
                b, label = _random_next(index, documents, target - len(a), rng), 0
                i -= len(chunk) - a_end  # the unused sentences start the next sample
            else:
                a, b, label = _actual_next(a, chunk[a_end:], options.objective, rng)
            stats.truncated_tokens += truncate_pair(a, b, max_tokens, rng)
            if a and b:
                pairs.append(SegmentPair(a, b, label))
            else:
                stats.dropped_segments += 1
            target, chunk, length = _draw_target(rng, max_tokens, options.short_seq_prob), [], 0
        i += 1
    return pairs


def _cut_long_sentences(doc: list[list[int]], piece: int) -> list[list[int]]:
    """A "sentence" too long for half a sample (a list, a table, unpunctuated prose) is cut into pieces that fit,
    rather than left to truncation, which would throw most of it away."""
    if any(len(s) > piece for s in doc):
        return [s[k : k + piece] for s in doc for k in range(0, len(s), piece)]
    return doc


def _draw_target(rng: PairRandom, max_tokens: int, short_seq_prob: float) -> int:
    """A sample's target length: ``max_tokens``, or with probability ``short_seq_prob`` a shorter one."""
    return rng.randint(2, max_tokens + 1) if rng.uniform() < short_seq_prob else max_tokens


def _random_next(index: int, documents: list[list[list[int]]], wanted: int, rng: PairRandom) -> list[int]:
    """An NSP negative's segment B: sentences from a random start in another document, until ``wanted`` tokens."""
    other = rng.randint(0, len(documents) - 1)
    other += other >= index
    source = documents[other]
    start = rng.randint(0, len(source))
    b: list[int] = []
    for sentence in source[start:]:
        b += sentence
        if len(b) >= wanted:
            break
    return b


def _actual_next(
    a: list[int], rest: list[list[int]], objective: str, rng: PairRandom
) -> tuple[list[int], list[int], int]:
    """A positive: segment B is the chunk's remaining sentences (SOP swaps A and B half the time, label 0)."""
    b = list(chain.from_iterable(rest))
    if not b and len(a) >= 2:  # one sentence: split it so that it still makes an A/B pair
        cut = rng.randint(1, len(a))
        a, b = a[:cut], a[cut:]
    label = 1
    if objective == "sop" and rng.uniform() < 0.5:
        a, b, label = b, a, 0
    return a, b, label


def truncate_pair(a: list[int], b: list[int], limit: int, rng: PairRandom) -> int:
    """BERT's truncation: trim the longer segment (B on a tie) one token at a time, from the front or the back at
    random; returns tokens cut."""
    excess = len(a) + len(b) - limit
    if excess <= 0:
        return 0
    a0, a1, b0, b1 = 0, len(a), 0, len(b)
    for _ in range(excess):
        front = rng.uniform() < 0.5
        if a1 - a0 > b1 - b0:
            a0, a1 = (a0 + 1, a1) if front else (a0, a1 - 1)
        else:
            b0, b1 = (b0 + 1, b1) if front else (b0, b1 - 1)
    a[:], b[:] = a[a0:a1], b[b0:b1]
    return excess


def packed(doc: list[list[int]], limit: int) -> list[SegmentPair]:
    """Whole sentences packed up to ``limit`` tokens; a sentence longer than that spans several samples."""
    pairs, current = [], []
    for sentence in doc:
        if current and len(current) + len(sentence) > limit:
            pairs.append(SegmentPair(current, [], -1))
            current = []
        current = current + sentence
        while len(current) > limit:
            pairs.append(SegmentPair(current[:limit], [], -1))
            current = current[limit:]
    if current:
        pairs.append(SegmentPair(current, [], -1))
    return pairs
