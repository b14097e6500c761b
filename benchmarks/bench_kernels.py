"""fastbert's Triton kernels against torch: measured on a GPU, planned on paper without one.

With CUDA (``measure``): each kernel forward + backward in bf16 against what a user would otherwise run: SDPA with
the flash backend on the padded batch and on the packed one (a jagged nested tensor), at sequence 128 and 512
with 30% padding; ``F.layer_norm`` after the adds; bias + ``F.gelu``; full-logits ``F.cross_entropy`` (as
transformers computes it) and the masked rows' cross-entropy, with peak memory; one LAMB step over BERT-base's
parameters against a ``torch._foreach`` LAMB and DeepSpeed's / apex's fused LAMB when they load (``--compile``
adds ``torch.compile`` of each eager sequence); DeBERTa's disentangled attention (content-to-position and
position-to-content, DeBERTa-v3-base's 256 log buckets) against the unfused sequence transformers runs, at sequence
512 (2048: benchmarks/gpu_acceptance.py's deberta section). Time from ``triton.testing.do_bench``, useful TFLOP/s (real
tokens, masked rows) and GB/s (the fused kernel's minimum bytes over the time), and the share of the device's
peak from fastbert/train/flops.py (dense bf16 for attention and the loss, DRAM bandwidth for the rest).
benchmarks/gpu_acceptance.py runs the same measurement (and, in its dry run, on the CPU under the Triton
interpreter at tiny shapes).

Without CUDA: the resource table of the ahead-of-time compile (benchmarks/results/kernel_resources.json, written
by tests/kernels/test_aot_compile.py) and, per kernel, the analytic FLOPs and bytes moved, fused against the
unfused torch sequence, with the ideal time on H100, H200 and A100 (the larger of FLOPs over bf16 dense peak and
bytes over DRAM bandwidth). Nothing in the paper plan is measured.

Byte counts are the minimum traffic to DRAM (each tensor read or written once per pass, 2-byte elements, a dropout
mask as 1 byte per element in torch); FLOPs count a multiply-add as 2.

    python benchmarks/bench_kernels.py [--compile]  # JSON to benchmarks/results/kernels_cuda.json or kernels_plan.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastbert.train.flops import PEAKS, GpuPeak, gpu_peak

RESULTS = Path(__file__).resolve().parent / "results"
# BERT-base pretraining at sequence 512: 32 sequences, 15% of tokens masked.
BATCH, SEQ, HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 32, 512, 768, 12, 64, 3072, 30522
TOKENS = BATCH * SEQ
MASKED = int(0.15 * TOKENS)
SPAN = 256  # DeBERTa-v3-base: position_buckets 256, so each position table has 2 * 256 rows
PLAN_GPUS = {"H100": "H100 SXM", "H200": "H200 SXM", "A100": "A100 SXM 80GB"}  # the paper plan's columns


def table_peak(name: str) -> GpuPeak:
    """An entry of fastbert.train.flops.PEAKS by its name."""
    return next(peak for peak in PEAKS if peak.name == name)


@dataclass
class Plan:
    kernel: str
    shape: str
    flops: float
    fused_bytes: float
    unfused_bytes: float
    note: str

    def ideal_us(self, device: str = "H100") -> float:
        peak = table_peak(PLAN_GPUS[device])
        return max(self.flops / peak.bf16, self.fused_bytes / peak.bandwidth) * 1e6


def plans() -> list[Plan]:
    """Forward + backward of each kernel at the shapes above."""
    e, e_ffn, scores = TOKENS * HIDDEN, TOKENS * INTERMEDIATE, BATCH * HEADS * SEQ * SEQ
    mv = MASKED * VOCAB
    attention_fwd = 4 * BATCH * HEADS * SEQ * SEQ * HEAD_DIM
    return [
        Plan(
            "residual_layer_norm",
            f"[{TOKENS}, {HIDDEN}] post-LN, bias + dropout + residual",
            flops=20 * e,
            # fwd: read x, residual; write normalized, summed. bwd: read dy, summed; write dresidual, dx.
            fused_bytes=2 * (4 * e) + 2 * (4 * e),
            # fwd: x+b (2), dropout (2 + mask 1w) , +residual (3), layer_norm (2); bwd: LN (3), dropout (2 + mask
            # 1r), bias grad sum (1); in 2-byte elements except the 1-byte mask
            unfused_bytes=2 * (2 + 2 + 3 + 2) * e + e + 2 * (3 + 2 + 1) * e + e,
            note="memory-bound; mean and rstd saved, mask regenerated from the seed",
        ),
        Plan(
            "bias_gelu",
            f"[{TOKENS}, {INTERMEDIATE}] exact erf GELU",
            flops=30 * e_ffn,
            fused_bytes=2 * (2 * e_ffn) + 2 * (3 * e_ffn),  # fwd: read x, write y; bwd: read dy, x; write dx
            unfused_bytes=2 * (4 * e_ffn) + 2 * (4 * e_ffn),  # fwd: add, gelu; bwd: gelu grad, bias-grad sum
            note="memory-bound; would vanish into a GEMM epilogue",
        ),
        Plan(
            "attention",
            f"B={BATCH} S={SEQ} heads={HEADS} d={HEAD_DIM}, dropout 0.1",
            flops=attention_fwd * 3.5,  # forward 2 matmuls, backward 5 (QK^T recomputed)
            # fwd: read q, k, v; write o (+ lse); bwd: read q, k, v, o, do; write dq, dk, dv
            fused_bytes=2 * 4 * e + 2 * 8 * e + 8 * TOKENS * HEADS,
            # eager math: fwd writes scores, softmax reads/writes them, dropout reads/writes them + mask, PV reads
            # them; bwd reads/writes about twice as much
            unfused_bytes=3 * (2 * 6 * scores + 2 * scores) + 2 * 12 * e,
            note="compute-bound at S=512; no S x S matrix in memory",
        ),
        Plan(
            "mlm_loss",
            f"M={MASKED} masked rows, V={VOCAB}, H={HIDDEN}",
            flops=3 * 2 * mv * HIDDEN,  # logits, d_hidden, d_weight
            # logits written once (bf16), read twice by the kernel, gradient written once, read by two matmuls
            fused_bytes=2 * 6 * mv + 2 * (MASKED * HIDDEN * 3 + VOCAB * HIDDEN * 3),
            # naive: logits bf16 w, fp32 upcast r/w, log_softmax r/w, loss grad w, softmax grad r/w, bf16 cast r/w,
            # then the two matmuls read it
            unfused_bytes=mv * (2 + 2 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 2 + 2 * 2)
            + 2 * (MASKED * HIDDEN * 3 + VOCAB * HIDDEN * 3),
            note="matmul-bound; no [M, V] fp32 tensor, peak memory one row block",
        ),
        disentangled_plan(),
    ]


def disentangled_plan() -> Plan:
    """DeBERTa-v3-base's attention (c2p and p2c over 2 * SPAN position rows) at the BERT shapes above. Useful FLOPs
    are the unfused sequence's matmuls: forward QK^T, PV and the two [S, 2 * SPAN] position scores; backward two
    matmuls for each; the three score matmuls again in the fused backward (recomputed, as the attention row counts).
    The unfused bytes follow transformers' eager sequence: the content scores, each position score matrix and its
    gather to [S, S], the two adds, the masked softmax (two passes), dropout (and its 1-byte mask), PV's read; the
    backward about twice the forward."""
    e, scores = TOKENS * HIDDEN, BATCH * HEADS * SEQ * SEQ
    positions = BATCH * HEADS * SEQ * 2 * SPAN
    content, position = 2 * SEQ * SEQ * HEAD_DIM, 2 * SEQ * 2 * SPAN * HEAD_DIM  # one matmul, per (batch, head)
    tables = HEADS * 2 * SPAN * HEAD_DIM  # one projected position table
    return Plan(
        "disentangled_attn",
        f"DeBERTa-v3-base B={BATCH} S={SEQ} heads={HEADS} d={HEAD_DIM}, c2p + p2c, 2x{SPAN} position rows",
        flops=BATCH * HEADS * (7 * content + 8 * position),
        # fwd: read q, k, v and both tables, write o (+ lse); bwd: read q, k, v, o, do and the tables, write dq, dk,
        # dv and both table gradients (fp32, per distance: 2 * SEQ rows)
        fused_bytes=2 * 12 * e + 2 * 4 * tables + 2 * 4 * HEADS * 2 * SEQ * HEAD_DIM + 8 * TOKENS * HEADS,
        unfused_bytes=3 * (2 * 16 * scores + 2 * 4 * positions + scores) + 2 * 12 * e + 2 * 4 * tables,
        note="compute-bound; no [S, S] or [S, 2k] matrix in memory",
    )


def resource_table() -> list[dict]:
    path = RESULTS / "kernel_resources.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())["kernels"]


def resource_summary(rows: list[dict]) -> list[dict]:
    """One line per kernel and architecture over all its compiled configurations: the worst registers, spills and
    shared memory (the full table stays in kernel_resources.json)."""
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        entry = groups.setdefault(
            (row["kernel"], row["arch"]),
            {
                "kernel": row["kernel"],
                "arch": row["arch"],
                "configs": 0,
                "max_registers": 0,
                "spills": 0,
                "max_shared": 0,
            },
        )
        entry["configs"] += 1
        entry["max_registers"] = max(entry["max_registers"], row["registers"])
        entry["spills"] += row["spill_stores"] + row["spill_loads"]
        entry["max_shared"] = max(entry["max_shared"], row["shared"])
    return list(groups.values())


def print_plan() -> dict:
    summary = resource_summary(resource_table())
    print("Resource table (ahead-of-time compile; every configuration in benchmarks/results/kernel_resources.json):")
    if not summary:
        print("  missing: run python -m fastbert.kernels.aot --out benchmarks/results/kernel_resources.json")
    print(f"  {'kernel':<34} {'arch':<6} {'configs':>7} {'max regs':>8} {'spills':>6} {'max shared':>10}")
    for entry in summary:
        print(
            f"  {entry['kernel']:<34} {entry['arch']:<6} {entry['configs']:>7} {entry['max_registers']:>8} "
            f"{entry['spills']:>6} {entry['max_shared']:>10}"
        )
    print()
    print(f"Analytic plan, forward + backward, bf16, BERT-base at sequence {SEQ} (not measured: no GPU here):")
    print(
        f"  {'kernel':<20} {'GFLOP':>8} {'fused MB':>9} {'unfused MB':>11} {'bytes saved':>11} "
        f"{'ideal H100 us':>14} {'ideal H200 us':>14} {'ideal A100 us':>14}  note"
    )
    table = []
    for plan in plans():
        saved = 1 - plan.fused_bytes / plan.unfused_bytes
        print(
            f"  {plan.kernel:<20} {plan.flops / 1e9:>8.1f} {plan.fused_bytes / 1e6:>9.1f} "
            f"{plan.unfused_bytes / 1e6:>11.1f} {saved:>10.0%} {plan.ideal_us('H100'):>14.1f} "
            f"{plan.ideal_us('H200'):>14.1f} {plan.ideal_us('A100'):>14.1f}  {plan.note}"
        )
        table.append(
            {
                **asdict(plan),
                "ideal_us_h100": round(plan.ideal_us("H100"), 1),
                "ideal_us_h200": round(plan.ideal_us("H200"), 1),
                "ideal_us_a100": round(plan.ideal_us("A100"), 1),
            }
        )
    print(
        "\nGoals on paper for H100: attention fwd+bwd at >= 60% of bf16 dense peak, LayerNorm and loss at >= 80% "
        "of HBM bandwidth; unmeasured until a GPU is available."
    )
    return {"measured": False, "plan": table, "resources": summary}


# Measured ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """The shapes of a measured run. ``attention_seqs`` pairs a padded length with its batch; lengths are drawn
    so that ``padding`` of the padded batch is padding (BERT's 30% is typical of sentence-pair samples)."""

    tokens: int = TOKENS  # LayerNorm and GELU rows; the MLM loss's masked rows are 15% of them
    hidden: int = HIDDEN
    intermediate: int = INTERMEDIATE
    vocab: int = VOCAB
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    attention_seqs: tuple[tuple[int, int], ...] = ((128, 256), (512, 64))  # (sequence, batch)
    padding: float = 0.3
    lamb_layers: int = 12  # LAMB over BERT-base's parameter shapes (110M parameters)
    # Disentangled attention: (sequence, batch) without padding, DeBERTa-v3-base's position settings.
    deberta_seqs: tuple[tuple[int, int], ...] = ((512, 16),)  # 2048: gpu_acceptance.py's deberta section
    position_buckets: int = SPAN
    max_relative_positions: int = 512


BERT_BASE = Shapes()
# A run that exercises every path in seconds, on the CPU under the Triton interpreter (the acceptance dry run).
TINY = Shapes(
    tokens=32,
    hidden=32,
    intermediate=64,
    vocab=256,
    heads=2,
    head_dim=32,
    attention_seqs=((16, 3), (32, 2)),
    lamb_layers=1,
    deberta_seqs=((16, 1),),  # past the bucket boundary: 4 buckets a side
    position_buckets=4,
    max_relative_positions=16,
)


class Timer:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA; on the CPU (interpreter runs) the median of a
    few ``time.perf_counter`` calls after one warm-up."""

    def __init__(self, device: torch.device, reps: int = 3) -> None:
        self.device, self.reps = device, reps

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100))
        fn()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3


def peak_memory(fn, device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _fwd_bwd(make):
    """A closure running forward + backward of ``make()``'s (output, inputs) once."""

    def run():
        out, inputs = make()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), inputs)

    return run


