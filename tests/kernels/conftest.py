"""Where the kernel tests run: under the Triton interpreter on CPU tensors (the default), or natively on a CUDA
GPU with ``FASTBERT_KERNEL_DEVICE=cuda`` (same tests, same tolerances; run it as its own process:
``FASTBERT_KERNEL_DEVICE=cuda python -m pytest tests/kernels``).

For the interpreter, ``TRITON_INTERPRET=1`` is set here, before anything imports triton. For CUDA it is removed,
and a missing GPU is an error, never a skip. ``kernel_checks.DEVICE`` is the device the tests put their inputs on.
"""

from __future__ import annotations

import os
import sys

_DEVICE = os.environ.get("FASTBERT_KERNEL_DEVICE", "cpu") or "cpu"
if _DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FASTBERT_KERNEL_DEVICE={_DEVICE!r}: expected cpu (the Triton interpreter) or cuda")
_INTERPRET = "1" if _DEVICE == "cpu" else None
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != _INTERPRET:
    raise RuntimeError(
        f"triton was imported before tests/kernels/conftest.py could {'set' if _INTERPRET else 'unset'} "
        "TRITON_INTERPRET; run the kernel tests on their own: python -m pytest tests/kernels"
    )
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "FASTBERT_KERNEL_DEVICE=cuda but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); unset it to use the Triton interpreter"
        )
    # The tolerances count float32 accumulation of rounded operands, which is what the kernels do; cuBLAS (the MLM
    # loss's matmuls) may otherwise use TF32 for fp32 or reduce fp16/bf16 products in low precision.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
