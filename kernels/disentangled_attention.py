"""DeBERTa's disentangled self-attention: the plain-PyTorch reference a Triton kernel will be tested against.

Owns the relative-position math (the log-bucketed distance between a query and a key, and the row of the shared
relative-position table it selects) and the attention itself: content-to-content scores plus, per ``pos_att_type``,
content-to-position (each query against the position keys at its bucketed distance to the key) and
position-to-content (each key against the position queries at the same distance), all scaled by
``1 / sqrt(head_dim * (1 + number of position terms))``, then a key padding mask, softmax, dropout and the values.

Layout: padded ``[batch, heads, seq, head_dim]`` with a boolean key mask ``[batch, seq]``. The full ``[seq, seq]``
score matrix (and a ``[seq, 2 * span]`` one per position term) is built in memory; no kernel exists yet, so this
is what runs on every device. A query row whose keys are all masked gets uniform weights over its padded keys
(finite, never NaN); the model zeroes such rows afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POSITION_TERMS = ("c2p", "p2c")


def log_bucket(distance: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """DeBERTa's log-bucketed relative distance, as integers of ``distance``'s sign.

    Distances with ``|d| <= buckets // 2`` stay as they are; longer ones are compressed logarithmically so that
    ``|d| = max_distance - 1`` lands on ``buckets - 1`` (for even ``buckets``), and farther ones beyond it (the
    table lookup clamps them). Odd in ``d``: ``log_bucket(-d) == -log_bucket(d)``.
    """
    half = buckets // 2
    magnitude = distance.abs()
    # Distances inside the exact band are replaced by half - 1 before the log, so that log(0) is never taken; the
    # final where() keeps their exact value anyway. The arithmetic is float32, in this order, because a bucket is an
    # integer after ceil(): another precision or order moves a distance at a bucket edge into the next bucket, and
    # checkpoints were trained with these edges.
    safe = torch.where(magnitude < half, torch.full_like(magnitude, half - 1), magnitude).to(torch.float32)
    growth = torch.log(torch.tensor((max_distance - 1) / half, dtype=torch.float32, device=distance.device))
    compressed = torch.ceil(torch.log(safe / half) / growth * (half - 1)) + half
    return torch.where(magnitude <= half, distance, (compressed * distance.sign()).to(distance.dtype))


def relative_positions(
    length: int, buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[length, length]`` int64: the (bucketed, when ``buckets > 0``) distance ``i - j`` from query ``i`` to key
    ``j``."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    distance = pos[:, None] - pos[None, :]
    return log_bucket(distance, buckets, max_distance) if buckets > 0 else distance


def position_span(buckets: int, max_distance: int) -> int:
    """Half the height of the relative-position table: the bucket count, or the largest distance without buckets."""
    return buckets if buckets > 0 else max_distance


def relative_index(
    length: int, buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[length, length]`` int64: the row of the ``2 * span`` relative-position table that query ``i`` and key
    ``j`` share, ``clamp(distance(i, j) + span, 0, 2 * span - 1)``. The same row serves both position terms:
    content-to-position reads the position key there, position-to-content the position query."""
    span = position_span(buckets, max_distance)
    return (relative_positions(length, buckets, max_distance, device) + span).clamp_(0, 2 * span - 1)


def score_scale(head_dim: int, position_terms: int) -> float:
    """The factor every score term is multiplied by: ``1 / sqrt(head_dim * (1 + position_terms))``."""
    return 1.0 / math.sqrt(head_dim * (1 + position_terms))


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_index: torch.Tensor,
    pos_key: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    position_terms: int | None = None,
) -> torch.Tensor:
    """Disentangled attention over a padded batch.

    q, k, v: ``[batch, heads, seq, head_dim]``; ``rel_index``: ``[seq, seq]`` rows of the position table
    (``relative_index``); ``pos_key`` / ``pos_query``: ``[heads, 2 * span, head_dim]``, the table projected by the
    key / query projection, or None to leave out content-to-position / position-to-content; ``key_mask``:
    ``[batch, seq]`` True for real tokens, or None; ``dropout_p``: attention-probability dropout (0 at evaluation).
    ``position_terms`` (default: the terms given) sets the scale's count, which transformers takes from the config
    even for a term whose inputs are absent. Returns ``[batch, heads, seq, head_dim]``.
    """
    if position_terms is None:
        position_terms = (pos_key is not None) + (pos_query is not None)
    scale = score_scale(q.shape[-1], position_terms)
    seq = q.shape[-2]
    scores = q @ k.transpose(-1, -2)
    if pos_key is not None:
        # content -> position: query i against the position key of its distance to key j
        to_positions = q @ pos_key.transpose(-1, -2)  # [batch, heads, seq, 2 * span]
        scores = scores + torch.gather(to_positions, -1, rel_index.expand(*to_positions.shape[:-1], seq))
    if pos_query is not None:
        # position -> content: key j against the position query of the same distance, gathered key-major
        from_positions = k @ pos_query.transpose(-1, -2)  # [batch, heads, seq (keys), 2 * span]
        by_key = torch.gather(from_positions, -1, rel_index.t().expand(*from_positions.shape[:-1], seq))
        scores = scores + by_key.transpose(-1, -2)
    scores = scores * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v
