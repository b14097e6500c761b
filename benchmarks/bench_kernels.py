"""fastbert's Triton kernels against torch: measured on a GPU, planned on paper without one.

With CUDA: each kernel (forward + backward) against torch eager, SDPA (attention) and ``torch.compile`` of the
eager sequence, at BERT-base pretraining shapes in bf16; time from ``triton.testing.do_bench``, achieved TFLOP/s
(attention, MLM loss) or GB/s (LayerNorm, bias-GELU: the fused kernel's minimum bytes over the time) and the share
of the device's peak. Without CUDA: the resource table of the ahead-of-time compile
(benchmarks/results/kernel_resources.json, written by tests/kernels/test_aot_compile.py) and, per kernel, the
analytic FLOPs and bytes moved, fused against the unfused torch sequence, with the ideal H100 time (the larger of
FLOPs over bf16 dense peak and bytes over HBM bandwidth). Nothing in the paper plan is measured.

Byte counts are the minimum traffic to DRAM (each tensor read or written once per pass, 2-byte elements, a dropout
mask as 1 byte per element in torch); FLOPs count a multiply-add as 2.

    python benchmarks/bench_kernels.py     # JSON to benchmarks/results/kernels_cuda.json or kernels_plan.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# BERT-base pretraining at sequence 512: 32 sequences, 15% of tokens masked.
BATCH, SEQ, HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 32, 512, 768, 12, 64, 3072, 30522
TOKENS = BATCH * SEQ
MASKED = int(0.15 * TOKENS)
# Dense bf16 tensor-core peak (FLOP/s) and DRAM bandwidth (bytes/s) from the vendor data sheets (SXM parts).
PEAKS = {"H100": (989e12, 3.35e12), "A100": (312e12, 2.039e12)}


@dataclass
class Plan:
    kernel: str
    shape: str
    flops: float
    fused_bytes: float
    unfused_bytes: float
    note: str

    def ideal_us(self, device: str = "H100") -> float:
        flops, bandwidth = PEAKS[device]
        return max(self.flops / flops, self.fused_bytes / bandwidth) * 1e6


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
    ]


def resource_table() -> list[dict]:
    path = RESULTS / "kernel_resources.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())["kernels"]


def print_plan() -> dict:
    rows = resource_table()
    print("Resource table (ahead-of-time compile, benchmarks/results/kernel_resources.json):")
    if not rows:
        print("  missing: run python -m pytest tests/kernels/test_aot_compile.py")
    print(f"  {'kernel':<34} {'arch':<6} {'config':<52} {'regs':>4} {'spill':>5} {'shared':>7}")
    for row in rows:
        short = {
            "BLOCK_M": "BM",
            "BLOCK_N": "BN",
            "BLOCK_V": "BV",
            "num_warps": "w",
            "num_stages": "s",
            "head_dim": "d",
        }
        order = sorted(row["config"].items(), key=lambda kv: (kv[0] not in ("dtype", "head_dim"), kv[0]))
        config = " ".join(f"{short.get(k, k)}={v}" for k, v in order if k != "kernel")
        spills = row["spill_stores"] + row["spill_loads"]
        print(
            f"  {row['kernel']:<34} {row['arch']:<6} {config[:52]:<52} {row['registers']:>4} {spills:>5} "
            f"{row['shared']:>7}"
        )
    print()
    print(f"Analytic plan, forward + backward, bf16, BERT-base at sequence {SEQ} (not measured: no GPU here):")
    print(
        f"  {'kernel':<20} {'GFLOP':>8} {'fused MB':>9} {'unfused MB':>11} {'bytes saved':>11} "
        f"{'ideal H100 us':>14} {'ideal A100 us':>14}  note"
    )
    table = []
    for plan in plans():
        saved = 1 - plan.fused_bytes / plan.unfused_bytes
        print(
            f"  {plan.kernel:<20} {plan.flops / 1e9:>8.1f} {plan.fused_bytes / 1e6:>9.1f} "
            f"{plan.unfused_bytes / 1e6:>11.1f} {saved:>10.0%} {plan.ideal_us('H100'):>14.1f} "
            f"{plan.ideal_us('A100'):>14.1f}  {plan.note}"
        )
        table.append(
            {
                **asdict(plan),
                "ideal_us_h100": round(plan.ideal_us("H100"), 1),
                "ideal_us_a100": round(plan.ideal_us("A100"), 1),
            }
        )
    print(
        "\nGoals on paper for H100: attention fwd+bwd at >= 60% of bf16 dense peak, LayerNorm and loss at >= 80% "
        "of HBM bandwidth; unmeasured until a GPU is available."
    )
    return {"measured": False, "plan": table, "resources": rows}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def _fwd_bwd(make):
    """A closure running forward + backward of ``make()``'s (output, inputs) once."""

    def run():
        out, inputs = make()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), inputs)

    return run


