"""Kernel tests run under the Triton interpreter: ``TRITON_INTERPRET=1`` is set here, before anything imports
triton, so the kernels in ``fastbert.kernels`` run on CPU tensors."""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
        "run the kernel tests on their own: python -m pytest tests/kernels"
    )
os.environ["TRITON_INTERPRET"] = "1"
