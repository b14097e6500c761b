"""Ahead-of-time compile of every kernel configuration the launchers can pick, for sm_90 and sm_80: no register
spills, shared memory within the device limit. Writes the resource table to
benchmarks/results/kernel_resources.json (kernel, config, registers, spills, shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kernel_resources.json"


def test_every_configuration_compiles_without_spills_within_shared_memory():
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"no ptxas in the triton wheel at {ptxas}")
    from fastbert.kernels import aot

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # jit functions must be compilable
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today, stated so that triton does not warn about it
    subprocess.run([sys.executable, "-m", "fastbert.kernels.aot", "--out", str(RESULTS)], env=env, check=True,
                   timeout=900)
    rows = json.loads(RESULTS.read_text())["kernels"]

    assert {row["module"] for row in rows} == set(aot.MODULES)
    assert {row["target"] for row in rows} == set(aot.TARGETS)
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
            assert any(spec["config"] == {**cfg, "kernel": kernel, "head_dim": head_dim, "dtype": "bf16"}
                       for spec in attention.aot_specs())
    assert len(mlm_loss.aot_specs()) == 3
