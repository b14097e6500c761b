"""Model FLOPs of a pretraining step, and model-FLOPs utilisation (MFU) against the GPU's peak.

Counted are the matrix products, the only FLOPs that matter at BERT's sizes: every linear layer, the two attention
products (on each sequence's real length, since padding never reaches the encoder), the MLM head on the masked
positions only, the pooler and the sentence classifier. A training step costs three forward passes (the backward
pass computes the input and the weight gradient of every product). Recomputation is not counted, so this is
*model* FLOPs in the sense of the PaLM paper's MFU.

It is also the one home of the GPUs' data-sheet peaks (``PEAKS``: dense FLOP/s per precision, fp32 both as TF32
tensor cores and as plain CUDA cores, and DRAM bandwidth), which the drivers' MFU and benchmarks/ use alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fastbert.config import BertConfig


@dataclass(frozen=True)
class GpuPeak:
    """One GPU's data-sheet peaks: dense (no sparsity) tensor-core FLOP/s per precision, the plain fp32 FLOP/s of
    its CUDA cores, and its DRAM (HBM or GDDR) bandwidth in bytes/s. ``tf32`` is None where there are no TF32
    tensor cores (Volta), ``bf16`` where there are no bf16 ones."""

    name: str
    pattern: str  # a regular expression searched for in torch.cuda.get_device_name()
    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float
    bandwidth: float

    def flops(self, precision: str, tf32: bool = True) -> float | None:
        """Dense peak FLOP/s of matmuls in ``precision`` (fp32 | bf16 | fp16). For fp32 that is the TF32
        tensor-core peak when ``tf32`` (torch uses TF32 for fp32 matmuls only when allowed:
        ``torch.backends.cuda.matmul.allow_tf32``) and the CUDA cores' fp32 peak otherwise."""
        if precision == "fp32":
            return self.tf32 if tf32 and self.tf32 is not None else self.fp32
        if precision in ("bf16", "fp16"):
            return getattr(self, precision)
        raise ValueError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")


_T = 1e12
# From NVIDIA's data sheets (dense figures: the sheets' tensor-core numbers marked * are with 2:4 sparsity, twice
# these). Tried in order, so each more specific part comes before the one whose name it contains.
PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("H200 NVL", r"\bH200 NVL\b", 835 * _T, 835 * _T, 417.5 * _T, 60 * _T, 4.8e12),
    GpuPeak("H200 SXM", r"\bH200\b", 989 * _T, 989 * _T, 494.5 * _T, 67 * _T, 4.8e12),
    GpuPeak("H100 NVL", r"\bH100 NVL\b", 835 * _T, 835 * _T, 417.5 * _T, 60 * _T, 3.9e12),
    GpuPeak("H100 PCIe", r"\bH100 PCIe\b", 756 * _T, 756 * _T, 378 * _T, 51 * _T, 2.0e12),
    GpuPeak("H100 SXM", r"\bH100\b", 989 * _T, 989 * _T, 494.5 * _T, 67 * _T, 3.35e12),
    GpuPeak("A100 SXM 80GB", r"\bA100-SXM4-80GB\b", 312 * _T, 312 * _T, 156 * _T, 19.5 * _T, 2.039e12),
    GpuPeak("A100 PCIe 80GB", r"\bA100 80GB PCIe\b", 312 * _T, 312 * _T, 156 * _T, 19.5 * _T, 1.935e12),
    GpuPeak("A100 40GB", r"\bA100\b", 312 * _T, 312 * _T, 156 * _T, 19.5 * _T, 1.555e12),
    # AWS's A10G has no NVIDIA data sheet: AWS's tensor figures, GA102's fp32 rate at its clock.
    GpuPeak("A10G", r"\bA10G\b", 70 * _T, 70 * _T, 35 * _T, 31.5 * _T, 6.0e11),
    GpuPeak("A10", r"\bA10\b", 125 * _T, 125 * _T, 62.5 * _T, 31.2 * _T, 6.0e11),
    GpuPeak("L40S", r"\bL40S\b", 362 * _T, 362 * _T, 183 * _T, 91.6 * _T, 8.64e11),
    GpuPeak("L4", r"\bL4\b", 121 * _T, 121 * _T, 60 * _T, 30.3 * _T, 3.0e11),
    GpuPeak("V100S", r"\bV100S\b", None, 130 * _T, None, 16.4 * _T, 1.134e12),
    GpuPeak("V100 PCIe", r"\bV100-PCIE\b", None, 112 * _T, None, 14 * _T, 9.0e11),
    GpuPeak("V100 SXM2", r"\bV100\b", None, 125 * _T, None, 15.7 * _T, 9.0e11),
)


def gpu_peak(device: torch.device | str | int | None = None) -> GpuPeak | None:
    """The table's entry for ``device`` (default: the current CUDA device), or None for a CPU, no CUDA, or a GPU
    the table does not know."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for peak in PEAKS if re.search(peak.pattern, name)), None)


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


def deberta_forward_flops(config, *, tokens: int, squared_lengths: int, sequences: int, masked: int) -> int:
    """``forward_flops`` for a ``DebertaConfig``'s MLM model: BERT's projections, FFN and MLM head, and attention with
    one more query-key product per pair of tokens for each position term (c2p, p2c: a dot product with the position
    key or query at the pair's relative position), plus each layer's projection of the relative-position table
    (``2 * position_span`` rows) into position keys and, for p2c, queries (shared or separate projections alike: one
    product each)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    terms = len(config.pos_att_type)
    per_token = layers * (4 * h * h + 2 * h * inter)
    attention = layers * (2 + terms) * h * squared_lengths
    table = layers * terms * 2 * config.position_span * h * h if terms else 0
    mlm = masked * (h * h + h * config.vocab_size)
    del sequences  # no pooler or sentence head in DeBERTa's pretraining
    return 2 * (tokens * per_token + attention + table + mlm)


def training_flops(config, **counts: int) -> int:
    """FLOPs of forward + backward: three forward passes' worth (``counts`` as for :func:`forward_flops`), for a
    ``BertConfig`` or a ``DebertaConfig``."""
    if isinstance(config, BertConfig):
        return 3 * forward_flops(config, **counts)
    return 3 * deberta_forward_flops(config, **counts)


def peak_flops(device: torch.device, precision: str, tf32: bool = True) -> float | None:
    """The device's dense peak FLOP/s for ``precision`` (fp32 | bf16 | fp16), or None when it is not a known GPU
    or has no tensor cores for ``precision``. For fp32, ``tf32`` says whether fp32 matmuls run on TF32 tensor
    cores (the TF32 peak) or not (the CUDA cores' fp32 peak): MFU must divide by the peak of what actually ran."""
    peak = gpu_peak(device)
    return None if peak is None else peak.flops(precision, tf32)


def peak_bandwidth(device: torch.device | None = None) -> float | None:
    """The device's DRAM bandwidth in bytes/s from its data sheet, or None when it is not a known GPU."""
    peak = gpu_peak(device)
    return None if peak is None else peak.bandwidth
