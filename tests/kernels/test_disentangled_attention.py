"""The disentangled attention kernel (forward, dQ/dK/dV and the position-table gradients) against a float64
reference on guarded buffers: varlen and padded, content-to-position and position-to-content alone and together,
log buckets and raw distances (lengths past the exact band, past the clamp), dropout with the kernel's own mask;
the float64 reference against ``reference`` (the model's definition) and its autograd; the distance table against
``relative_index``; the position tables' gradients through shared and separate projections."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    DEVICE,
    Comparison,
    GuardedBuffers,
    assert_close,
    compare,
    host,
    patched,
    rounded_magnitude,
    to_device,
)
from test_attention import _dropout_keep_grid

from fastbert.kernels import disentangled_attention as kernel

HEADS = 2
TERMS = {"c2p": (True, False), "p2c": (False, True), "c2p|p2c": (True, True)}
OUTPUTS = ("out", "dq", "dk", "dv", "dpk", "dpq")


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _sequence_reference(q, k, v, do, o, pk, pq, rel, scale, dtype, keep=None):
    """One sequence in float64: q, do, o ``[heads, queries, head_dim]``, k, v ``[heads, valid keys, head_dim]``,
    pk / pq ``[heads, rows, head_dim]`` or None, ``rel`` ``[queries, valid keys]`` table rows, ``keep`` the dropout
    multiplier ``[heads, queries, keys]`` (0 or 1 / (1 - p)) or None. For each output returns ``(ref, sum_abs,
    operand_l2)`` as test_attention's ``_sequence_reference`` does, with the position terms added to every score
    (their magnitudes to the scores' ``W``) and to every gradient: dQ gets dS against the position key of each pair,
    dK against the position query, and a table row gets dS against the queries (keys) of the pairs it serves."""
    heads, queries, head_dim = q.shape
    table = pk if pk is not None else pq
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    if k.shape[1] == 0:  # no valid key: zero output and gradients
        zq, zk, zt = q.new_zeros(q.shape), k.new_zeros(k.shape), table.new_zeros(table.shape)
        zeros = {"out": zq, "dq": zq, "dk": zk, "dv": zk, "dpk": zt, "dpq": zt}
        return {
            name: (z,) * 3
            for name, z in zeros.items()
            if not (name == "dpk" and pk is None or name == "dpq" and pq is None)
        }
    onehot = F.one_hot(rel, table.shape[1]).double()  # [queries, keys, rows]
    s, a = q @ t(k), q.abs() @ t(k.abs())
    if pk is not None:
        pkg = pk[:, rel]  # [heads, queries, keys, head_dim]: the position key of each pair
        s = s + (q[:, :, None] * pkg).sum(-1)
        a = a + (q.abs()[:, :, None] * pkg.abs()).sum(-1)
    if pq is not None:
        pqg = pq[:, rel]
        s = s + (k[:, None] * pqg).sum(-1)
        a = a + (k.abs()[:, None] * pqg.abs()).sum(-1)
    p = (scale * s).softmax(dim=-1)
    a = scale * a
    w = p * (1 + a + (p * a).sum(dim=-1, keepdim=True))
    mult = 1.0 if keep is None else keep.double()
    pd, wd = p * mult, w * mult
    dp = (do @ t(v)) * mult
    dp_delta = dp - (do * o).sum(dim=-1, keepdim=True)
    ds = p * dp_delta
    m = w * dp_delta.abs() + p * ((do.abs() @ t(v.abs())) * mult + (do * o).abs().sum(dim=-1, keepdim=True))
    pd2, ds2 = rounded_magnitude(pd, dtype).square(), rounded_magnitude(ds, dtype).square()
    dq = [scale * ds @ k, scale * m @ k.abs(), ds2 @ k.square()]
    dk = [scale * t(ds) @ q, scale * t(m) @ q.abs(), t(ds2) @ q.square()]
    out = {
        "out": (pd @ v, wd @ v.abs(), (pd2 @ v.square()).sqrt()),
        "dv": (t(pd) @ do, t(wd) @ do.abs(), (t(pd2) @ do.square()).sqrt()),
    }
    if pk is not None:
        dq[0] = dq[0] + scale * torch.einsum("hij,hijd->hid", ds, pkg)
        dq[1] = dq[1] + scale * torch.einsum("hij,hijd->hid", m, pkg.abs())
        dq[2] = dq[2] + torch.einsum("hij,hijd->hid", ds2, pkg.square())
        out["dpk"] = (
            scale * torch.einsum("hij,ijr,hid->hrd", ds, onehot, q),
            scale * torch.einsum("hij,ijr,hid->hrd", m, onehot, q.abs()),
            scale * torch.einsum("hij,ijr,hid->hrd", ds2, onehot, q.square()).sqrt(),
        )
    if pq is not None:
        dk[0] = dk[0] + scale * torch.einsum("hij,hijd->hjd", ds, pqg)
        dk[1] = dk[1] + scale * torch.einsum("hij,hijd->hjd", m, pqg.abs())
        dk[2] = dk[2] + torch.einsum("hij,hijd->hjd", ds2, pqg.square())
        out["dpq"] = (
            scale * torch.einsum("hij,ijr,hjd->hrd", ds, onehot, k),
            scale * torch.einsum("hij,ijr,hjd->hrd", m, onehot, k.abs()),
            scale * torch.einsum("hij,ijr,hjd->hrd", ds2, onehot, k.square()).sqrt(),
        )
    out["dq"] = (dq[0], dq[1], scale * dq[2].sqrt())
    out["dk"] = (dk[0], dk[1], scale * dk[2].sqrt())
    return out


def _inputs(total, rows, head_dim, dtype, seed):
    """q, k, v, dO ``[total, heads, head_dim]`` and the position tables ``[rows, heads, head_dim]``, rounded to
    ``dtype`` and held in float32."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, 3, HEADS, head_dim, generator=g).to(dtype).float()
    do = torch.randn(total, HEADS, head_dim, generator=g).to(dtype).float()
    tables = torch.randn(rows, 2, HEADS, head_dim, generator=g).to(dtype).float()
    return qkv, do, tables


def _run(lengths, head_dim, terms, buckets, dtype, seed, dropout_p=0.0, dropout_seed=None):
    """The kernel once on guarded buffers over a varlen batch; returns the inputs and every output."""
    c2p, p2c = TERMS[terms]
    span = kernel.position_span(*buckets)
    cu, max_seqlen = _cu_seqlens(list(lengths)), max(lengths)
    qkv, do, tables = _inputs(sum(lengths), 2 * span, head_dim, dtype, seed)
    guard = GuardedBuffers()
    with patched(kernel, _empty=guard.empty):
        leaf = guard.place(qkv.to(dtype), requires_grad=True)
        table_leaf = guard.place(tables.to(dtype), requires_grad=True)
        pk, pq = table_leaf.unbind(1)  # strided views into one buffer, like one projection of the table
        out = kernel.disentangled_attention(
            *leaf.unbind(1),
            guard.place(cu),
            max_seqlen,
            pk if c2p else None,
            pq if p2c else None,
            *buckets,
            dropout_p=dropout_p,
            seed=dropout_seed,
        )
        out.backward(guard.place(do.to(dtype)))
    guard.check()
    assert out.dtype == leaf.grad.dtype == table_leaf.grad.dtype == dtype
    outputs = {"out": out, "dq": leaf.grad[:, 0], "dk": leaf.grad[:, 1], "dv": leaf.grad[:, 2]}
    if c2p:
        outputs["dpk"] = table_leaf.grad[:, 0]
    if p2c:
        outputs["dpq"] = table_leaf.grad[:, 1]
    return qkv, do, tables, outputs


def _varlen_reference(lengths, qkv, do, tables, out, terms, buckets, head_dim, dtype, keep=None, dropout_p=0.0):
    """name -> (ref, sum_abs, operand_l2) over the whole batch, the tables' gradients summed over sequences."""
    c2p, p2c = TERMS[terms]
    scale = kernel.score_scale(head_dim, c2p + p2c)
    cu = _cu_seqlens(list(lengths))
    pk, pq = (tables[:, i].double().transpose(0, 1) for i in range(2))
    parts, table_grads = {name: [] for name in ("out", "dq", "dk", "dv")}, {}
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        q, k, v = (qkv[lo:hi, i].double().transpose(0, 1) for i in range(3))
        n = hi - lo
        sequence_keep = None if keep is None else keep[b, :, :n, :n] / (1.0 - dropout_p)
        sequence = _sequence_reference(
            q,
            k,
            v,
            do[lo:hi].double().transpose(0, 1),
            host(out[lo:hi]).double().transpose(0, 1),
            pk if c2p else None,
            pq if p2c else None,
            kernel.relative_index(n, *buckets),
            scale,
            dtype,
            sequence_keep,
        )
        for name, tensors in sequence.items():
            if name in parts:
                parts[name].append([x.transpose(0, 1) for x in tensors])
            else:  # [heads, rows, head_dim] -> [rows, heads, head_dim], summed over the batch
                summed = table_grads.get(name)
                tensors = [x.transpose(0, 1) for x in tensors]
                if summed is None:
                    table_grads[name] = tensors
                else:
                    table_grads[name] = [
                        summed[0] + tensors[0],
                        summed[1] + tensors[1],
                        (summed[2] ** 2 + tensors[2] ** 2).sqrt(),
                    ]
    reference = {name: [torch.cat(column) for column in zip(*chunks, strict=True)] for name, chunks in parts.items()}
    return {**reference, **table_grads}


def _compare_all(outputs, reference, ops):
    return {
        name: compare(
            name, fused, reference[name][0], sum_abs=reference[name][1], ops=ops, operand_l2=reference[name][2]
        )
        for name, fused in outputs.items()
    }


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (sequence lengths, head_dim, position terms, (position_buckets, max_relative_positions)). Buckets of 16 with
# distances up to 64: exact for |i - j| <= 8, logarithmic to 63, the clamped end row beyond (129 reaches all three).
VARLEN_CASES = [
    ((1, 37, 129), 32, "c2p|p2c", (16, 64)),
    ((1, 37, 64), 64, "c2p", (16, 64)),
    ((129,), 32, "p2c", (32, 100)),
    ((37, 5), 128, "c2p|p2c", (-1, 24)),  # raw distances, clamped past 24
    ((5, 0, 17), 32, "c2p|p2c", (8, 16)),  # an empty sequence in the batch
]


@functools.cache
def varlen_comparisons(lengths, head_dim, terms, buckets, dtype) -> dict[str, Comparison]:
    """The kernel run once; every output against float64 from the same rounded inputs (cached: test_mutations.py
    reuses it)."""
    qkv, do, tables, outputs = _run(lengths, head_dim, terms, buckets, dtype, seed=sum(lengths) + head_dim)
    reference = _varlen_reference(lengths, qkv, do, tables, outputs["out"], terms, buckets, head_dim, dtype)
    return _compare_all(outputs, reference, ops=2 * sum(lengths) + 2 * head_dim + 2 * 64 + 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("lengths", "head_dim", "terms", "buckets"), VARLEN_CASES, ids=str)
def test_varlen_matches_reference(lengths, head_dim, terms, buckets, dtype):
    comparisons = varlen_comparisons(lengths, head_dim, terms, buckets, dtype)
    assert set(comparisons) == {"out", "dq", "dk", "dv"} | {
        f"d{'pk' if t == 'c2p' else 'pq'}" for t in terms.split("|")
    }
    for comparison in comparisons.values():
        comparison.check()


PADDED_LENGTHS, PADDED_SEQ, PADDED_BUCKETS = (50, 0, 64, 1), 64, (16, 64)  # row 1 is all padding


@functools.cache
def padded_comparisons(dtype: torch.dtype) -> dict[str, Comparison]:
    """``disentangled_attention_padded`` in the reference's layout with a key mask (queries at padding positions
    computed too), run once."""
    lengths, seq, head_dim, buckets = PADDED_LENGTHS, PADDED_SEQ, 64, PADDED_BUCKETS
    span = kernel.position_span(*buckets)
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(len(lengths), 3, HEADS, seq, head_dim, generator=g).to(dtype)
    do = torch.randn(len(lengths), HEADS, seq, head_dim, generator=g).to(dtype)
    tables = torch.randn(2, HEADS, 2 * span, head_dim, generator=g).to(dtype)
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    guard = GuardedBuffers()
    with patched(kernel, _empty=guard.empty):
        leaf = guard.place(qkv, requires_grad=True)
        table_leaf = guard.place(tables, requires_grad=True)
        out = kernel.disentangled_attention_padded(*leaf.unbind(1), *table_leaf.unbind(0), guard.place(mask), *buckets)
        out.backward(guard.place(do))
    guard.check()
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a fully padded row attends to nothing"
    assert torch.equal(leaf.grad[0, 1:, :, 50:], torch.zeros_like(leaf.grad[0, 1:, :, 50:])), "padding keys get no grad"

    scale = kernel.score_scale(head_dim, 2)
    rel = kernel.relative_index(seq, *buckets)
    rows, table_grads = [], None
    for b, n in enumerate(lengths):
        q, k, v = (qkv[b, i].double() for i in range(3))
        sequence = _sequence_reference(
            q, k[:, :n], v[:, :n], do[b].double(), host(out[b]).double(), *tables.double(), rel[:, :n], scale, dtype
        )
        for name in ("dk", "dv"):  # keys past the valid ones: zero gradient
            sequence[name] = [torch.cat([x, x.new_zeros(HEADS, seq - n, head_dim)], dim=1) for x in sequence[name]]
        rows.append(sequence)
        grads = [sequence["dpk"], sequence["dpq"]]
        if table_grads is None:
            table_grads = grads
        else:
            table_grads = [
                [s[0] + g[0], s[1] + g[1], (s[2] ** 2 + g[2] ** 2).sqrt()]
                for s, g in zip(table_grads, grads, strict=True)
            ]
    reference = {
        name: [torch.stack([row[name][j] for row in rows]) for j in range(3)] for name in ("out", "dq", "dk", "dv")
    }
    reference["dpk"], reference["dpq"] = table_grads
    outputs = {"out": out, "dq": leaf.grad[:, 0], "dk": leaf.grad[:, 1], "dv": leaf.grad[:, 2]}
    outputs.update(dpk=table_leaf.grad[0], dpq=table_leaf.grad[1])
    return _compare_all(outputs, reference, ops=2 * len(lengths) * seq + 2 * head_dim + 2 * 64 + 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_padded_with_key_mask(dtype):
    for comparison in padded_comparisons(dtype).values():
        comparison.check()


DROPOUT_LENGTHS, DROPOUT_P, DROPOUT_SEED = (37, 64), 0.3, 4321


@functools.cache
def dropout_comparisons() -> dict[str, Comparison]:
    """Dropout with the kernels' own keep mask (attention.py's philox keys), float32, against float64 given that
    mask: the backward regenerates it exactly."""
    lengths, head_dim, terms, buckets = DROPOUT_LENGTHS, 32, "c2p|p2c", (16, 64)
    max_seqlen = max(lengths)
    keep = torch.empty(len(lengths) * HEADS, max_seqlen, max_seqlen, device=DEVICE)
    _dropout_keep_grid[(len(lengths) * HEADS,)](keep, HEADS, max_seqlen, DROPOUT_P, DROPOUT_SEED, BLOCK=64)
    keep = host(keep).view(len(lengths), HEADS, max_seqlen, max_seqlen)
    qkv, do, tables, outputs = _run(
        lengths, head_dim, terms, buckets, torch.float32, seed=5, dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED
    )
    reference = _varlen_reference(
        lengths, qkv, do, tables, outputs["out"], terms, buckets, head_dim, torch.float32, keep, DROPOUT_P
    )
    return _compare_all(outputs, reference, ops=2 * sum(lengths) + 2 * head_dim + 2 * 64 + 16)


def test_dropout_matches_reference_given_the_kernels_mask():
    for comparison in dropout_comparisons().values():
        comparison.check()
    _, _, _, again = _run(DROPOUT_LENGTHS, 32, "c2p|p2c", (16, 64), torch.float32, 5, DROPOUT_P, DROPOUT_SEED + 1)
    assert not torch.equal(host(again["out"]), dropout_comparisons()["out"].fused), "another seed, another mask"


def test_reference_gradients_are_autograd_of_the_models_reference():
    """``_sequence_reference`` (its output and hand-written gradients) is ``reference``, the model's definition,
    and its autograd, at lengths past the exact band and the clamp."""
    g = torch.Generator().manual_seed(3)
    n, d, buckets = 41, 16, (8, 20)
    span = kernel.position_span(*buckets)
    q, k, v, do = (torch.randn(HEADS, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    pk, pq = (torch.randn(HEADS, 2 * span, d, generator=g, dtype=torch.float64) for _ in range(2))
    keep = (torch.rand(HEADS, n, n, generator=g) > 0.25).double()
    rel = kernel.relative_index(n, *buckets)
    for c2p, p2c in TERMS.values():
        for mult in (None, keep / 0.75):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, pk, pq)]
            tables = (leaves[3] if c2p else None, leaves[4] if p2c else None)
            with patched(F, dropout=lambda x, p, mult=mult: x * mult):  # the reference's dropout, this mask
                out = kernel.reference(
                    *(x[None] for x in leaves[:3]), rel, *tables, dropout_p=0.0 if mult is None else 0.25
                )[0]
            out.backward(do)
            ref = _sequence_reference(
                q,
                k,
                v,
                do,
                out.detach(),
                pk if c2p else None,
                pq if p2c else None,
                rel,
                kernel.score_scale(d, c2p + p2c),
                torch.float64,
                mult,
            )
            torch.testing.assert_close(ref["out"][0], out.detach())
            names = ["dq", "dk", "dv"] + (["dpk"] if c2p else []) + (["dpq"] if p2c else [])
            for name in names:
                leaf = leaves[["dq", "dk", "dv", "dpk", "dpq"].index(name)]
                torch.testing.assert_close(ref[name][0], leaf.grad, msg=f"{name} c2p={c2p} p2c={p2c}")
            assert ("dpk" in ref) == c2p and ("dpq" in ref) == p2c


@pytest.mark.parametrize("buckets", [(256, 512), (16, 64), (8, 16), (-1, 24), (64, 2048)], ids=str)
def test_distance_rows_are_the_reference_relative_index(buckets):
    """The kernel's table row per distance equals ``relative_index`` for every (query, key) pair, through the exact
    band, the log buckets and the clamp (DeBERTa-v3's 256 buckets over 512 positions at 2048 tokens: every bucket
    edge up to distance 2047)."""
    length = 2048 if buckets[0] == 256 else 300
    rows = kernel.distance_rows(length, *buckets)
    index = kernel.relative_index(length, *buckets)
    pos = torch.arange(length)
    assert rows.dtype == torch.int32 and rows.shape == (2 * length - 1,)
    assert torch.equal(rows[pos[:, None] - pos[None, :] + length - 1].long(), index)


def test_gradients_reach_the_relative_embeddings_through_shared_and_separate_projections():
    """The model's use: the position tables are the relative embeddings through the key / query projections
    (``share_att_key``) or through projections of their own; every weight's gradient matches the reference's."""
    seq, head_dim, buckets = 40, 32, (16, 64)
    hidden, span = HEADS * head_dim, kernel.position_span(*buckets)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, seq, hidden, generator=g)
    mask = torch.arange(seq)[None, :] < torch.tensor([seq, 23])[:, None]
    for share in (True, False):
        weights = {name: torch.randn(hidden, hidden, generator=g) / hidden**0.5 for name in ("q", "k", "v", "pk", "pq")}
        table = torch.randn(2 * span, hidden, generator=g)
        grads = {}
        for name in ("kernel", "reference"):
            leaves = {
                n: to_device(w, True) if name == "kernel" else w.double().requires_grad_() for n, w in weights.items()
            }
            rel = to_device(table, True) if name == "kernel" else table.double().requires_grad_()
            inp = to_device(x) if name == "kernel" else x.double()

            def heads(y):
                return y.view(*y.shape[:-1], HEADS, head_dim).transpose(-2, -3)

            q, k, v = (heads(inp @ leaves[n].T) for n in "qkv")
            pos_key = heads(rel @ leaves["k" if share else "pk"].T)
            pos_query = heads(rel @ leaves["q" if share else "pq"].T)
            if name == "kernel":
                out = kernel.disentangled_attention_padded(q, k, v, pos_key, pos_query, to_device(mask), *buckets)
            else:
                out = kernel.reference(q, k, v, kernel.relative_index(seq, *buckets), pos_key, pos_query, mask)
            (
                out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
            ).sum().backward()
            grads[name] = {n: host(w.grad) for n, w in leaves.items() if w.grad is not None} | {"table": host(rel.grad)}
        assert (
            set(grads["kernel"])
            == set(grads["reference"])
            == {"q", "k", "v", "table"} | (set() if share else {"pk", "pq"})
        )
        for n, ref in grads["reference"].items():
            assert_close(f"share={share} d{n}", grads["kernel"][n], ref.float(), ref.float(), ulps=64)


def test_unservable_configurations_are_refused():
    q = torch.randn(4, HEADS, 48, device=DEVICE)
    cu = _cu_seqlens([4]).to(DEVICE)
    table = torch.randn(32, HEADS, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim=48"):
        kernel.disentangled_attention(q, q, q, cu, 4, table, None, 16, 64)
    q = torch.randn(4, HEADS, 32, device=DEVICE)
    with pytest.raises(ValueError, match="pos_key and pos_query are both None"):
        kernel.disentangled_attention(q, q, q, cu, 4, None, None, 16, 64)
    with pytest.raises(ValueError, match="pos_query"):
        kernel.disentangled_attention(q, q, q, cu, 4, None, torch.randn(32, HEADS + 1, 32, device=DEVICE), 16, 64)
    with pytest.raises(ValueError, match="cu_seqlens dtype"):
        kernel.disentangled_attention(q, q, q, cu.long(), 4, torch.randn(32, HEADS, 32, device=DEVICE), None, 16, 64)
    with pytest.raises(ValueError, match="dropout_p=1.0"):
        kernel.disentangled_attention(q, q, q, cu, 4, torch.randn(32, HEADS, 32, device=DEVICE), None, 16, 64, 1.0)
    mask = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    mask[1, 0] = False
    x = torch.randn(2, HEADS, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="key_mask row 1"):
        kernel.disentangled_attention_padded(x, x, x, torch.randn(HEADS, 32, 32, device=DEVICE), None, mask, 16, 64)