def measure_cuda(dev: str = "cuda") -> dict:
    import torch.nn.functional as F
    from fastbert.kernels import attention, bias_gelu, mlm_loss, residual_layer_norm

    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    dt = torch.bfloat16
    torch.manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_()

    x, r, xb = leaf(TOKENS, HIDDEN), leaf(TOKENS, HIDDEN), leaf(HIDDEN)
    w, b = leaf(HIDDEN), leaf(HIDDEN)
    h, hb = leaf(TOKENS, INTERMEDIATE), leaf(INTERMEDIATE)
    q, k, v = (leaf(TOKENS, HEADS, HEAD_DIM) for _ in range(3))
    cu = torch.arange(0, TOKENS + 1, SEQ, device=dev, dtype=torch.int32)
    hm, wv, bv = leaf(MASKED, HIDDEN), leaf(VOCAB, HIDDEN, scale=0.05), leaf(VOCAB)
    labels = torch.randint(0, VOCAB, (MASKED,), device=dev)

    def ln_eager(x, r, w, b, xb):
        return F.layer_norm(F.dropout(x + xb, 0.1) + r, (HIDDEN,), w, b, 1e-12)

    def attn_eager(q, k, v):
        qp, kp, vp = (t.view(BATCH, SEQ, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(qp @ kp.transpose(-1, -2) * HEAD_DIM**-0.5, dim=-1)
        return F.dropout(p, 0.1) @ vp

    def attn_sdpa(q, k, v):
        qp, kp, vp = (t.view(BATCH, SEQ, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qp, kp, vp, dropout_p=0.1)

    def loss_eager(hm, wv, bv):
        return F.cross_entropy(F.linear(hm, wv, bv).float(), labels)

    def gelu_eager(h, hb):
        return F.gelu(h + hb)

    compiled = {
        "ln": torch.compile(ln_eager),
        "gelu": torch.compile(gelu_eager),
        "attention": torch.compile(attn_eager),
        "loss": torch.compile(loss_eager),
    }
    cases = {
        "residual_layer_norm": {
            "fastbert": lambda: (
                residual_layer_norm.residual_layer_norm(x, r, w, b, 1e-12, xb, 0.1, True),
                (x, r, w, b, xb),
            ),
            "eager": lambda: (ln_eager(x, r, w, b, xb), (x, r, w, b, xb)),
            "compile": lambda: (compiled["ln"](x, r, w, b, xb), (x, r, w, b, xb)),
        },
        "bias_gelu": {
            "fastbert": lambda: (bias_gelu.bias_gelu(h, hb), (h, hb)),
            "eager": lambda: (gelu_eager(h, hb), (h, hb)),
            "compile": lambda: (compiled["gelu"](h, hb), (h, hb)),
        },
        "attention": {
            "fastbert": lambda: (attention.attention(q, k, v, cu, SEQ, 0.1), (q, k, v)),
            "eager": lambda: (attn_eager(q, k, v), (q, k, v)),
            "sdpa": lambda: (attn_sdpa(q, k, v), (q, k, v)),
            "compile": lambda: (compiled["attention"](q, k, v), (q, k, v)),
        },
        "mlm_loss": {
            "fastbert": lambda: (mlm_loss.mlm_loss(hm, wv, bv, labels), (hm, wv, bv)),
            "eager": lambda: (loss_eager(hm, wv, bv), (hm, wv, bv)),
            "compile": lambda: (compiled["loss"](hm, wv, bv), (hm, wv, bv)),
        },
    }
    results = []
    by_kernel = {p.kernel: p for p in plans()}
    print(f"{name}, bf16, forward + backward at BERT-base shapes (sequence {SEQ})")
    print(f"  {'kernel':<20} {'provider':<9} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>8} {'% peak':>7}")
    for kernel, providers in cases.items():
        plan = by_kernel[kernel]
        for provider, case in providers.items():
            ms = _bench(_fwd_bwd(case))
            tflops = plan.flops / (ms * 1e-3) / 1e12
            gbs = plan.fused_bytes / (ms * 1e-3) / 1e9
            compute_bound = kernel in ("attention", "mlm_loss")
            share = None
            if peak is not None:
                share = tflops * 1e12 / peak[0] if compute_bound else gbs * 1e9 / peak[1]
            shown = f"{share:>7.0%}" if share is not None else f"{'-':>7}"
            print(f"  {kernel:<20} {provider:<9} {ms:>8.3f} {tflops:>8.1f} {gbs:>8.0f} {shown}")
            results.append(
                {"kernel": kernel, "provider": provider, "ms": ms, "tflops": tflops, "gbs": gbs, "share_of_peak": share}
            )
    return {"measured": True, "device": name, "results": results}


def main() -> int:
    if torch.cuda.is_available():
        table, out = measure_cuda(), RESULTS / "kernels_cuda.json"
    else:
        table, out = print_plan(), RESULTS / "kernels_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(table, indent=1) + "\n")
    partial.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