def _lengths(seq: int, batch: int, padding: float, gen: torch.Generator) -> list[int]:
    """``batch`` lengths in [1, seq] whose total is ``(1 - padding) * seq * batch`` (to one token)."""
    target = round((1 - padding) * seq * batch)
    lengths = torch.randint(max(1, int(seq * (1 - 2 * padding))), seq + 1, (batch,), generator=gen).tolist()
    while sum(lengths) != target:  # nudge towards the target, keeping every length in [1, seq]
        i = int(torch.randint(0, batch, (1,), generator=gen))
        step = 1 if sum(lengths) < target else -1
        if 1 <= lengths[i] + step <= seq:
            lengths[i] += step
    return lengths


@dataclass
class Case:
    kernel: str
    shape: str
    providers: dict  # name -> callable running forward + backward (or one optimizer step)
    flops: float = 0.0  # useful FLOPs (on real tokens, masked rows): what TFLOP/s and the share of peak count
    bytes: float = 0.0  # the fused kernel's minimum DRAM traffic: what GB/s counts
    bound: str = "compute"  # "compute": share of the precision's dense peak; "memory": share of DRAM bandwidth
    memory: tuple[str, ...] = ()  # providers whose peak memory is measured
    notes: dict = field(default_factory=dict)  # provider -> why it did not run


