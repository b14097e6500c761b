"""Host-side plumbing every kernel module shares: buffer allocation, philox seeds, row views, the interpreter switch,
and the one way an ahead-of-time spec is written down.

Each kernel module imports ``empty`` as its own ``_empty`` (the kernel tests swap that module attribute for guarded
buffers), and builds the constexprs and launch options of every launch through one ``launch_meta``-style function
that its ``aot_specs()`` calls too, so that what ``kernels/aot.py`` compiles is what the launchers pick.
"""

from __future__ import annotations

import os

import torch

PARTIAL_ROWS = 256  # programs along the rows in a backward, each writing one fp32 partial row of a parameter grad
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the data dtypes every launcher accepts
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32"}
TYPE_NAMES[torch.int64] = "i64"
DEFAULT_NUM_STAGES = 3  # triton's default on CUDA, what a launch that passes none gets


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests swap in guarded buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """True under the Triton interpreter, whose low-precision arithmetic the kernels must avoid (``UPCAST``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def draw_seed() -> int:
    """A philox seed from torch's default generator, so ``torch.manual_seed`` makes dropout reproducible. Drawn
    above 2**32 so that triton always types it int64, the variant kernels/aot.py compiles."""
    return int(torch.randint(2**32, 2**62, (1,)).item())


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (any other strides are passed to the kernel), else a
    contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``[rows, last dim]`` matrix with a unit column stride, a view where possible."""
    return unit_stride(x.reshape(-1, x.shape[-1]))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for ``dtype`` operands: IEEE float32 for float32 (fp16/bf16 ignore it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def aot_spec(
    fn,
    config: dict,
    meta: dict,
    types: dict[str, str],
    aligned: tuple[str, ...] = (),
    unaligned_too: bool = False,
) -> dict:
    """One ahead-of-time compile spec: ``fn`` with the launch's ``meta`` (constexprs plus ``num_warps`` and, when
    given, ``num_stages``, exactly as passed to ``fn[grid](...)``) and ``types`` for every other argument.

    ``aligned`` names the integer arguments (row strides, row lengths) that triton's JIT finds divisible by 16 when
    the rows are 16-byte aligned, as at BERT's widths; pointers are taken as 16-byte aligned. That variant is
    always compiled (it is the one that must use vector loads); ``unaligned_too`` adds the variant with none of
    them divisible, for kernels whose usual shapes give both (BERT's vocab of 30522 is not a multiple of 16)."""
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    num_stages = meta.pop("num_stages", DEFAULT_NUM_STAGES)
    names = list(fn.arg_names)
    missing = [name for name in names if name not in meta and name not in types]
    unknown = [name for name in list(meta) + list(types) if name not in names]
    if missing or unknown:
        raise ValueError(f"aot_spec: {fn.__name__}: arguments without a type {missing}, unknown names {unknown}")
    for name in aligned:
        if not types[name].startswith("i"):
            raise ValueError(f"aot_spec: {fn.__name__}: aligned argument {name} is not an integer")
    return {
        "fn": fn,
        "config": {**config, "num_warps": num_warps, "num_stages": num_stages},
        "signature": {name: types[name] for name in names if name in types},
        "constexprs": meta,
        "aligned": tuple(aligned),
        "variants": ("aligned", "unaligned") if unaligned_too and aligned else ("aligned",),
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def dedupe(specs: list[dict]) -> list[dict]:
    """Specs in order, each distinct compile once (a flag that a kernel ignores gives the same launch twice)."""
    seen, out = set(), []
    for spec in specs:
        key = spec_key(spec)
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def spec_key(spec: dict) -> tuple:
    """What makes two compiles the same: kernel, argument types, constexprs, alignment and launch options."""
    return (
        spec["fn"].__name__,
        tuple(sorted(spec["signature"].items())),
        tuple(sorted((k, str(v)) for k, v in spec["constexprs"].items())),
        tuple(sorted(spec["aligned"])),
        spec["num_warps"],
        spec["num_stages"],
    )
