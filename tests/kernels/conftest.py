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


# The ahead-of-time resource table -------------------------------------------------------------------------------
import pytest  # noqa: E402 - after TRITON_INTERPRET is settled

AOT_FULL = os.environ.get("FASTBERT_AOT_FULL") == "1"


@pytest.fixture(scope="session")
def resource_rows(tmp_path_factory):
    """``rows(module)``: the rows of ``module`` in the committed resource table (benchmarks/results/
    kernel_resources.json), every one required fresh (its spec still made by the launchers, compiled from today's
    kernel sources by today's triton; a stale table fails with the command that refreshes it). Under
    ``FASTBERT_AOT_FULL=1`` the module is compiled now instead (once per session), ignoring the table."""
    from fastbert.kernels import aot

    compiled: dict[str, list[dict]] = {}

    def rows(module: str) -> list[dict]:
        if AOT_FULL:
            if module not in compiled:
                out = tmp_path_factory.mktemp(f"aot-{module}") / "kernel_resources.json"
                compiled[module] = run_aot(out, "--modules", module)["kernels"]
            return compiled[module]
        fresh, stale = aot.fresh_rows(aot.load_table(), (module,))
        if stale:
            pytest.fail(
                f"{aot.TABLE} is stale for {module}: {len(stale)} of {len(fresh) + len(stale)} rows missing or "
                f"compiled from other kernel sources, launch specs or triton; refresh it with `{aot.REFRESH}` "
                "(compiles only those rows), or set FASTBERT_AOT_FULL=1 to compile every configuration now",
                pytrace=False,
            )
        return fresh

    return rows


def run_aot(out, *args: str) -> dict:
    """``python -m fastbert.kernels.aot --out OUT ARGS`` in a process without the interpreter; its table."""
    import json
    import subprocess

    import triton

    from fastbert.kernels import aot

    if not (aot.cuobjdump().parent / "ptxas").exists():
        pytest.skip(f"no ptxas in the triton wheel {triton.__file__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # jit functions must be compilable
    command = [sys.executable, "-m", "fastbert.kernels.aot", "--out", str(out), *args]
    subprocess.run(command, env=env, check=True, timeout=1800)
    return json.loads(out.read_text())