def attention_cases(shapes: Shapes, device: torch.device, dt: torch.dtype) -> list[Case]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastbert import ops

    h, d, p = shapes.heads, shapes.head_dim, 0.1
    # Flash on CUDA, as a user of SDPA would pick; the CPU (dry run) has no flash kernel with dropout.
    flash = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if device.type == "cuda" else contextlib.nullcontext
    cases = []
    for seq, batch in shapes.attention_seqs:
        gen = torch.Generator().manual_seed(seq)
        lengths = _lengths(seq, batch, shapes.padding, gen)
        total = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        offsets = cu.long()
        q, k, v = (torch.randn(total, h, d, generator=gen).to(device, dt).requires_grad_() for _ in range(3))
        qp, kp, vp = (torch.randn(batch, h, seq, d, generator=gen).to(device, dt).requires_grad_() for _ in range(3))

        def fastbert(q=q, k=k, v=v, cu=cu, seq=seq):
            return ops.attention(q, k, v, cu, seq, p), (q, k, v)

        def sdpa_padded(qp=qp, kp=kp, vp=vp):
            with flash():  # over every padded position: flash takes no padding mask
                return F.scaled_dot_product_attention(qp, kp, vp, dropout_p=p), (qp, kp, vp)

        def sdpa_packed(q=q, k=k, v=v, offsets=offsets):
            nested = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
            with flash():  # varlen flash through a jagged nested tensor: real tokens only
                out = F.scaled_dot_product_attention(*nested, dropout_p=p)
            return out.transpose(1, 2).values(), (q, k, v)

        squares = sum(n * n for n in lengths)
        cases.append(
            Case(
                "attention",
                f"seq {seq} x {batch}, {total} real tokens ({1 - total / (seq * batch):.0%} padding), heads {h}, "
                f"d {d}, dropout {p}",
                {"fastbert": fastbert, "sdpa_flash_padded": sdpa_padded, "sdpa_flash_packed": sdpa_packed},
                flops=3.5 * 4 * squares * h * d,  # forward 2 matmuls, backward 5 (QK^T recomputed)
                bytes=2 * (4 + 8) * total * h * d,
            )
        )
    return cases


