"""Ahead-of-time compile of every kernel configuration the launchers can pick, for sm_90 and sm_80: no register
spills, shared memory within the device limit. Writes the resource table to
benchmarks/results/kernel_resources.json (kernel, config, registers, spills, shared)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastbert.kernels import aot

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kernel_resources.json"


@pytest.mark.parametrize("module", aot.MODULES)
def test_every_configuration_compiles_without_spills_within_shared_memory(module):
    """One module at a time (``-k lamb`` compiles only LAMB); its rows replace that module's rows in the table."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"no ptxas in the triton wheel at {ptxas}")

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # jit functions must be compilable
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today, stated so that triton does not warn about it
    subprocess.run(
        [sys.executable, "-m", "fastbert.kernels.aot", "--modules", module, "--out", str(RESULTS)],
        env=env,
        check=True,
        timeout=900,
    )
    rows = [row for row in json.loads(RESULTS.read_text())["kernels"] if row["module"] == module]

    assert rows, f"no rows for {module}"
    assert {row["target"] for row in rows} == set(aot.TARGETS)
    assert len(rows) == len(importlib.import_module(f"fastbert.kernels.{module}").aot_specs()) * len(aot.TARGETS)
    problems = [
        f"{row['kernel']} {row['config']} on {row['arch']}: {row['registers']} registers, "
        f"{row['spill_stores']}/{row['spill_loads']} bytes spilled, shared {row['shared']} of {row['shared_limit']}"
        for row in rows
        if row["spill_stores"] or row["spill_loads"] or row["shared"] > row["shared_limit"]
    ]
    assert not problems, "\n".join(problems)
    assert all(0 < row["registers"] <= 255 for row in rows)


def test_specs_cover_every_configuration_the_launchers_pick():
    from fastbert.kernels import attention, bias_gelu, mlm_loss, residual_layer_norm

    def configs(module, **keep):
        return {tuple(sorted((k, v) for k, v in spec["config"].items() if k in keep)) for spec in module.aot_specs()}

    picked = {tuple(sorted(bias_gelu.config(cols).items())) for cols in range(1, 5000, 7)}
    assert picked <= configs(bias_gelu, BLOCK_M=1, BLOCK_N=1, num_warps=1)
    for backward in (False, True):
        picked = {tuple(sorted(residual_layer_norm.config(cols, backward).items())) for cols in range(1, 4097, 13)}
        compiled = configs(residual_layer_norm, BLOCK_M=1, BLOCK_N=1, num_warps=1)
        assert picked <= compiled, picked - compiled
    for kernel in ("forward", "dkdv", "dq"):
        for head_dim in attention.HEAD_DIMS:
            cfg = attention.config(head_dim, kernel)
            assert any(
                spec["config"] == {**cfg, "kernel": kernel, "head_dim": head_dim, "dtype": "bf16"}
                for spec in attention.aot_specs()
            )
    assert len(mlm_loss.aot_specs()) == 3


def test_lamb_specs_cover_every_dtype_pair():
    from fastbert.kernels import lamb

    specs = lamb.aot_specs()
    kernels = {(spec["fn"].__name__, spec["config"].get("weight"), spec["config"].get("grad")) for spec in specs}
    dtypes = ("fp32", "bf16", "fp16")
    expected = {("_lamb_moments", w, g) for w in dtypes for g in dtypes}
    expected |= {("_lamb_grad_squares", None, g) for g in dtypes} | {("_lamb_apply", w, None) for w in dtypes}
    expected |= {("_lamb_segment_sums", None, None)}
    assert kernels == expected and len(specs) == len(expected)
    assert set(lamb._TL_DTYPES) == {torch.float32, torch.bfloat16, torch.float16}
