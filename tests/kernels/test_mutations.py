"""The kernel tests' comparisons must reject wrong outputs: each kernel's real outputs, scaled by 0 (zeros), 0.5,
-1 (negated) and 0.9, go through the very comparison its own test uses (same reference, same tolerance for that
shape and dtype), and every case must fail; unscaled, every case must pass. The kernels run once per case: the
tests' case functions are cached, so these checks only re-compare (an optimizer's output is its update: the step
is scaled, not the weight).

A case is one kernel call (an optimizer step: all its parameters together). A few outputs are zero by construction
and cannot show a scaling; they are listed in ``ZERO`` and must indeed be zero within their tolerance.
"""

from __future__ import annotations

import pytest
import test_attention
import test_bias_gelu
import test_disentangled_attention
import test_fused_lamb
import test_mlm_loss
import test_residual_layer_norm
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _attention(dtype):
    for lengths, head_dim in test_attention.VARLEN_CASES:
        yield (
            f"varlen {lengths} head_dim {head_dim}",
            test_attention.varlen_comparisons(tuple(lengths), head_dim, dtype),
        )
    if dtype != torch.float16:
        yield "padded", test_attention.padded_comparisons(dtype)


def _disentangled_attention(dtype):
    for case in test_disentangled_attention.VARLEN_CASES:
        yield f"varlen {case}", test_disentangled_attention.varlen_comparisons(*case, dtype)
    if dtype != torch.float16:
        yield "padded", test_disentangled_attention.padded_comparisons(dtype)
    if dtype == torch.float32:
        yield "dropout", test_disentangled_attention.dropout_comparisons()


def _residual_layer_norm(dtype):
    for case in test_residual_layer_norm.CASES:
        yield str(case), test_residual_layer_norm.comparisons(case, dtype)


def _bias_gelu(dtype):
    for shape in test_bias_gelu.SHAPES:
        yield str(shape), test_bias_gelu.comparisons(shape, dtype)


def _mlm_loss(dtype):
    for case in test_mlm_loss.CASES:
        yield str(case), test_mlm_loss.comparisons(case, dtype)
        yield f"{case} sampling", test_mlm_loss.comparisons(case, dtype, sample=True)


def _lamb(dtype):
    """One case per optimizer step, all parameters together: one step is one output of the kernels."""
    comparisons = test_fused_lamb.three_steps(dtype)
    for step in range(3):
        yield f"step {step}", {"update": [c for c in comparisons if c.name.endswith(f"step {step}")]}


KERNELS = {  # kernel: (its cases, the outputs they compare)
    "attention": (_attention, ("out", "dq", "dk", "dv")),
    "disentangled_attention": (_disentangled_attention, test_disentangled_attention.OUTPUTS),
    "residual_layer_norm": (
        _residual_layer_norm,
        ("normalized", "summed", "dx", "dresidual", "dweight", "dbias", "dx_bias"),
    ),
    "bias_gelu": (_bias_gelu, ("y", "dx", "dbias")),
    "mlm_loss": (_mlm_loss, ("logits", "loss", "d_hidden", "d_weight", "d_bias")),
    "lamb": (_lamb, ("update",)),
}
NO_LABEL = str(test_mlm_loss.CASES[3])
ZERO = {
    ("attention", "varlen [1] head_dim 128", "dq"),  # one key: the softmax is constant, so dS = 0
    ("attention", "varlen [1] head_dim 128", "dk"),
    *(  # no labelled row
        ("mlm_loss", case, name)
        for case in (NO_LABEL, f"{NO_LABEL} sampling")
        for name in ("loss", "d_hidden", "d_weight", "d_bias")
    ),
}


def _rejected(comparison, factor: float) -> bool:
    try:
        comparison.check(comparison.mutated(factor))
    except AssertionError as error:
        assert "elements off" in str(error), error  # rejected by the tolerance, not by a shape or NaN check
        return True
    return False


# Disentangled attention's cases cost most under the interpreter (three kernels, five gradients): its mutations are
# checked in bf16 only, the loosest tolerance of the three, so the one most likely to let a wrong value through.
ONE_DTYPE = {"disentangled_attention": torch.bfloat16}
PARAMS = [
    pytest.param(k, o, d, id=f"{k}-{o}-{str(d).removeprefix('torch.')}")
    for k, (_, outputs) in KERNELS.items()
    for o in outputs
    for d in DTYPES
    if ONE_DTYPE.get(k, d) == d
]


@pytest.mark.parametrize("factor", [0.0, 0.5, -1.0, 0.9, 1.0], ids=lambda f: f"x{f}")
@pytest.mark.parametrize(("kernel", "output", "dtype"), PARAMS)
def test_comparison_rejects_scaled_output(kernel, output, dtype, factor):
    cases, _ = KERNELS[kernel]
    checked = 0
    for case, comparisons in cases(dtype):
        if output not in comparisons:  # e.g. dresidual where there is no residual
            continue
        group = comparisons[output] if isinstance(comparisons[output], list) else [comparisons[output]]
        if (kernel, case, output) in ZERO:
            for comparison in group:
                change = comparison.ref - (0.0 if comparison.base is None else comparison.base.double())
                assert bool((change.abs() <= comparison.allowed).all()), f"{case} {output} is listed as zero"
            continue
        checked += 1
        if factor == 1.0:
            for comparison in group:
                comparison.check()
        else:
            assert any(_rejected(comparison, factor) for comparison in group), f"{case}: {output} x{factor} passes"
    assert checked, f"no case of {kernel} compares {output} in {dtype}"