def disentangled_cases(shapes: Shapes, device: torch.device, dt: torch.dtype) -> list[Case]:
    """DeBERTa's attention with both position terms: the fused kernel (``ops.disentangled_attention``, no
    ``[S, S]`` index) against the unfused sequence transformers runs (the reference: content scores, the position
    score matrices gathered at the log-bucketed distances, softmax, PV), on full-length sequences."""
    from fastbert import ops
    from fastbert.kernels import disentangled_attention as dsa

    h, d = shapes.heads, shapes.head_dim
    buckets, max_distance = shapes.position_buckets, shapes.max_relative_positions
    span = dsa.position_span(buckets, max_distance)
    cases = []
    for seq, batch in shapes.deberta_seqs:
        gen = torch.Generator().manual_seed(seq + 1)
        q, k, v = (torch.randn(batch, h, seq, d, generator=gen).to(device, dt).requires_grad_() for _ in range(3))
        pos_key, pos_query = (torch.randn(h, 2 * span, d, generator=gen).to(device, dt).requires_grad_() for _ in "kq")
        rel_index = dsa.relative_index(seq, buckets, max_distance, device)
        inputs = (q, k, v, pos_key, pos_query)

        def fastbert(q=q, k=k, v=v, pos_key=pos_key, pos_query=pos_query, inputs=inputs):
            out = ops.disentangled_attention(
                q, k, v, None, pos_key, pos_query, None, position_buckets=buckets, max_relative_positions=max_distance
            )
            return out, inputs

        def eager(q=q, k=k, v=v, pos_key=pos_key, pos_query=pos_query, rel_index=rel_index, inputs=inputs):
            return dsa.reference(q, k, v, rel_index, pos_key, pos_query), inputs

        content, position = 2 * seq * seq * d, 2 * seq * 2 * span * d
        tokens = batch * seq
        cases.append(
            Case(
                "disentangled_attn",
                f"seq {seq} x {batch}, heads {h}, d {d}, c2p + p2c, {2 * span} position rows",
                {"fastbert": fastbert, "torch_eager": eager},
                flops=batch * h * (7 * content + 8 * position),  # as disentangled_plan counts them
                bytes=2 * 12 * tokens * h * d + 2 * 4 * h * 2 * span * d + 2 * 4 * h * 2 * seq * d,
                memory=("fastbert", "torch_eager"),
            )
        )
    return cases


