"""What a masked-LM's held-out loss is measured against: one fixed draw of masks over held-out text, and two count
models of the training text scored on exactly those masked positions (``count_baselines``). A model that learnt
nothing but token frequencies scores the unigram loss; one that learnt only which token follows which, the bigram
loss. ``fastbert demo`` and benchmarks/bench_time_to_quality.py print a model's loss beside both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_RATE = 0.15


@dataclass
class FixedMasks:
    """Rows of ``[CLS] content [SEP]`` with one fixed draw of masks; ``labels`` is -100 where nothing is scored."""

    input_ids: np.ndarray  # [rows, seq], masked
    labels: np.ndarray  # [rows, seq]


def fixed_masks(
    ids: np.ndarray, seq_len: int, cls: int, sep: int, mask: int, vocab_size: int, seed: int, rate: float = MASK_RATE
) -> FixedMasks:
    """Cut a token stream into rows of ``seq_len`` and mask ``rate`` of each row's content positions once:
    80% [MASK], 10% a uniformly random token, 10% unchanged (BERT's rule, as both training codes apply it)."""
    width = seq_len - 2
    rows = len(ids) // width
    if rows == 0:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one row of {width}")
    content = ids[: rows * width].reshape(rows, width).astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen = rng.random(content.shape) < rate
    chosen[~chosen.any(axis=1), 0] = True  # every row scores at least one token
    action = rng.random(content.shape)
    random_ids = rng.integers(0, vocab_size, content.shape)
    masked = content.copy()
    masked[chosen & (action < 0.8)] = mask
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_ids[swap]
    labels = np.where(chosen, content, -100)
    edge = np.full((rows, 1), -100)
    return FixedMasks(
        input_ids=np.concatenate([np.full((rows, 1), cls), masked, np.full((rows, 1), sep)], axis=1),
        labels=np.concatenate([edge, labels, edge], axis=1),
    )


def count_baselines(train_docs: list[np.ndarray], masks: FixedMasks, vocab_size: int, mask_id: int) -> dict:
    """Held-out cross-entropy of two count models on the networks' masked positions, from the training text's ids:
    ``unigram`` (``fastbert.train.priors.unigram_log_probs``, the distribution a fresh fastbert model starts from)
    and ``bigram``, which sees the visible left neighbour (the input token before the masked one, as the networks
    see it: when that is [MASK] or [CLS] it falls back to the unigram) and interpolates with the unigram by
    Witten-Bell (weight ``c(a) / (c(a) + T(a))``, ``T(a)`` the distinct successors of ``a``), so every id keeps a
    probability."""
    from fastbert.train.priors import unigram_log_probs

    counts = np.zeros(vocab_size, dtype=np.int64)
    pairs = []
    for doc in train_docs:
        doc = np.asarray(doc, dtype=np.int64)
        counts += np.bincount(doc, minlength=vocab_size)
        pairs.append(doc[:-1] * vocab_size + doc[1:])
    unigram = unigram_log_probs(counts).double().numpy()
    keys, pair_counts = np.unique(np.concatenate(pairs), return_counts=True)
    left = keys // vocab_size
    left_total = np.bincount(left, weights=pair_counts, minlength=vocab_size)
    successors = np.bincount(left, minlength=vocab_size).astype(np.float64)

    where = masks.labels != -100
    target = masks.labels[where].astype(np.int64)
    rows, cols = np.nonzero(where)
    visible = masks.input_ids[rows, cols - 1].astype(np.int64)
    p_uni = np.exp(unigram[target])
    query = visible * vocab_size + target
    found = np.searchsorted(keys, query)
    found = np.minimum(found, len(keys) - 1)
    c_pair = np.where(keys[found] == query, pair_counts[found], 0).astype(np.float64)
    c_left, t_left = left_total[visible], successors[visible]
    seen = (c_left > 0) & (visible != mask_id) & (cols > 1)
    p_bi = np.where(seen, (c_pair + t_left * p_uni) / np.maximum(c_left + t_left, 1.0), p_uni)
    return {"unigram": float(-np.log(p_uni).mean()), "bigram": float(-np.log(p_bi).mean())}


def masked_lm_loss(model, masks: FixedMasks, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats) of a fastbert ``BertForPreTraining`` over every masked position of ``masks``."""
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(masks.input_ids), batch_size):
            ids = torch.from_numpy(masks.input_ids[start : start + batch_size]).to(device)
            labels = torch.from_numpy(masks.labels[start : start + batch_size]).to(device)
            logits = model(ids, attention_mask=torch.ones_like(ids)).prediction_logits.float()
            where = labels != -100
            total += torch.nn.functional.cross_entropy(logits[where], labels[where], reduction="sum").item()
            count += int(where.sum())
    return total / count
