"""What every kernel test checks: guarded buffers around each tensor a kernel touches, and the tolerance rule.

Guarded buffers: each tensor lives inside a larger flat buffer whose margins hold NaN (floats) or a sentinel
(integers; True for booleans). Reading out of bounds then poisons an output with NaN and writing out of bounds
changes a margin; the interpreter has no bounds checks of its own, so this is how out-of-bounds access shows.
Outputs the kernels allocate are guarded too: tests swap each kernel module's ``_empty`` for
``GuardedBuffers.empty``, whose interior also starts as NaN, so an element the kernel forgot to write shows up.

Tolerance: each kernel output is compared elementwise with a float64 reference computed from the same (already
rounded) inputs, within ``rounding_tolerance``: what rounding the result once to its dtype and computing it in
float32 can cost, derived from the terms the kernel adds up, never a multiple of torch's own low-precision error.
A kernel test builds one ``Comparison`` per output; ``test_mutations.py`` feeds the same comparisons scaled
outputs (zeros, half, negated, 0.9x) and requires each to be rejected. ``assert_close`` (an atol of a few ulps at
the tensor's largest magnitude) remains for float32 checks with no per-term bound: whole models, dropout, dispatch.

Device: ``DEVICE`` is where the kernels run, the CPU under the Triton interpreter or CUDA with
``FASTBERT_KERNEL_DEVICE=cuda`` (see conftest.py). Tests draw their inputs on the CPU (the same numbers either way),
guarded buffers put them on ``DEVICE``, and every comparison brings the kernel's output back to the CPU, where the
float64 references are computed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

DEVICE = torch.device("cuda" if os.environ.get("FASTBERT_KERNEL_DEVICE") == "cuda" else "cpu")
MARGIN = 257  # at least this many elements on each side; odd, so a stray vector-width write past the end lands inside
INT_SENTINEL = -(2**30) + 7
U32 = 2.0**-24  # unit roundoff of float32


class GuardedBuffers:
    def __init__(self) -> None:
        self._buffers: list[tuple[str, torch.Tensor, int, int]] = []

    def _interior(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = DEVICE
    ) -> torch.Tensor:
        """A fresh guarded buffer on ``device``; returns the tensor-shaped view between its margins. A margin is at
        least two rows long, so that an access one row (or one row stride) out of bounds still lands inside it."""
        numel = 1
        for size in shape:
            numel *= size
        margin = MARGIN + 2 * (shape[-1] if shape else 1)
        fill = float("nan") if dtype.is_floating_point else True if dtype == torch.bool else INT_SENTINEL
        buffer = torch.full((numel + 2 * margin,), fill, dtype=dtype, device=device)
        self._buffers.append((name, buffer, numel, margin))
        return buffer[margin : margin + numel].view(shape)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = DEVICE) -> torch.Tensor:
        """Stand-in for ``torch.empty``: a NaN-filled (or sentinel-filled) tensor with guarded margins on ``device``
        (the launchers pass their inputs' device)."""
        shape = tuple(shape)
        return self._interior(f"allocation {shape} {dtype}", shape, dtype, device)

    def place(self, tensor: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """A copy of ``tensor`` inside a guarded buffer on ``DEVICE``; a leaf that requires grad if asked."""
        view = self._interior(f"input {tuple(tensor.shape)} {tensor.dtype}", tuple(tensor.shape), tensor.dtype)
        view.copy_(tensor)
        return view.detach().requires_grad_(requires_grad)  # detach: a leaf sharing the guarded storage

    def check(self) -> None:
        """Every margin still holds its fill value."""
        assert self._buffers, "no guarded buffer was used: the test does not exercise the guards"
        for name, buffer, numel, width in self._buffers:
            for side, margin in (("before", buffer[:width]), ("after", buffer[width + numel :])):
                if buffer.dtype.is_floating_point:
                    touched = (~torch.isnan(margin)).nonzero().flatten()
                else:
                    touched = (margin != (True if buffer.dtype == torch.bool else INT_SENTINEL)).nonzero().flatten()
                assert touched.numel() == 0, (
                    f"{name}: margin {side} the tensor was written at offsets {touched[:8].tolist()}"
                )


@contextlib.contextmanager
def patched(owner, **attributes):
    """``monkeypatch.setattr`` for code that runs outside a single test (a cached case): restored on exit."""
    saved = {name: getattr(owner, name) for name in attributes}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, on the CPU (a copy when it was on the GPU): where outputs are compared."""
    return tensor.detach().cpu()


def to_device(tensor: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` on ``DEVICE`` (unguarded); a leaf that requires grad if asked."""
    return tensor.detach().to(DEVICE, copy=True).requires_grad_(requires_grad)


def assert_no_nan(name: str, tensor: torch.Tensor) -> None:
    bad = torch.isnan(tensor).nonzero()
    assert bad.numel() == 0, f"{name} holds NaN (unwritten or out-of-bounds read) at {bad[:8].tolist()}"


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rounded_magnitude(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``|x|`` as far as rounding it to ``dtype`` goes: below the smallest normal the error stops shrinking."""
    return x.detach().double().abs().clamp(min=torch.finfo(dtype).smallest_normal)


def rounding_tolerance(
    ref: torch.Tensor,
    dtype: torch.dtype,
    *,
    rounded: Sequence[torch.Tensor] = (),
    sum_abs: torch.Tensor | None = None,
    ops: int = 0,
    operand_l2: torch.Tensor | None = None,
    operand_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Elementwise bound on ``|fused - ref|`` for an output the kernel computes in float32 and rounds to ``dtype``:

        u·(|ref| + Σ|rounded|) + (1 + u)·(ops·2^-24·sum_abs + 4·u_op·operand_l2) + u·rms(ref)

    ``ref`` is float64 from the kernel's own rounded inputs; u is the unit roundoff of ``dtype``. First, one rounding
    of the result, and of each further value the kernel rounds to ``dtype`` on the way (``rounded``: partial sums, a
    result before its final scaling). Then the float32 error of adding up terms whose absolute values sum to
    ``sum_abs`` along a chain of ``ops`` operations (worst case), and of terms rounded to ``operand_dtype`` (u_op;
    default ``dtype``) before a float32-accumulated dot, as tensor cores take them: ``operand_l2`` is the root of
    their sum of squares (each rounded factor taken at ``rounded_magnitude``), and independent round-to-nearest
    errors stay within about seven standard deviations of it. Last, an atol of one rounding at the tensor's RMS.
    Every magnitude that is rounded is floored at the smallest normal of its dtype.
    """
    u = unit_roundoff(dtype)
    magnitude = rounded_magnitude(ref, dtype)
    rms = ref.detach().double().square().mean().sqrt().item() if ref.numel() else 0.0
    allowed = u * (magnitude + sum(rounded_magnitude(r, dtype) for r in rounded)) + u * rms
    computed = torch.zeros_like(magnitude)
    if sum_abs is not None:
        computed = computed + ops * U32 * sum_abs.detach().double()
    if operand_l2 is not None:
        computed = computed + 4 * unit_roundoff(operand_dtype or dtype) * operand_l2.detach().double()
    return allowed + (1 + u) * computed


def assert_within(name: str, fused: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor) -> None:
    """``|fused - ref| <= allowed`` everywhere, no NaN; the message names the worst element and how many fail."""
    assert fused.shape == ref.shape, f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref.shape)}"
    fused, ref, allowed = host(fused), host(ref), host(allowed)
    assert_no_nan(name, fused)
    fused, ref = fused.double(), ref.double()
    error = (fused - ref).abs()
    bad = error > allowed
    if bool(bad.any()):
        worst = (error / allowed).flatten().argmax().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst at flat index {worst}: error "
            f"{error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g} "
            f"(fused {fused.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g})"
        )


