"""Ahead-of-time compile of every kernel configuration the launchers can pick, for sm_90 and sm_80: no register
spills, registers below the cap ptxas gives a block of that many warps, shared memory within the device limit.

The specs come from each module's ``launch_meta`` (the function its launchers build their constexprs with);
``test_specs_are_exactly_the_launches_the_launchers_make`` runs the real launchers over many shapes, dtypes and
flags with every kernel replaced by a recorder, types each recorded argument as triton's JIT does, and requires the
set of launches to equal the set of specs. The rows checked are the committed table's
(``benchmarks/results/kernel_resources.json``, written by ``python -m fastbert.kernels.aot``), each required fresh
for today's kernel sources, specs and triton (conftest.py's ``resource_rows``); ``FASTBERT_AOT_FULL=1`` compiles
every configuration instead (several minutes)."""

from __future__ import annotations

import functools

import pytest
import torch

from fastbert import ops
from fastbert.kernels import (
    _common,
    aot,
    attention,
    bias_gelu,
    disentangled_attention,
    lamb,
    mlm_loss,
    residual_layer_norm,
)

MODULES = {
    "attention": attention,
    "bias_gelu": bias_gelu,
    "disentangled_attention": disentangled_attention,
    "lamb": lamb,
    "mlm_loss": mlm_loss,
    "residual_layer_norm": residual_layer_norm,
}
assert set(MODULES) == set(aot.MODULES)


@pytest.mark.parametrize("module", aot.MODULES)
def test_every_configuration_compiles_without_spills_within_shared_memory(module, resource_rows):
    """One module at a time (``-k lamb`` checks, or with FASTBERT_AOT_FULL=1 compiles, only LAMB)."""
    rows = resource_rows(module)
    specs = aot.specs(module)
    assert {row["module"] for row in rows} == {module}
    expected = {
        (aot.spec_id(spec), variant, target) for spec in specs for variant in spec["variants"] for target in aot.TARGETS
    }
    assert len(rows) == len(expected)
    assert {(row["spec"], row["variant"], row["target"]) for row in rows} == expected
    problems = [
        f"{row['kernel']} {row['config']} on {row['arch']}: {'; '.join(aot.problems(row))}"
        for row in rows
        if aot.problems(row)
    ]
    assert not problems, "\n".join(problems)
    print(f"{module}: {len(specs)} specs, {len(rows)} compiles")


def test_a_changed_source_or_spec_makes_rows_stale(monkeypatch):
    """The freshness check behind ``resource_rows``: rows compiled from another source of their module, or for a
    spec the launchers no longer make, are stale; the other modules' rows stay fresh."""
    table = {"kernels": [dict(row) for row in aot.load_table()["kernels"]]}
    fresh, stale = aot.fresh_rows(table)
    assert fresh and not stale, f"the committed table is stale; refresh it with `{aot.REFRESH}`"
    source_hash = aot.source_hash
    monkeypatch.setattr(aot, "source_hash", lambda m: "edited" if m == "bias_gelu" else source_hash(m))
    fresh, stale = aot.fresh_rows(table)
    assert {job[0] for job in stale} == {"bias_gelu"} and "bias_gelu" not in {row["module"] for row in fresh}
    assert len(fresh) + len(stale) == len(table["kernels"])
    monkeypatch.setattr(aot, "source_hash", source_hash)
    table["kernels"][0]["spec"] = "renamed"
    fresh, stale = aot.fresh_rows(table)
    assert len(stale) == 1 and len(fresh) == len(table["kernels"]) - 1


def test_opcode_families_count_modifiers_not_wider_loads():
    opcodes = {"HMMA.16816.F32": 8, "LDG.E": 2, "LDG.E.128": 4, "LDG.E.128.CONSTANT": 1, "LDG.E.64": 3}
    assert aot.count(opcodes, "HMMA") == 8 and aot.count(opcodes, "HGMMA") == 0
    assert aot.count(opcodes, "LDG.E.128") == 5 and aot.count(opcodes, "LDG") == 10


def test_the_resource_checks_can_fail():
    """``aot.problems`` rejects spills, registers at the cap, blocks beyond the register file and shared memory
    beyond the limit, and accepts a row within all of them."""
    good = {
        "registers": 128,
        "register_cap": aot.register_cap(8),
        "spill_stores": 0,
        "spill_loads": 0,
        "shared": 1024,
        "shared_limit": 163 * 1024,
        "config": {"num_warps": 8},
    }
    assert aot.problems(good) == []
    assert aot.register_cap(4) == aot.register_cap(8) == 255 and aot.register_cap(16) == 128
    bad = [
        {"spill_stores": 8},
        {"spill_loads": 4},
        {"registers": 255},
        {"registers": 0},
        {"registers": 136, "config": {"num_warps": 16}},  # 136 x 512 threads > 65536
        {"shared": 163 * 1024 + 1},
    ]
    for change in bad:
        assert aot.problems({**good, **change}), change


