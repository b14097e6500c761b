"""The fused LAMB kernels (under the interpreter, or on CUDA: kernel_checks.DEVICE): the optimizer's fused path
against its torch path over several steps (shapes that are not multiples of the block, both decay groups, clipping
on and off, the trust ratio clamped and not, zero-norm parameters, fp32/bf16/fp16), ZeRO-style fragment layouts
(one rank, and two ranks simulated by adding their sums as the all-reduce does), guarded buffers, skipped
non-finite steps, and bitwise determinism."""

from __future__ import annotations

import copy
import functools
import os
from types import SimpleNamespace

import pytest
import torch
from kernel_checks import DEVICE, Comparison, GuardedBuffers, assert_no_nan, host, rounding_tolerance

from fastbert.kernels import lamb as kernel
from fastbert.optim import Lamb

# (48, 1000) spans three chunks, the last one partial; (2 * CHUNK,) ends exactly on a chunk boundary.
SHAPES = [(48, 1000), (17, 1001), (7,), (1,), (1000,), (33,), (2 * kernel.CHUNK,)]
ZERO = 5  # SHAPES[5] starts at zero: its weight norm is 0, so its trust ratio is 1
NO_DECAY = {2, 3, 4}


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """The parameters on ``DEVICE``, drawn on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        (torch.randn(shape, generator=gen) * (0.02 + i * 0.3)).to(DEVICE, dtype) for i, shape in enumerate(SHAPES)
    ]
    params[ZERO].zero_()
    return [p.requires_grad_() for p in params]


def _groups(params: list[torch.Tensor], weight_decay: float = 0.01) -> list[dict]:
    decay = [p for i, p in enumerate(params) if i not in NO_DECAY]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": [params[i] for i in sorted(NO_DECAY)], "weight_decay": 0.0},
    ]


def _set_grads(params: list[torch.Tensor], step: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * scale * (1 + i)
        if i == ZERO and step == 0:
            g.zero_()  # zero weights and zero gradient: both norms 0 at the first step
        p.grad = g.to(p.device, p.dtype)


def _step(opt: Lamb, backend: str) -> None:
    """One step with ``FASTBERT_BACKEND=backend`` (restored after, so that cached runs outside a test can use it)."""
    saved = os.environ.get("FASTBERT_BACKEND")
    os.environ["FASTBERT_BACKEND"] = backend
    try:
        opt.step()
    finally:
        if saved is None:
            del os.environ["FASTBERT_BACKEND"]
        else:
            os.environ["FASTBERT_BACKEND"] = saved


def _assert_close(
    name: str, fused: torch.Tensor, ref: torch.Tensor, rtol: float, ulps: float, scale: torch.Tensor | None = None
) -> None:
    """Elementwise ``|fused - ref| <= rtol * scale + ulps * eps(fp32) * max|ref|``, ``scale`` being ``|ref|`` unless
    given: a relative error plus a few roundings at the tensor's magnitude. Moments pass their largest magnitude as
    the scale (exp_avg cancels: a relative difference in the clip factor shows at the size of the terms)."""
    fused, ref = host(fused).double(), host(ref).double()
    scale = ref.abs() if scale is None else host(scale).double().abs()
    allowed = rtol * scale + ulps * torch.finfo(torch.float32).eps * ref.abs().max()
    error = (fused - ref).abs()
    worst = (error - allowed).flatten().argmax()
    assert bool((error <= allowed).all()), (
        f"{name}: error {error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g} at "
        f"{worst.item()} (fused {fused.flatten()[worst].item():.8g}, ref {ref.flatten()[worst].item():.8g})"
    )


STEP_OPS = 16  # the float32 steps of the two paths differ by ulps of the step: norms summed in other orders


def _weight_comparison(name: str, fused: torch.Tensor, torch_path: torch.Tensor, before: torch.Tensor) -> Comparison:
    """Weights after one step against the torch path's: both round the new weight to its dtype once, torch also
    rounds the update before adding it, and the two float32 updates differ by ``STEP_OPS`` ulps of the step."""
    ref = torch_path.detach().double()
    step = ref - before.double()
    allowed = rounding_tolerance(ref, fused.dtype, rounded=[ref, step], sum_abs=step.abs(), ops=STEP_OPS)
    return Comparison(name, host(fused).clone(), ref, allowed, base=host(before).clone())


def _compare_and_sync(
    fused: Lamb, ref: Lamb, fused_params, ref_params, before, step: int, moment_rtol: float
) -> list[Comparison]:
    """One step of both paths: the moments compared, the weights' comparisons (against the step torch took)
    returned, then the fused side reset to torch's numbers so that the next step compares one step again, not
    accumulated rounding."""
    weights = []
    for i, (a, b, w0) in enumerate(zip(fused_params, ref_params, before, strict=True)):
        assert fused.state[a]["step"] == ref.state[b]["step"] == step + 1
        weights.append(_weight_comparison(f"param {i} {tuple(a.shape)} step {step}", a, b, w0))
        for name in ("exp_avg", "exp_avg_sq"):
            moment = ref.state[b][name]
            _assert_close(
                f"{name} {i} step {step}",
                fused.state[a][name],
                moment,
                moment_rtol,
                4,
                scale=moment.abs().max().expand(moment.shape),
            )
            fused.state[a][name].copy_(ref.state[b][name])
        a.data.copy_(b.detach())
    return weights


# (max_grad_norm, max_trust_ratio, layer_adaptation): the no-decay group takes the plain Adam step unless "all";
# "none" is AdamW.
FP32_CONFIGS = {
    "clipped-cap10": (0.5, 10.0, "decay"),
    "unclipped-cap0.3": (None, 0.3, "decay"),
    "clipped-nocap": (0.5, None, "decay"),
    "clipped-cap0.3-adapt-all": (0.5, 0.3, "all"),
    "clipped-adamw": (0.5, 10.0, "none"),
}


def three_steps(dtype: torch.dtype, config: str = "clipped-cap10") -> list[Comparison]:
    """Three steps of the fused and the torch optimizer on the same gradients, moments compared and both sides
    re-synced after each; returns the weights' comparisons (cached: test_mutations.py reuses them). float32 runs
    ``config``; fp16 and bf16 weights and gradients run clipped at the default norm 1."""
    return _three_steps(dtype, config if dtype == torch.float32 else None)


@functools.cache
def _three_steps(dtype: torch.dtype, config: str | None) -> list[Comparison]:
    if dtype == torch.float32:
        max_grad_norm, max_trust_ratio, adaptation = FP32_CONFIGS[config]
        kwargs = dict(
            lr=0.05, max_grad_norm=max_grad_norm, max_trust_ratio=max_trust_ratio, layer_adaptation=adaptation
        )
        # Clipping scales m by the clip factor and v by its square; the torch path's squared gradient norm (norms
        # per tensor, squared, summed) is itself about 1e-6 off the exact one, the kernel's about 1e-7.
        moment_rtol = 3e-6 if max_grad_norm else 1e-6
        fused_params = _params(dtype)
    else:
        kwargs, moment_rtol = dict(lr=0.05), 3e-6
        fused_params = _params(dtype, seed=1)
    ref_params = [p.detach().cpu().clone().requires_grad_() for p in fused_params]  # the torch path on the CPU
    fused, ref = Lamb(_groups(fused_params), **kwargs), Lamb(_groups(ref_params), **kwargs)
    weights = []
    for step in range(3):
        for params in (fused_params, ref_params):
            _set_grads(params, step, 0.1)
        before = [p.detach().clone() for p in ref_params]
        _step(fused, "triton")
        _step(ref, "torch")
        assert fused._plan is not None and ref._plan is None  # each really took its own path
        assert not fused.last_step_skipped
        weights += _compare_and_sync(fused, ref, fused_params, ref_params, before, step, moment_rtol)
    return weights


@pytest.mark.parametrize("config", FP32_CONFIGS)
def test_fused_matches_torch_path_fp32(config):
    for comparison in three_steps(torch.float32, config):
        comparison.check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_torch_path_low_precision(dtype):
    """Low-precision weights and gradients: moments match in fp32; weights within the rounding of both paths."""
    for comparison in three_steps(dtype):
        comparison.check()


def _flat_model(sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(n, generator=gen) * 0.5 for n in sizes]


def _fake_zero(sizes: list[int], bounds: list[tuple[int, int]]) -> list[tuple[int, list]]:
    """DeepSpeed ZeRO's picture for ranks whose partitions cover [lo, hi) of the concatenated parameters: each
    rank's ``lo`` and each parameter's ``_hp_mapping`` (None: no fragment on that rank)."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    out = []
    for lo, hi in bounds:
        mappings = []
        for index in range(len(sizes)):
            a, b = max(lo, offsets[index]), min(hi, offsets[index + 1])
            mappings.append(
                None
                if a >= b
                else SimpleNamespace(
                    param_group_index=0, hp_fragment_address=SimpleNamespace(start=a - lo, numel=b - a)
                )
            )
        out.append((lo, hi - lo, mappings))
    return out


