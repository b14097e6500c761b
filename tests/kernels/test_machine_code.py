"""Machine-code checks on the cubins ``kernels/aot.py`` builds (the aligned variant: pointers 16-byte aligned, row
strides and lengths multiples of 16), disassembled with the cuobjdump bundled in the triton wheel:

- the fp16 and bf16 attention kernels (forward, dK/dV, dQ) use tensor-core MMA: HMMA on sm_80, and on sm_90
  HGMMA (wgmma) or HMMA, whichever triton picked (printed, and asserted to be one of them);
- LayerNorm, bias+GELU, the MLM loss and LAMB read their rows with 128-bit global loads (LDG.E.128).

So a change that silently falls back to CUDA-core dots or scalar loads fails here. The cubins come from the
session's ahead-of-time compile (test_aot_compile.py keeps them) when it ran first; otherwise only the specs
checked here are compiled."""

from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

import pytest
from fastbert.kernels import aot
from test_aot_compile import cubin_dir, ptxas_or_skip, run_aot

ARCHS = (80, 90)
_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


def _attention(spec: dict) -> bool:
    c = spec["config"]
    return c["kernel"] in ("forward", "dkdv", "dq") and c["dtype"] in ("fp16", "bf16") and not c["padded"]


def _row_kernel(module: str, spec: dict) -> bool:
    c = spec["config"]
    if module == "residual_layer_norm":  # every flag on, rows of 1024
        flags = ("HAS_X_BIAS", "DROPOUT", "HAS_RESIDUAL" if "HAS_RESIDUAL" in c else "HAS_DSUM")
        return c["dtype"] == "bf16" and c["BLOCK_N"] == 1024 and all(c[f] for f in flags)
    if module == "bias_gelu":
        return c["dtype"] == "bf16" and c["BLOCK_N"] == 1024
    if module == "mlm_loss":
        return c["dtype"] == "bf16" and c["WRITE_GRAD"]
    if module == "lamb":  # fp32 master weights and gradients, the fast (unmasked, aligned) path inside
        return c["kernel"] != "segment_sums" and c.get("weight", "fp32") == "fp32" and c.get("grad", "fp32") == "fp32"
    return False


CHECKED = {
    "attention": _attention,
    "residual_layer_norm": lambda spec: _row_kernel("residual_layer_norm", spec),
    "bias_gelu": lambda spec: _row_kernel("bias_gelu", spec),
    "mlm_loss": lambda spec: _row_kernel("mlm_loss", spec),
    "lamb": lambda spec: _row_kernel("lamb", spec),
}


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.fixture(scope="module")
def opcodes(tmp_path_factory) -> dict[tuple[str, int], collections.Counter]:
    """``(spec id, arch)`` -> how often each SASS opcode occurs, for every spec in ``CHECKED``."""
    ptxas_or_skip()
    directory = cubin_dir(tmp_path_factory)
    wanted = {aot.spec_id(spec) for module, keep in CHECKED.items() for spec in aot.specs(module) if keep(spec)}
    missing = sorted(
        spec for spec in wanted if not all((directory / aot.cubin_name(spec, arch)).exists() for arch in ARCHS)
    )
    if missing:
        out = tmp_path_factory.mktemp("machine-code") / "kernel_resources.json"
        run_aot(out, directory, "--modules", *CHECKED, "--select", *missing)
    counts = {}
    for spec in wanted:
        for arch in ARCHS:
            sass = subprocess.run(
                [str(_cuobjdump()), "-sass", str(directory / aot.cubin_name(spec, arch))],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            counts[spec, arch] = collections.Counter(_OPCODE.findall(sass))
            assert counts[spec, arch], f"no instructions parsed from {spec} sm_{arch}"
    return counts


def _checked_specs(module: str) -> list[dict]:
    specs = [spec for spec in aot.specs(module) if CHECKED[module](spec)]
    assert specs, module
    return specs


def _count(counter: collections.Counter, prefix: str) -> int:
    return sum(n for opcode, n in counter.items() if opcode == prefix or opcode.startswith(prefix + "."))


def test_low_precision_attention_uses_tensor_cores(opcodes):
    specs = _checked_specs("attention")
    assert len(specs) == 2 * 3 * 3 * 2  # dtypes x kernels x head dims x dropout
    failures, families = [], collections.Counter()
    for spec in specs:
        c = spec["config"]
        name = f"{c['kernel']} {c['dtype']} d={c['head_dim']} dropout={c['dropout']}"
        sm80 = opcodes[aot.spec_id(spec), 80]
        if not _count(sm80, "HMMA"):
            failures.append(f"sm_80 {name}: no HMMA")
        sm90 = opcodes[aot.spec_id(spec), 90]
        hgmma, hmma = _count(sm90, "HGMMA"), _count(sm90, "HMMA")
        family = "HGMMA (wgmma)" if hgmma else "HMMA (mma.sync)" if hmma else "none"
        families[f"{c['kernel']} d={c['head_dim']}: {family}"] += 1
        if not hgmma + hmma:
            failures.append(f"sm_90 {name}: neither HGMMA nor HMMA")
    for line, n in sorted(families.items()):
        print(f"sm_90 attention {line} ({n} specs)")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("module", ["residual_layer_norm", "bias_gelu", "mlm_loss", "lamb"])
def test_row_kernels_use_128_bit_global_loads(opcodes, module):
    failures = []
    for spec in _checked_specs(module):
        for arch in ARCHS:
            counter = opcodes[aot.spec_id(spec), arch]
            wide = counter["LDG.E.128"] + counter["LDG.E.128.CONSTANT"]
            print(f"{spec['fn'].__name__} {spec['config']} sm_{arch}: {wide} LDG.E.128")
            if not wide:
                loads = {op: n for op, n in counter.items() if op.startswith("LDG")}
                failures.append(f"{spec['fn'].__name__} {spec['config']} sm_{arch}: no LDG.E.128, loads {loads}")
    assert not failures, "\n".join(failures)