# The launchers, run with every kernel replaced by a recorder ----------------------------------------------------
def _triton_type(value) -> tuple[str, bool]:
    """``(type, divisible by 16)`` of one launch argument, as triton's JIT specializes it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kind, attribute = native_specialize_impl(BaseBackend, value, False, True, True)
    return kind, attribute == "D"


class _Recorder:
    """Stands in for a jit function: ``fn[grid](*args, **kwargs)`` records the launch and runs nothing."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.fn.arg_names)
            assert len(args) + len([k for k in kwargs if k in names]) == len(names), self.fn.__name__
            typed = {name: _triton_type(value) for name, value in zip(names, args, strict=False)}
            self.launches.append((self.fn, typed, kwargs))

        return launch


@pytest.fixture
def launches(monkeypatch):
    """The list every launch lands in while the kernels are recorders, with ``interpreting()`` False as on a
    GPU (so ``UPCAST`` is what a GPU gets)."""
    _all_specs()  # before the kernels are swapped out
    recorded = []
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")  # the MLM loss's launches come through ops' host loop
    for module in MODULES.values():
        for fn in {spec["fn"] for spec in module.aot_specs()}:
            monkeypatch.setattr(module, fn.__name__, _Recorder(fn, recorded))
        if hasattr(module, "interpreting"):
            monkeypatch.setattr(module, "interpreting", lambda: False)
    return recorded


def _launch_key(fn, typed: dict, kwargs: dict) -> tuple:
    meta = dict(kwargs)
    num_warps = meta.pop("num_warps")
    num_stages = meta.pop("num_stages", _common.DEFAULT_NUM_STAGES)
    return (
        fn.__name__,
        tuple(sorted((name, kind) for name, (kind, _) in typed.items())),
        tuple(sorted((k, str(v)) for k, v in meta.items())),
        num_warps,
        num_stages,
    )


def _spec_key(spec: dict) -> tuple:
    key = _common.spec_key(spec)
    return key[:3] + key[4:]  # without the alignment, which the shapes decide


@functools.cache
def _all_specs() -> dict[tuple, dict]:
    return {_spec_key(spec): spec for module in MODULES.values() for spec in module.aot_specs()}


