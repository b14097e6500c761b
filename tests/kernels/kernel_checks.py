"""What every kernel test checks: guarded buffers around each tensor a kernel touches, and the tolerance rule.

Guarded buffers: each tensor lives inside a larger flat buffer whose margins hold NaN (floats) or a sentinel
(integers; True for booleans). Reading out of bounds then poisons an output with NaN and writing out of bounds
changes a margin; the interpreter has no bounds checks of its own, so this is how out-of-bounds access shows.
Outputs the kernels allocate are guarded too: tests swap each kernel module's ``_empty`` for
``GuardedBuffers.empty``, whose interior also starts as NaN, so an element the kernel forgot to write shows up.

Tolerance (DESIGN.md): ``|fused - ref| <= 2 * |torch in the same low precision - ref| + atol`` elementwise, where
``ref`` is the float32 torch reference computed from the same (already rounded) low-precision inputs.
"""

from __future__ import annotations

import torch

MARGIN = 257  # at least this many elements on each side; odd, so a stray vector-width write past the end lands inside
INT_SENTINEL = -(2**30) + 7


class GuardedBuffers:
    def __init__(self) -> None:
        self._buffers: list[tuple[str, torch.Tensor, int, int]] = []

    def _interior(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A fresh guarded buffer; returns the tensor-shaped view between its margins. A margin is at least two
        rows long, so that an access one row (or one row stride) out of bounds still lands inside it."""
        numel = 1
        for size in shape:
            numel *= size
        margin = MARGIN + 2 * (shape[-1] if shape else 1)
        fill = float("nan") if dtype.is_floating_point else True if dtype == torch.bool else INT_SENTINEL
        buffer = torch.full((numel + 2 * margin,), fill, dtype=dtype)
        self._buffers.append((name, buffer, numel, margin))
        return buffer[margin:margin + numel].view(shape)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Stand-in for ``torch.empty``: a NaN-filled (or sentinel-filled) tensor with guarded margins."""
        shape = tuple(shape)
        return self._interior(f"allocation {shape} {dtype}", shape, dtype)

    def place(self, tensor: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """A copy of ``tensor`` inside a guarded buffer; a leaf that requires grad if asked."""
        view = self._interior(f"input {tuple(tensor.shape)} {tensor.dtype}", tuple(tensor.shape), tensor.dtype)
        view.copy_(tensor)
        return view.detach().requires_grad_(requires_grad)  # detach: a leaf sharing the guarded storage

    def check(self) -> None:
        """Every margin still holds its fill value."""
        assert self._buffers, "no guarded buffer was used: the test does not exercise the guards"
        for name, buffer, numel, width in self._buffers:
            for side, margin in (("before", buffer[:width]), ("after", buffer[width + numel:])):
                if buffer.dtype.is_floating_point:
                    touched = (~torch.isnan(margin)).nonzero().flatten()
                else:
                    touched = (margin != (True if buffer.dtype == torch.bool else INT_SENTINEL)).nonzero().flatten()
                assert touched.numel() == 0, (
                    f"{name}: margin {side} the tensor was written at offsets {touched[:8].tolist()}")


def assert_no_nan(name: str, tensor: torch.Tensor) -> None:
    bad = torch.isnan(tensor).nonzero()
    assert bad.numel() == 0, f"{name} holds NaN (unwritten or out-of-bounds read) at {bad[:8].tolist()}"


def assert_close(name: str, fused: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, ulps: float = 4.0,
                 magnitude: float = 1e-3) -> None:
    """The tolerance rule: ``fused`` may be off the fp32 ``ref`` by twice torch's own low-precision error + atol.

    ``atol`` is ``ulps`` units in the last place of ``fused``'s dtype at the largest reference magnitude: what a
    correct kernel can lose by rounding once where torch happened to round the other way. A wrong formula is off
    by far more. ``magnitude`` is the scale to use when the reference is (near) zero by cancellation of terms
    of that size, e.g. the gradient of a query that sees one key.
    """
    assert fused.shape == ref.shape, f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref.shape)}"
    assert fused.dtype == low.dtype, f"{name}: dtype {fused.dtype} != torch's {low.dtype}"
    assert_no_nan(name, fused)
    atol = ulps * torch.finfo(fused.dtype).eps * max(ref.detach().abs().max().item(), magnitude)
    fused, ref, low = fused.detach().double(), ref.detach().double(), low.detach().double()
    allowed = 2 * (low - ref).abs() + atol
    error = (fused - ref).abs()
    worst = (error - allowed).flatten().argmax()
    assert bool((error <= allowed).all()), (
        f"{name}: error {error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g} at flat "
        f"index {worst.item()} (fused {fused.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g})")
