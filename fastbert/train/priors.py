"""Output biases set from the training data before step 0, so that a run starts where counting would get it.

A randomly initialised MLM head predicts a nearly uniform distribution over the vocabulary (ln 30,522 = 10.3 nats),
and a short run spends a large share of its budget learning word frequencies alone. The shards' token counts
(``meta.json``'s ``token_counts``, written by ``prepare-data``) give those frequencies for free: the decoder bias is
set to their smoothed log-probabilities, so the model's first prediction is the unigram distribution (the tied
decoder's other term, hidden . embedding, starts near zero). ELECTRA's generator starts the same way, and its
discriminator's bias at the logit of the share of tokens it should expect to be replaced.

Only a fresh run uses this: a resumed run or ``--init-from`` loads its biases from the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def unigram_log_probs(counts: Sequence[int]) -> torch.Tensor:
    """Log-probabilities (float32, one per id) of the unigram distribution the counts estimate: the ids never seen
    share the Good-Turing estimate of the unseen mass (the share of tokens seen exactly once, at least one token's
    worth), the seen ones the rest in proportion to their counts. Unlike add-constant smoothing it does not hand a
    small corpus's mass to the tens of thousands of ids it never uses."""
    c = np.asarray(counts, dtype=np.float64)
    total, unseen = c.sum(), int((c == 0).sum())
    if total == 0:
        return torch.full((len(c),), -float(np.log(len(c))), dtype=torch.float32)
    unseen_mass = min(max((c == 1).sum(), 1.0) / total, 0.5) if unseen else 0.0
    p = np.where(c > 0, (1.0 - unseen_mass) * c / total, unseen_mass / max(unseen, 1))
    return torch.from_numpy(np.log(p)).float()


def replaced_share(counts: Sequence[int], mask_rate: float, specials_per_sample: int, meta: dict) -> float:
    """The share of a sample's tokens (special ones included, as the discriminator scores them) that ELECTRA's
    generator replaces when it draws from the unigram distribution: masked tokens, less the draws that equal the
    original (probability ``sum p^2`` for a token drawn from the same distribution)."""
    p = np.asarray(counts, dtype=np.float64)
    p = p / max(p.sum(), 1.0)
    tokens, samples = meta["num_tokens"], meta["num_samples"]
    ordinary = tokens / max(tokens + specials_per_sample * samples, 1)
    return mask_rate * ordinary * (1.0 - float(np.square(p).sum()))


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@torch.no_grad()
def init_output_biases(model: torch.nn.Module, meta: dict, mask_rate: float) -> bool:
    """Set ``model``'s output biases from the shards' ``meta`` (an MLM model, BERT's or DeBERTa's, or an ELECTRA
    pair, whose discriminator head ends in ``prediction`` or, DeBERTa's, ``classifier``); returns False, changing
    nothing, when the shards carry no token counts (prepared by an older fastbert)."""
    counts = meta.get("token_counts")
    if counts is None:
        return False
    if len(counts) != model.config.vocab_size:
        raise ValueError(
            f"meta.json: token_counts has {len(counts)} entries but the model's vocabulary has "
            f"{model.config.vocab_size}"
        )
    log_probs = unigram_log_probs(counts)
    if hasattr(model, "generator_head"):  # ELECTRA's pair, BERT's or DeBERTa's
        model.generator_head.bias.copy_(log_probs)
        specials = 2 if meta.get("objective") == "none" else 3  # [CLS] A [SEP] or [CLS] A [SEP] B [SEP]
        share = replaced_share(counts, mask_rate, specials, meta)
        head = model.discriminator_head
        (head.prediction if hasattr(head, "prediction") else head.classifier).bias.fill_(logit(share))
    else:
        model.cls.bias.copy_(log_probs)
    return True