def elementwise_cases(shapes: Shapes, device: torch.device, dt: torch.dtype) -> list[Case]:
    import torch.nn.functional as F

    from fastbert import ops

    gen = torch.Generator().manual_seed(1)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dt).requires_grad_()

    n, hid, inter = shapes.tokens, shapes.hidden, shapes.intermediate
    x, r, xb, w, b = leaf(n, hid), leaf(n, hid), leaf(hid), leaf(hid), leaf(hid)
    hh, hb = leaf(n, inter), leaf(inter)
    e, e_ffn = n * hid, n * inter
    return [
        Case(
            "residual_layer_norm",
            f"[{n}, {hid}] post-LN, bias + dropout 0.1 + residual",
            {
                "fastbert": lambda: (ops.residual_layer_norm(x, r, w, b, 1e-12, xb, 0.1, True), (x, r, w, b, xb)),
                "torch_add_layer_norm": lambda: (
                    F.layer_norm(F.dropout(x + xb, 0.1) + r, (hid,), w, b, 1e-12),
                    (x, r, w, b, xb),
                ),
            },
            flops=20 * e,
            bytes=2 * (4 * e) + 2 * (4 * e),
            bound="memory",
        ),
        Case(
            "bias_gelu",
            f"[{n}, {inter}] exact erf GELU",
            {
                "fastbert": lambda: (ops.bias_gelu(hh, hb), (hh, hb)),
                "torch_bias_gelu": lambda: (F.gelu(hh + hb), (hh, hb)),
            },
            flops=30 * e_ffn,
            bytes=2 * (2 * e_ffn) + 2 * (3 * e_ffn),
            bound="memory",
        ),
    ]