def _run_every_launcher() -> None:
    """Forward and backward of every kernel module over shapes that reach every tile, each dtype and each flag.
    No shape integer is 1 (triton would make it a constexpr, a variant the table does not hold)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    for dtype in _common.DTYPES:
        for cols in (2, 100, 128, 129, 768, 1000, 3072, 4000):
            x, b = randn(3, cols, dtype=dtype), randn(cols, dtype=dtype)
            bias_gelu.forward(x, b)
            bias_gelu.backward(x, x, b)
        for cols in (2, 100, 129, 256, 384, 768, 1000, 1024, 2000, 2048, 3000, 4096):
            x, w = randn(3, cols, dtype=dtype), randn(cols, dtype=dtype)
            for residual in (None, x):
                for x_bias in (None, w):
                    for p in (0.0, 0.1):
                        seed = _common.draw_seed() if p else 0
                        _, summed, mean, rstd = residual_layer_norm.forward(x, residual, w, w, 1e-5, x_bias, p, seed)
                        for dsum in (None, x):
                            residual_layer_norm.backward(x, dsum, summed, w, mean, rstd, p, seed, x_bias is not None)
        for head_dim in attention.HEAD_DIMS:
            for p in (0.0, 0.1):
                q, k, v = (randn(2, 5, 2, head_dim, dtype=dtype).requires_grad_() for _ in range(3))
                mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
                attention.attention_padded(q, k, v, mask, p).sum().backward()
                cu = torch.tensor([0, 3, 10], dtype=torch.int32)
                q, k, v = (randn(10, 2, head_dim, dtype=dtype).requires_grad_() for _ in range(3))
                attention.attention(q, k, v, cu, 7, p).sum().backward()
        for head_dim in disentangled_attention.HEAD_DIMS:
            for c2p, p2c in disentangled_attention.TERMS:
                for p in (0.0, 0.1):
                    q, k, v = (randn(10, 2, head_dim, dtype=dtype).requires_grad_() for _ in range(3))
                    tables = [randn(16, 2, head_dim, dtype=dtype).requires_grad_() if on else None for on in (c2p, p2c)]
                    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
                    disentangled_attention.disentangled_attention(q, k, v, cu, 7, *tables, 8, 16, p).sum().backward()
                    q, k, v = (randn(2, 2, 5, head_dim, dtype=dtype).requires_grad_() for _ in range(3))
                    tables = [t.detach().transpose(0, 1).requires_grad_() if t is not None else None for t in tables]
                    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
                    disentangled_attention.disentangled_attention_padded(
                        q, k, v, *tables, mask, 8, 16, p
                    ).sum().backward()
        for grad in (False, True):
            hidden, weight = randn(5, 16, dtype=dtype).requires_grad_(grad), randn(40, 16, dtype=dtype)
            labels = torch.tensor([3, -100, 7, 0, 39])
            loss, _ = ops.mlm_loss(hidden, weight, randn(40, dtype=dtype), labels)
            sampled, _, _ = ops.mlm_loss_and_sample(hidden, weight, randn(40, dtype=dtype), labels, torch.arange(5))
            if grad:
                (loss + sampled).backward()
    for weight_dtype in _common.DTYPES:
        for grad_dtype in _common.DTYPES:
            sizes = (3 * lamb.CHUNK + 5, 7)
            layouts = [lamb.TensorLayout(n, weight_dtype, grad_dtype, ((i, 0, n),)) for i, n in enumerate(sizes)]
            plan = lamb.plan_chunks(layouts, len(sizes), torch.device("cpu"))
            weights = [randn(n, dtype=weight_dtype) for n in sizes]
            grads = [randn(n, dtype=grad_dtype) for n in sizes]
            moments = [[torch.zeros(n) for n in sizes] for _ in range(2)]
            hyper = [lamb.hyperparameters(1e-3, (0.9, 0.999), 1e-6, 0.01, 1, None)] * len(sizes)
            lamb.grad_square_sum(plan, grads)
            sums = lamb.moments_and_norms(plan, weights, grads, *moments, hyper)
            lamb.apply_update(plan, weights, *moments, hyper, sums)


def test_specs_are_exactly_the_launches_the_launchers_make(launches):
    _run_every_launcher()
    assert launches
    picked = {_launch_key(*launch) for launch in launches}
    specs = set(_all_specs())
    missing = picked - specs
    assert not missing, "launches with no spec:\n" + "\n".join(map(str, sorted(missing)))
    unreached = specs - picked
    assert not unreached, "specs no launch made:\n" + "\n".join(map(str, sorted(unreached)))
    print(f"{len(launches)} launches, {len(picked)} distinct, all {len(specs)} specs")


def test_aligned_arguments_are_divisible_by_16_at_aligned_shapes(launches):
    """What the table compiles as ``aligned`` is what the JIT sees at BERT's shapes (hidden 768, heads of 64, a
    vocab padded to a multiple of 16): every such integer specialized as divisible by 16."""
    x, w = torch.randn(32, 768), torch.randn(768)
    bias_gelu.backward(x, x, w)
    _, summed, mean, rstd = residual_layer_norm.forward(x, x, w, w, 1e-5, w, 0.1, _common.draw_seed())
    residual_layer_norm.backward(x, x, summed, w, mean, rstd, 0.1, 2**40, True)
    qkv = torch.randn(2, 16, 3, 12, 64, requires_grad=True)
    q, k, v = qkv.unbind(2)  # views of the fused projection: token stride 3 * 768
    attention.attention_padded(q, k, v, torch.ones(2, 16), 0.1).sum().backward()
    table = torch.randn(32, 2, 12, 64, requires_grad=True)  # DeBERTa's relative table through two projections
    pos_key, pos_query = (x.transpose(0, 1) for x in table.unbind(1))
    heads = [x.transpose(1, 2) for x in (q, k, v)]
    out = disentangled_attention.disentangled_attention_padded(
        *heads, pos_key, pos_query, torch.ones(2, 16), 16, 64, 0.1
    )
    out.sum().backward()
    hidden, weight, bias = torch.randn(8, 32, requires_grad=True), torch.randn(30528, 32), torch.randn(30528)
    labels = x[:8, 0].long()
    ops.mlm_loss(hidden, weight, bias, labels)
    ops.mlm_loss_and_sample(hidden, weight, bias, labels, torch.arange(8))
    specs = _all_specs()
    for launch in launches:
        spec = specs[_launch_key(*launch)]
        typed = launch[1]
        unaligned = [name for name in spec["aligned"] if not typed[name][1]]
        assert not unaligned, f"{spec['fn'].__name__}: {unaligned} not divisible by 16"
        pointers = [name for name, (kind, divisible) in typed.items() if kind.startswith("*") and not divisible]
        assert not pointers, f"{spec['fn'].__name__}: pointers {pointers} not 16-byte aligned"
    assert {launch[0].__name__ for launch in launches} >= {
        "_bias_gelu_backward",
        "_residual_layer_norm_forward",
        "_residual_layer_norm_backward",
        "_attention_forward",
        "_attention_backward_dkdv",
        "_attention_backward_dq",
        "_disentangled_forward",
        "_disentangled_backward_dkdv",
        "_disentangled_backward_dq",
        "_mlm_loss_rows",
    }


def test_lamb_specs_cover_every_dtype_pair():
    specs = lamb.aot_specs()
    kernels = {(spec["fn"].__name__, spec["config"].get("weight"), spec["config"].get("grad")) for spec in specs}
    dtypes = ("fp32", "bf16", "fp16")
    expected = {("_lamb_moments", w, g) for w in dtypes for g in dtypes}
    expected |= {("_lamb_grad_squares", None, g) for g in dtypes} | {("_lamb_apply", w, None) for w in dtypes}
    expected |= {("_lamb_segment_sums", None, None)}
    assert kernels == expected and len(specs) == len(expected) + 1  # the segment sums at 1 and 2 columns
    assert set(lamb._TL_DTYPES) == set(_common.DTYPES)