PADDING = 13  # zeros DeepSpeed may append to a partition


def _zero_case():
    sizes = [1000, 7, 3 * kernel.CHUNK + 5, 1, 2500]
    split = 1000 + 7 + kernel.CHUNK + 11  # inside the third parameter
    return sizes, _fake_zero(sizes, [(0, split), (split, sum(sizes))])


def test_two_simulated_ranks_match_whole_parameters():
    """Each rank runs the kernels on its flat partition; the all-reduce is the sum of the ranks' sums."""
    sizes, ranks = _zero_case()
    whole = [w.clone().requires_grad_() for w in _flat_model(sizes)]
    ref = Lamb([{"params": whole, "weight_decay": 0.01}], lr=0.05, max_grad_norm=0.5)
    flats = []
    for lo, numel, mappings in ranks:
        w = torch.zeros(numel + PADDING, device=DEVICE)
        w[:numel] = torch.cat([x.detach() for x in whole])[lo : lo + numel]
        layout = kernel.TensorLayout(
            numel + PADDING,
            torch.float32,
            torch.float32,
            tuple((i, m.hp_fragment_address.start, m.hp_fragment_address.numel) for i, m in enumerate(mappings) if m),
        )
        flats.append(
            SimpleNamespace(
                lo=lo,
                numel=numel,
                w=w,
                m=torch.zeros_like(w),
                v=torch.zeros_like(w),
                plan=kernel.plan_chunks([layout], len(sizes), DEVICE),
            )
        )
    for step in range(2):
        _set_grads(whole, step, 0.3)
        flat_grad = torch.cat([x.grad for x in whole])
        _step(ref, "torch")
        grad_sq = 0.0
        for f in flats:
            f.g = torch.zeros_like(f.w)
            f.g[: f.numel] = flat_grad[f.lo : f.lo + f.numel]
            grad_sq += kernel.grad_square_sum(f.plan, [f.g]).item()
        assert grad_sq == pytest.approx(flat_grad.square().sum().item(), rel=1e-6)
        clip = min(1.0, 0.5 / (grad_sq**0.5 + 1e-6))
        hyper = [kernel.hyperparameters(0.05, (0.9, 0.999), 1e-6, 0.01, step + 1, 10.0, clip)]
        sums = sum(kernel.moments_and_norms(f.plan, [f.w], [f.g], [f.m], [f.v], hyper) for f in flats)
        for f in flats:
            kernel.apply_update(f.plan, [f.w], [f.m], [f.v], hyper, sums)
        weights = torch.cat([f.w[: f.numel] for f in flats]).split(sizes)
        exp_avg_sqs = torch.cat([f.v[: f.numel] for f in flats]).split(sizes)
        exp_avgs = torch.cat([f.m[: f.numel] for f in flats]).split(sizes)
        for i, (x, w, m, v) in enumerate(zip(whole, weights, exp_avgs, exp_avg_sqs, strict=True)):
            # No resync here: step 2's weights carry step 1's rounding, a few ulps at most.
            _assert_close(f"weight {i} step {step}", w, x, 1e-6, 4)
            for name, got in (("exp_avg", m), ("exp_avg_sq", v)):
                want = ref.state[x][name]
                _assert_close(f"{name} {i} step {step}", got, want, 3e-6, 4, scale=want.abs().max().expand(want.shape))
        for f in flats:
            assert torch.equal(f.w[f.numel :], torch.zeros(PADDING, device=DEVICE))  # padding stays zero