def mlm_loss_case(shapes: Shapes, device: torch.device, dt: torch.dtype) -> Case:
    import torch.nn.functional as F

    from fastbert import ops

    gen = torch.Generator().manual_seed(2)
    n, hid, vocab = shapes.tokens, shapes.hidden, shapes.vocab
    masked = max(1, int(0.15 * n))
    hidden = (torch.randn(n, hid, generator=gen)).to(device, dt).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=gen) * 0.05).to(device, dt).requires_grad_()
    bias = torch.zeros(vocab).to(device, dt).requires_grad_()
    positions = torch.randperm(n, generator=gen)[:masked].sort().values.to(device)
    targets = torch.randint(0, vocab, (masked,), generator=gen).to(device)
    labels = torch.full((n,), -100, dtype=torch.long, device=device)
    labels[positions] = targets

    def fastbert():  # what the model does: gather the masked rows, then the vocabulary-chunked kernel
        return ops.mlm_loss(hidden[positions], weight, bias, targets), (hidden, weight, bias)

    def full_logits():  # what transformers does: logits for every position, cross-entropy ignoring the rest
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels), (hidden, weight, bias)

    def masked_logits():  # the eager reference on the masked rows only
        return F.cross_entropy(F.linear(hidden[positions], weight, bias).float(), targets), (hidden, weight, bias)

    providers = {"fastbert": fastbert, "torch_full_logits": full_logits, "torch_masked_logits": masked_logits}
    return Case(
        "mlm_loss",
        f"{n} tokens, {masked} masked, V={vocab}, H={hid}",
        providers,
        flops=3 * 2 * masked * vocab * hid,  # logits, d_hidden, d_weight on the masked rows
        bytes=2 * 6 * masked * vocab + 2 * 3 * (masked * hid + vocab * hid),
        memory=tuple(providers),
    )


def bert_parameter_shapes(shapes: Shapes) -> list[tuple[int, ...]]:
    """BERT's parameter tensors (embeddings, per layer QKV/output/FFN/LayerNorms, pooler, heads)."""
    hid, inter = shapes.hidden, shapes.intermediate
    layer = [(3 * hid, hid), (3 * hid,), (hid, hid), (hid,), (hid,), (hid,), (inter, hid), (inter,)]
    layer += [(hid, inter), (hid,), (hid,), (hid,)]
    return [
        (shapes.vocab, hid),
        (512, hid),
        (2, hid),
        (hid,),
        (hid,),
        *layer * shapes.lamb_layers,
        (hid, hid),
        (hid,),
        (hid, hid),
        (hid,),
        (hid,),
        (hid,),
        (shapes.vocab,),
        (2, hid),
        (2,),
    ]