@dataclass(frozen=True)
class Comparison:
    """One kernel output, its float64 reference and the elementwise tolerance. ``base`` is the tensor the output
    updates in place (the weights before an optimizer step), so that a mutation scales the update, not the weight."""

    name: str
    fused: torch.Tensor
    ref: torch.Tensor
    allowed: torch.Tensor
    base: torch.Tensor | None = None

    def check(self, fused: torch.Tensor | None = None) -> None:
        assert_within(self.name, self.fused if fused is None else fused, self.ref, self.allowed)

    def mutated(self, factor: float) -> torch.Tensor:
        """The output a kernel off by ``factor`` would return (in the output's dtype)."""
        base = 0.0 if self.base is None else self.base.double()
        return (base + factor * (self.fused.double() - base)).to(self.fused.dtype)


def compare(name: str, fused: torch.Tensor, ref: torch.Tensor, **tolerance) -> Comparison:
    """A ``Comparison`` within ``rounding_tolerance(ref, fused.dtype, **tolerance)``, all on the CPU."""
    ref = host(ref).double()
    return Comparison(name, host(fused), ref, rounding_tolerance(ref, fused.dtype, **tolerance))


def spy(monkeypatch, owner, name: str) -> list:
    """Wraps ``owner.name`` so that each call is recorded as ``(args, kwargs)`` and then runs the real function."""
    calls, real = [], getattr(owner, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def same_arguments(got: tuple, want: tuple) -> bool:
    """Positional arguments as a spy recorded them: the very same tensors, equal other values."""
    if len(got) != len(want):
        return False
    return all(a is b if torch.is_tensor(b) else a == b for a, b in zip(got, want, strict=True))


def forbid(monkeypatch, owner, name: str, why: str) -> None:
    """Makes ``owner.name`` fail the test when called (``pytest.fail`` is not an Exception, so nothing swallows it)."""
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: pytest.fail(f"{why} ({owner.__name__}.{name} called)"))


def assert_close(
    name: str, fused: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, ulps: float = 4.0, magnitude: float = 1e-3
) -> None:
    """Whole-model float32 comparisons only: ``fused`` may be off ``ref`` by twice ``|low - ref|`` + atol.

    ``atol`` is ``ulps`` units in the last place of ``fused``'s dtype at the largest reference magnitude: what a
    correct kernel can lose by rounding once where torch happened to round the other way. A wrong formula is off
    by far more. ``magnitude`` is the scale to use when the reference is (near) zero by cancellation of terms
    of that size, e.g. the gradient of a query that sees one key.
    """
    assert fused.shape == ref.shape, f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref.shape)}"
    assert fused.dtype == low.dtype, f"{name}: dtype {fused.dtype} != torch's {low.dtype}"
    fused, ref, low = host(fused), host(ref), host(low)
    assert_no_nan(name, fused)
    atol = ulps * torch.finfo(fused.dtype).eps * max(ref.detach().abs().max().item(), magnitude)
    fused, ref, low = fused.detach().double(), ref.detach().double(), low.detach().double()
    allowed = 2 * (low - ref).abs() + atol
    error = (fused - ref).abs()
    worst = (error - allowed).flatten().argmax()
    assert bool((error <= allowed).all()), (
        f"{name}: error {error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g} at flat "
        f"index {worst.item()} (fused {fused.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g})"
    )