def test_optimizer_fragment_path_fused_matches_torch():
    """The optimizer's own ZeRO path on one rank (no process group: nothing to all-reduce), fused against torch,
    with a partition that starts inside a parameter and carries padding."""
    sizes, ranks = _zero_case()
    lo, numel, mappings = ranks[1]
    data = torch.cat(_flat_model(sizes))[lo:]
    flats, opts = [], []
    for device in (DEVICE, "cpu"):  # fused, torch
        flat = torch.zeros(numel + PADDING, device=device)
        flat[:numel] = data
        flat.requires_grad_()
        opt = Lamb([{"params": [flat], "weight_decay": 0.01}], lr=0.05, max_trust_ratio=2.0)
        opt.attach_zero_partitions([SimpleNamespace(_hp_mapping=m) if m else SimpleNamespace() for m in mappings])
        flats.append(flat)
        opts.append(opt)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        g = torch.randn(numel + PADDING, generator=gen)
        g[numel:] = 0.0
        flats[0].grad, flats[1].grad = g.to(DEVICE, copy=True), g.clone()
        _step(opts[0], "triton")
        _step(opts[1], "torch")
        assert opts[0]._plan is not None
        _assert_close("weights", flats[0], flats[1], 1e-6, 4)
        for name in ("exp_avg", "exp_avg_sq"):
            want = opts[1].state[flats[1]][name]
            _assert_close(name, opts[0].state[flats[0]][name], want, 3e-6, 4, scale=want.abs().max().expand(want.shape))