class ForeachLamb:
    """LAMB with torch's multi-tensor ``_foreach`` ops: what one writes without a fused kernel (no clipping)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        self.params, self.lr, self.betas, self.eps, self.wd = list(params), lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**self.t))
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(self.m, denom)
        torch._foreach_div_(update, 1 - b1**self.t)
        torch._foreach_add_(update, self.params, alpha=self.wd)
        w_norm, u_norm = torch.stack(torch._foreach_norm(self.params)), torch.stack(torch._foreach_norm(update))
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(update, list(trust.unbind()))
        torch._foreach_add_(self.params, update, alpha=-self.lr)


def lamb_case(shapes: Shapes, device: torch.device, deepspeed_lamb: bool = True) -> Case:
    from fastbert.optim import Lamb

    sizes = bert_parameter_shapes(shapes)
    numel = sum(math.prod(s) for s in sizes)
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen) * 0.02 for s in sizes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in sizes]

    def params():
        out = [w.to(device, copy=True).requires_grad_() for w in base]
        for p, g in zip(out, grads, strict=True):
            p.grad = g.to(device, copy=True)
        return out

    providers, notes = {}, {}
    fused = Lamb(params(), lr=1e-3, max_grad_norm=None, max_trust_ratio=None)  # no clipping: as the others
    providers["fastbert"] = fused.step
    providers["torch_foreach_lamb"] = ForeachLamb(params(), lr=1e-3).step
    if device.type != "cuda":
        notes["deepspeed_fused_lamb"] = notes["apex_fused_lamb"] = "skipped: no CUDA"
    else:
        if not deepspeed_lamb:
            notes["deepspeed_fused_lamb"] = "skipped: its CUDA op was not built in time"
        else:
            try:
                from deepspeed.ops.lamb import FusedLamb

                providers["deepspeed_fused_lamb"] = FusedLamb(params(), lr=1e-3, max_grad_norm=0.0).step
            except Exception as e:  # not installed, or its JIT build failed
                notes["deepspeed_fused_lamb"] = f"not available: {type(e).__name__}: {e}"[:300]
        try:
            from apex.optimizers import FusedLAMB

            providers["apex_fused_lamb"] = FusedLAMB(params(), lr=1e-3, max_grad_norm=0.0).step
        except Exception as e:
            notes["apex_fused_lamb"] = f"not available: {type(e).__name__}: {e}"[:300]
    return Case(
        "lamb",
        f"{len(sizes)} fp32 tensors, {numel / 1e6:.1f}M parameters (BERT, {shapes.lamb_layers} layers)",
        providers,
        flops=0.0,
        bytes=28 * numel,  # read weight, gradient and both moments; write weight and both moments
        bound="memory",
        notes=notes,
    )


def measure(
    device: torch.device | str = "cuda",
    shapes: Shapes = BERT_BASE,
    *,
    compile: bool = False,
    deepspeed_lamb: bool = True,
    reps: int = 3,
) -> dict:
    """Every kernel forward + backward (LAMB: one step) against what a user would otherwise run, in bf16: ms,
    TFLOP/s of useful work, GB/s of the fused kernel's minimum traffic, and the share of the device's peak from
    fastbert.train.flops (compute-bound kernels: dense bf16 peak; memory-bound ones: DRAM bandwidth). A provider
    that fails is recorded with its error; the fastbert rows are the ones that must run."""
    device = torch.device(device)
    dt = torch.bfloat16
    peak = gpu_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    torch.manual_seed(0)
    cases = [
        *attention_cases(shapes, device, dt),
        *disentangled_cases(shapes, device, dt),
        *elementwise_cases(shapes, device, dt),
        mlm_loss_case(shapes, device, dt),
        lamb_case(shapes, device, deepspeed_lamb),
    ]
    if compile:
        _add_compiled(cases)
    timer = Timer(device, reps)
    rows = []
    print(f"{name}, bf16 (LAMB: fp32), forward + backward; share of {peak.name if peak else 'unknown'} peak")
    print(
        f"  {'kernel':<20} {'provider':<22} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'% peak':>7} {'peak MiB':>9}  shape"
    )
    for case in cases:
        for provider, fn in case.providers.items():
            run = fn if case.kernel == "lamb" else _fwd_bwd(fn)
            row = {"kernel": case.kernel, "shape": case.shape, "provider": provider}
            try:
                ms = timer(run)
                memory = peak_memory(run, device) if provider in case.memory else None
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                rows.append(row)
                print(f"  {case.kernel:<20} {provider:<22} error: {row['error'][:120]}")
                continue
            tflops = case.flops / (ms * 1e-3) / 1e12 if case.flops else None
            gbs = case.bytes / (ms * 1e-3) / 1e9
            share = None
            if peak is not None:
                share = tflops * 1e12 / peak.flops("bf16") if case.bound == "compute" else gbs * 1e9 / peak.bandwidth
            row.update(ms=ms, tflops=tflops, gbs=gbs, share_of_peak=share, bound=case.bound, peak_memory=memory)
            rows.append(row)
            cells = [
                f"{ms:>9.3f}",
                f"{tflops:>8.1f}" if tflops is not None else f"{'-':>8}",
                f"{gbs:>8.0f}",
                f"{share:>7.0%}" if share is not None else f"{'-':>7}",
                f"{memory / 2**20:>9.0f}" if memory is not None else f"{'-':>9}",
            ]
            print(f"  {case.kernel:<20} {provider:<22} {' '.join(cells)}  {case.shape}")
        for provider, note in case.notes.items():
            rows.append({"kernel": case.kernel, "shape": case.shape, "provider": provider, "skipped": note})
            print(f"  {case.kernel:<20} {provider:<22} {note[:100]}")
    return {
        "measured": True,
        "device": name,
        "peak": None if peak is None else asdict(peak),
        "results": rows,
    }


def _add_compiled(cases: list[Case]) -> None:
    """``torch.compile`` of each eager provider (minutes of compilation: the standalone benchmark only)."""
    for case in cases:
        for provider, fn in list(case.providers.items()):
            if provider.startswith("torch_") and case.kernel != "lamb":
                compiled = torch.compile(lambda fn=fn: fn())
                case.providers[provider.replace("torch_", "compiled_", 1)] = compiled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of each eager sequence")
    args = parser.parse_args()
    if torch.cuda.is_available():
        table, out = measure("cuda", compile=args.compile), RESULTS / "kernels_cuda.json"
    else:
        table, out = print_plan(), RESULTS / "kernels_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(table, indent=1) + "\n")
    partial.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
