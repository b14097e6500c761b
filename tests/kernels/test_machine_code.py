"""Machine-code checks on the cubins ``kernels/aot.py`` builds (the aligned variant: pointers 16-byte aligned, row
strides and lengths multiples of 16), disassembled with the cuobjdump bundled in the triton wheel:

- the fp16 and bf16 attention kernels (forward, dK/dV, dQ), and the disentangled attention kernels, use
  tensor-core MMA: HMMA on sm_80, and on sm_90 HGMMA (wgmma) or HMMA, whichever triton picked (printed for
  attention, and asserted to be one of them);
- LayerNorm, bias+GELU, the MLM loss and LAMB read their rows with 128-bit global loads (LDG.E.128).

So a change that silently falls back to CUDA-core dots or scalar loads fails here. The opcode counts are those each
row of the resource table records (conftest.py's ``resource_rows``: the committed table, required fresh for
today's kernel sources, or with ``FASTBERT_AOT_FULL=1`` a compile now)."""

from __future__ import annotations

import collections

import pytest

from fastbert.kernels import aot

ARCHS = (80, 90)


def _attention(spec: dict) -> bool:
    c = spec["config"]
    return c["kernel"] in ("forward", "dkdv", "dq") and c["dtype"] in ("fp16", "bf16") and not c["padded"]


def _disentangled_attention(spec: dict) -> bool:
    return spec["config"]["dtype"] in ("fp16", "bf16")


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
    "disentangled_attention": _disentangled_attention,
    "residual_layer_norm": lambda spec: _row_kernel("residual_layer_norm", spec),
    "bias_gelu": lambda spec: _row_kernel("bias_gelu", spec),
    "mlm_loss": lambda spec: _row_kernel("mlm_loss", spec),
    "lamb": lambda spec: _row_kernel("lamb", spec),
}


@pytest.fixture(scope="module")
def opcodes(resource_rows) -> dict[tuple[str, int], dict[str, int]]:
    """``(spec id, arch)`` -> the recorded SASS opcode counts of its aligned variant, for every spec in ``CHECKED``."""
    counts = {}
    for module, keep in CHECKED.items():
        wanted = {aot.spec_id(spec) for spec in aot.specs(module) if keep(spec)}
        for row in resource_rows(module):
            if row["spec"] in wanted and row["variant"] == "aligned":
                counts[row["spec"], int(row["arch"].removeprefix("sm_"))] = row["opcodes"]
        missing = [(spec, arch) for spec in wanted for arch in ARCHS if (spec, arch) not in counts]
        assert not missing, f"{module}: no aligned row for {missing}"
    return counts


def _checked_specs(module: str) -> list[dict]:
    specs = [spec for spec in aot.specs(module) if CHECKED[module](spec)]
    assert specs, module
    return specs


def test_low_precision_attention_uses_tensor_cores(opcodes):
    specs = _checked_specs("attention")
    assert len(specs) == 2 * 3 * 3 * 2  # dtypes x kernels x head dims x dropout
    failures, families = [], collections.Counter()
    for spec in specs:
        c = spec["config"]
        name = f"{c['kernel']} {c['dtype']} d={c['head_dim']} dropout={c['dropout']}"
        sm80 = opcodes[aot.spec_id(spec), 80]
        if not aot.count(sm80, "HMMA"):
            failures.append(f"sm_80 {name}: no HMMA")
        sm90 = opcodes[aot.spec_id(spec), 90]
        hgmma, hmma = aot.count(sm90, "HGMMA"), aot.count(sm90, "HMMA")
        family = "HGMMA (wgmma)" if hgmma else "HMMA (mma.sync)" if hmma else "none"
        families[f"{c['kernel']} d={c['head_dim']}: {family}"] += 1
        if not hgmma + hmma:
            failures.append(f"sm_90 {name}: neither HGMMA nor HMMA")
    for line, n in sorted(families.items()):
        print(f"sm_90 attention {line} ({n} specs)")
    assert not failures, "\n".join(failures)


def test_low_precision_disentangled_attention_uses_tensor_cores(opcodes):
    """Every fp16/bf16 disentangled attention kernel (forward, dK/dV, dQ; each head dim, position terms and dropout
    setting) multiplies on the tensor cores: HMMA on sm_80, HGMMA or HMMA on sm_90."""
    specs = _checked_specs("disentangled_attention")
    assert len(specs) == 2 * 3 * 3 * 3 * 2  # dtypes x kernels x head dims x position terms x dropout
    failures = []
    for spec in specs:
        c = spec["config"]
        name = f"{c['kernel']} {c['dtype']} d={c['head_dim']} c2p={c['c2p']} p2c={c['p2c']} dropout={c['dropout']}"
        if not aot.count(opcodes[aot.spec_id(spec), 80], "HMMA"):
            failures.append(f"sm_80 {name}: no HMMA")
        sm90 = opcodes[aot.spec_id(spec), 90]
        if not aot.count(sm90, "HGMMA") + aot.count(sm90, "HMMA"):
            failures.append(f"sm_90 {name}: neither HGMMA nor HMMA")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("module", ["residual_layer_norm", "bias_gelu", "mlm_loss", "lamb"])
def test_row_kernels_use_128_bit_global_loads(opcodes, module):
    failures = []
    for spec in _checked_specs(module):
        for arch in ARCHS:
            counter = opcodes[aot.spec_id(spec), arch]
            wide = aot.count(counter, "LDG.E.128")
            print(f"{spec['fn'].__name__} {spec['config']} sm_{arch}: {wide} LDG.E.128")
            if not wide:
                loads = {op: n for op, n in counter.items() if op.startswith("LDG")}
                failures.append(f"{spec['fn'].__name__} {spec['config']} sm_{arch}: no LDG.E.128, loads {loads}")
    assert not failures, "\n".join(failures)