def _aligned_guarded(guards: list, tensor: torch.Tensor, margin: int = 1024) -> torch.Tensor:
    """Like ``GuardedBuffers.place`` but 16-byte aligned (a margin of 1024 elements), so the fast path runs."""
    buffer = torch.full((tensor.numel() + 2 * margin,), float("nan"), dtype=tensor.dtype, device=DEVICE)
    view = buffer[margin : margin + tensor.numel()].view(tensor.shape)
    view.copy_(tensor)
    guards.append((buffer, margin, tensor.numel()))
    assert view.data_ptr() % 16 == 0
    return view


@pytest.mark.parametrize(
    "weight_dtype,grad_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_guarded_buffers_and_reference(weight_dtype, grad_dtype, monkeypatch):
    """Every tensor and every buffer the launchers allocate sits between NaN margins; fast (aligned, full chunk)
    and masked chunks both run; results match ``kernel.reference`` element for element."""
    guards = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", lambda shape, dtype, device: guards.empty(shape, dtype, device))
    aligned: list = []
    sizes = [1, 7, 1000, kernel.CHUNK + 3, 2 * kernel.CHUNK, 2 * kernel.CHUNK]
    gen = torch.Generator().manual_seed(4)
    tensors = {name: [] for name in ("w", "g", "m", "v")}
    for i, n in enumerate(sizes):
        place = (lambda t: _aligned_guarded(aligned, t)) if i == len(sizes) - 1 else guards.place
        tensors["w"].append(place((torch.randn(n, generator=gen) * 0.1).to(weight_dtype)))
        tensors["g"].append(place((torch.randn(n, generator=gen) * 0.01).to(grad_dtype)))
        tensors["m"].append(place(torch.randn(n, generator=gen) * 1e-3))
        tensors["v"].append(place(torch.rand(n, generator=gen) * 1e-5))
    # Two tensors hold fragments of parameter 0 (kept out of the dtype split: same dtypes); the last has a gap.
    layouts = [kernel.TensorLayout(n, weight_dtype, grad_dtype, ((i, 0, n),)) for i, n in enumerate(sizes)]
    layouts[-1] = kernel.TensorLayout(
        sizes[-1], weight_dtype, grad_dtype, ((5, 0, kernel.CHUNK), (6, kernel.CHUNK + 9, kernel.CHUNK - 9))
    )
    num_params = 8  # parameter 7 has no fragment here
    plan = kernel.plan_chunks(layouts, num_params, DEVICE)
    launch = plan.launches[0]
    addresses = kernel._addresses(launch, tensors["w"], tensors["g"], tensors["m"], tensors["v"])
    fast_rows = [
        row for row, start, numel, _ in launch.chunks.tolist() if numel == kernel.CHUNK and addresses[row, 4] == 1
    ]
    assert fast_rows, "no chunk takes the fast path"
    ref = {name: [host(t).clone() for t in ts] for name, ts in tensors.items()}  # the reference on the CPU
    hyper = [
        kernel.hyperparameters(
            0.01 * (i + 1), (0.9, 0.999), 1e-6, 0.01 if i % 2 else 0.0, 3 + i, None if i == 2 else 5.0, 0.7
        )
        for i in range(len(sizes))
    ]
    grad_sq = kernel.grad_square_sum(plan, tensors["g"])
    expected = sum(g.float().square().sum() for g in ref["g"])
    assert grad_sq.item() == pytest.approx(expected.item(), rel=1e-6)
    sums = kernel.moments_and_norms(plan, tensors["w"], tensors["g"], tensors["m"], tensors["v"], hyper)
    ref_sums = kernel.reference(ref["w"], ref["g"], ref["m"], ref["v"], hyper, layouts, num_params)
    torch.testing.assert_close(host(sums), ref_sums, rtol=1e-6, atol=0)
    assert sums[7].tolist() == [0.0, 0.0]
    kernel.apply_update(plan, tensors["w"], tensors["m"], tensors["v"], hyper, sums)
    for name in ("w", "m", "v"):
        for i, (got, want) in enumerate(zip(tensors[name], ref[name], strict=True)):
            assert_no_nan(f"{name}[{i}]", got)
            ulps = 1 if got.dtype == torch.float32 else 0.5
            atol = ulps * torch.finfo(got.dtype).eps * want.float().abs().max().item()
            torch.testing.assert_close(
                host(got).float(),
                want.float(),
                rtol=1e-6 if got.dtype == torch.float32 else 0,
                atol=atol,
                msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}",
            )
    guards.check()
    for buffer, margin, numel in aligned:
        assert buffer[:margin].isnan().all() and buffer[margin + numel :].isnan().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_gradient_changes_nothing(bad, dtype):
    params = _params(dtype)
    opt = Lamb(_groups(params), lr=0.05)
    _set_grads(params, 0, 0.1)
    _step(opt, "triton")
    weights = [p.detach().clone() for p in params]
    state = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for i, p in enumerate(params)
    }
    _set_grads(params, 1, 0.1)
    params[1].grad[3, 5] = bad
    _step(opt, "triton")
    assert opt.last_step_skipped
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), weights[i])
        assert opt.state[p]["step"] == state[i]["step"] == 1
        assert all(torch.equal(opt.state[p][k], state[i][k]) for k in ("exp_avg", "exp_avg_sq"))
    params[1].grad[3, 5] = 0.0
    _step(opt, "triton")
    assert not opt.last_step_skipped and opt.state[params[0]]["step"] == 2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_skipped_first_step_leaves_the_optimizer_as_new(backend):
    """The skip is decided on the device, so a skipped first step runs (with rates that change nothing): weights
    stay, moments stay zero, step counts stay 0, and the next step is a fresh optimizer's first."""
    params = _params(torch.float32)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, fresh = Lamb(_groups(params)), Lamb(_groups(fresh_params))
    weights = [p.detach().clone() for p in params]
    _set_grads(params, 0, 0.1)
    params[0].grad[0, 0] = float("nan")
    _step(opt, backend)
    assert opt.last_step_skipped and opt.grad_norm is None
    assert torch.equal(opt.step_report()[0], torch.tensor(1.0, dtype=torch.float64))
    for p, w in zip(params, weights, strict=True):
        assert torch.equal(p.detach(), w)
        assert opt.state[p]["step"] == 0
        assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any()
    _set_grads(params, 1, 0.1)
    _set_grads(fresh_params, 1, 0.1)
    _step(opt, backend)
    _step(fresh, backend)
    assert not opt.last_step_skipped and opt.grad_norm == fresh.grad_norm
    for p, q in zip(params, fresh_params, strict=True):
        assert torch.equal(p.detach(), q.detach()) and opt.state[p]["step"] == fresh.state[q]["step"] == 1


