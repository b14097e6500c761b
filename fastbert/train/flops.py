"""Model FLOPs of a pretraining step, and model-FLOPs utilisation (MFU) against the GPU's peak.

Counted are the matrix products, the only FLOPs that matter at BERT's sizes: every linear layer, the two attention
products (on each sequence's real length, since padding never reaches the encoder), the MLM head on the masked
positions only, the pooler and the sentence classifier. A training step costs three forward passes (the backward
pass computes the input and the weight gradient of every product). Recomputation is not counted, so this is
*model* FLOPs in the sense of the PaLM paper's MFU.
"""

from __future__ import annotations

import torch

from fastbert.config import BertConfig

# Dense tensor-core peaks in TFLOP/s (no sparsity), from the vendors' data sheets: {name fragment: {dtype: peak}}.
# fp32 means TF32 tensor cores, which torch uses for fp32 matmuls when allowed.
_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def forward_flops(config: BertConfig, *, tokens: int, squared_lengths: int, sequences: int, masked: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of ``BertForPreTraining`` over ``sequences``
    sequences holding ``tokens`` tokens in all (``squared_lengths`` is the sum of each length squared) with
    ``masked`` MLM predictions."""
    h, e, inter, layers = config.hidden_size, config.embedding_width, config.intermediate_size, config.num_hidden_layers
    per_token = layers * (4 * h * h + 2 * h * inter)  # Q, K, V, output projection; the two FFN matrices
    if config.embedding_size is not None:
        per_token += e * h  # ALBERT's embedding projection
    attention = layers * 2 * h * squared_lengths  # Q K^T and P V: s*s*h multiply-adds each per sequence
    mlm = masked * (h * e + e * config.vocab_size)  # transform, then the decoder on masked rows only
    sentence = sequences * (h * h + 2 * h) if config.sentence_objective != "none" else 0
    return 2 * (tokens * per_token + attention + mlm + sentence)


def training_flops(config: BertConfig, **counts: int) -> int:
    """FLOPs of forward + backward: three forward passes' worth (``counts`` as for :func:`forward_flops`)."""
    return 3 * forward_flops(config, **counts)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for ``precision`` (fp32 | bf16 | fp16), or None when it is not a known GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in _PEAK_TFLOPS.items():  # ordered so that "H100 PCIe" is tried before "H100"
        if fragment in name:
            peak = peaks.get(precision)
            return None if peak is None else peak * 1e12
    return None