def test_two_runs_are_bitwise_equal():
    runs = []
    for _ in range(2):
        params = _params(torch.float32, seed=7)
        opt = Lamb(_groups(params), lr=0.05)
        for step in range(2):
            _set_grads(params, step, 0.1)
            _step(opt, "triton")
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["exp_avg_sq"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_plan_chunks_follow_fragments_and_chunk_boundaries():
    n = 3 * kernel.CHUNK + 100
    layout = kernel.TensorLayout(n, torch.float32, torch.float32, ((2, 10, kernel.CHUNK), (0, kernel.CHUNK + 10, 500)))
    plan = kernel.plan_chunks([layout], 3, DEVICE)
    rows = plan.launches[0].chunks.tolist()
    assert sum(numel for _, _, numel, _ in rows) == n  # every element in exactly one chunk
    for _, start, numel, param in rows:
        assert start // kernel.CHUNK == (start + numel - 1) // kernel.CHUNK  # never across a CHUNK boundary
        inside = [(p, s, c) for p, s, c in layout.fragments if s <= start and start + numel <= s + c]
        assert inside == [] if param == -1 else [(p, s, c) for p, s, c in inside if p == param]
    ranges = plan.param_ranges.tolist()
    assert ranges[1] == [ranges[1][0], ranges[1][0]]  # no fragment: empty range
    for param in (0, 2):
        first, end = ranges[param]
        assert {r[3] for r in rows[first:end]} == {param}
        assert sum(r[2] for r in rows[first:end]) == dict((p, c) for p, _, c in layout.fragments)[param]
    with pytest.raises(ValueError, match="overlaps"):
        kernel.plan_chunks([kernel.TensorLayout(10, torch.float32, torch.float32, ((0, 0, 6), (1, 5, 5)))], 2, DEVICE)


def test_non_contiguous_parameter_falls_back_to_torch():
    base = torch.randn(6, 5, device=DEVICE)
    p = base.t().contiguous().t().requires_grad_()  # a leaf with transposed strides
    assert not p.is_contiguous()
    ref = p.detach().clone().requires_grad_()
    opts = [Lamb([p], lr=0.1), Lamb([ref], lr=0.1)]
    grad = torch.randn(6, 5, device=DEVICE)
    p.grad, ref.grad = grad.clone(), grad.clone()
    _step(opts[0], "triton")
    _step(opts[1], "torch")
    assert opts[0]._plan is None and torch.equal(p.detach(), ref.detach())


def test_deepcopy_keeps_working():
    """A copied optimizer (as checkpoint tools do) rebuilds its plan for its own tensors."""
    params = _params(torch.float32)
    opt = Lamb(_groups(params), lr=0.05)
    _set_grads(params, 0, 0.1)
    _step(opt, "triton")
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = Lamb(_groups(params2), lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for a, b in zip(params, params2, strict=True):
        b.grad = a.grad.clone()
    _step(opt, "triton")
    _step(opt2, "triton")
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, params2, strict=True))
