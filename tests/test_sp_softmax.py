"""Sequence-parallel softmax attention against plain float64 attention over the whole sequence on
one process (outputs, dq, dk, dv): world sizes 1-4 x both methods x both layouts x GQA x {batch of 2,
packed documents crossing ranks} x {no window, windows shorter and longer than a shard}, odd shard
lengths. Real gloo collectives; workers are spawned once per world size and loop over the cases.
Also: what crosses the wire (the window fetches only the keys in reach), the errors raised on every
rank before anything moves, and the single-device blockwise split with small math chunks."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from seqpar import sp
from seqpar.comm import counting
from seqpar.sp import blockwise
from seqpar.testing import run_ranks
from seqpar_kernels import InputError
from seqpar_kernels.testing import rel_err

TOL = 1e-10
D = 8


def reference(q, k, v, causal=True, cu=None, window=None):
    """Plain attention with the whole mask materialised (fine at test sizes)."""
    T, G = q.shape[1], q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    ok = torch.ones(T, T, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window:
        ok &= i - j < window
    if cu:
        doc = torch.bucketize(torch.arange(T), torch.tensor(cu[1:]), right=True)
        ok &= doc[:, None] == doc[None]
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s.masked_fill(~ok, float("-inf")), -1), v)


def documents(T: int, P: int) -> list[int]:
    """Odd-length documents crossing rank boundaries, one of a single token; P = 3: one spanning
    all three ranks; otherwise one ending exactly on a shard edge and (P = 4) one spanning three."""
    S = T // P
    cuts = {0, 1, 6, 2 * S + 2, T - 1, T} if P == 3 else {0, 1, 6, S, S + 3, T - 4, T}
    return sorted(cuts & set(range(T + 1)))


def problem(P, layout, B, Hq, Hkv, packed, seed):
    """Whole-sequence inputs and output gradient, identical on every rank (same seed). Shards have
    odd lengths: contiguous 7 tokens per rank, zigzag 2 x 5."""
    T = P * 7 if layout == "contiguous" else 2 * P * 5
    gen = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, T, Hq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, T, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return (q, k, v, do), (documents(T, P) if packed else None)


def check_case(rank, P, method, layout, heads, packed, causal, window, seed=0):
    group = dist.group.WORLD
    B = 1 if packed else 2
    (q, k, v, do), cu = problem(P, layout, B, *heads, packed, seed)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference(*leaves, causal=causal, cu=cu, window=window)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, do)]
    local = [sp.shard(x, group, layout).detach().clone().requires_grad_() for x in (q, k, v)]
    o = sp.softmax_attention(*local, group=group, method=method, layout=layout, causal=causal, cu_seqlens=cu,
                             window=window)
    o.backward(sp.shard(do, group, layout))
    got = [o.detach()] + [x.grad for x in local]
    errs = {n: rel_err(g, sp.shard(w, group, layout)) for n, g, w in zip(("o", "dq", "dk", "dv"), got, want)}
    what = f"P={P}/{method}/{layout}/heads={heads}/{'packed' if packed else 'B=2'}/causal={causal}/window={window}"
    return what, {n: e for n, e in errs.items() if not e < TOL}


def all_cases():
    masks = [(False, True, None), (False, True, 3), (False, True, 9), (True, True, None), (True, True, 1),
             (True, True, 6), (True, True, 100), (True, False, None)]
    gqa = [(m, lay, (4, 2), *mask) for m, lay, mask in itertools.product(sp.SOFTMAX_METHODS, sp.LAYOUTS, masks)]
    mha = [(m, lay, (2, 2), True, True, 6) for m, lay in itertools.product(sp.SOFTMAX_METHODS, sp.LAYOUTS)]
    return gqa + mha


def traffic(rank, P):
    """Per method: (all_gather calls, reduce_scatter calls, bytes sent) of one forward + backward."""
    group = dist.group.WORLD
    (q, k, v, do), _ = problem(P, "contiguous", 1, 4, 2, False, seed=1)
    out = {}
    for method, window in [("allgather", None), ("ring", None), ("allgather", 3), ("ring", 3)]:
        local = [sp.shard(x, group).detach().clone().requires_grad_() for x in (q, k, v)]
        with counting() as s:
            o = sp.softmax_attention(*local, group=group, method=method, window=window, validate=False)
            o.backward(sp.shard(do, group))
        out[(method, window)] = (s.calls["all_gather"], s.calls["reduce_scatter"], s.bytes_sent["send"])
    return out


ERRORS = {"gqa": "multiple of key/value heads", "window": "window must be a positive int",
          "zigzag_odd": "cannot be split", "shape_one_rank": "differs across the ranks", "method": "unknown method",
          "layout": "unknown layout", "cu_differs": "cu_seqlens differs"}


def bad_call(rank, case):
    group = dist.group.WORLD
    q = torch.randn(1, 6, 4, D, dtype=torch.float64)
    kv = torch.randn(1, 6, 2, D, dtype=torch.float64)
    kw = dict(group=group)
    if case == "gqa":
        kv = torch.randn(1, 6, 3, D, dtype=torch.float64)
    elif case == "window":
        kw["window"] = 0
    elif case == "zigzag_odd":
        q, kv = q[:, :5], kv[:, :5]
        kw["layout"] = "zigzag"
    elif case == "shape_one_rank" and rank == 1:
        q, kv = q[:, :4], kv[:, :4]
    elif case == "method":
        kw["method"] = "alltoall"
    elif case == "layout":
        kw["layout"] = "striped"
    elif case == "cu_differs":
        kw["cu_seqlens"] = [0, 5, 12] if rank == 0 else [0, 6, 12]
    try:
        sp.softmax_attention(q, kv, kv, **kw)
    except InputError as e:
        return str(e)
    return None


def worker(rank, P):
    """Everything one world size checks, in one spawn: the sweep, and (P = 2) the errors and
    (P = 3) the traffic."""
    failures = []
    for case in all_cases():
        what, bad = check_case(rank, P, *case)
        if bad:
            failures.append(f"{what}: " + ", ".join(f"{k} err {v:.1e}" for k, v in bad.items()))
    return {"failures": failures, "errors": {c: bad_call(rank, c) for c in ERRORS} if P == 2 else None,
            "traffic": traffic(rank, P) if P == 3 else None}


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(P):
        if P not in cache:
            cache[P] = run_ranks(worker, P)
        return cache[P]
    return get


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_sp_softmax_matches_whole_sequence(results, P):
    failures = sorted(set(f for r in results(P) for f in r["failures"]))
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:40])


def test_errors_on_every_rank_before_anything_moves(results):
    for case, phrase in ERRORS.items():
        msgs = [r["errors"][case] for r in results(2)]
        assert all(m is not None and phrase in m for m in msgs), (case, msgs)


def test_traffic_per_method(results):
    P = 3
    per_token = 2 * 2 * D * 8  # K and V (or dK and dV: float64 is also the accumulation dtype), 2 KV heads
    for rank, r in enumerate(r["traffic"] for r in results(P)):
        # LASP-2H: one all-gather forward, one re-gather and one reduce-scatter backward, nothing else
        assert r[("allgather", None)] == (2, 1, 0)
        # ring, contiguous, causal: rank r sends its whole shard (7 tokens) to each later rank, forward
        # and backward, and the earlier ranks' gradients for their shards go back to them
        later, earlier = P - 1 - rank, rank
        assert r[("ring", None)] == (0, 0, (2 * later + earlier) * 7 * per_token)
        # window 3: only the last 2 keys of a shard are in reach of the next rank
        for method in ("allgather", "ring"):
            assert r[(method, 3)] == (0, 0, (2 * (later > 0) + (earlier > 0)) * 2 * per_token)


# ---- the single-device blockwise split (the LSE merge inside one device) -------------------------------
@pytest.mark.parametrize("B,T,heads,causal,cu,window,block,chunk", [
    (2, 37, (4, 2), True, None, None, 5, 3),
    (1, 37, (4, 1), True, [0, 5, 17, 30, 37], None, 6, 4),
    (1, 37, (2, 2), True, [0, 5, 17, 30, 37], 4, 7, 3),
    (2, 37, (2, 1), True, None, 9, 4, 2),
    (1, 37, (2, 2), False, [0, 5, 17, 30, 37], None, 7, 3),
    (2, 23, (2, 2), False, None, None, 5, 4),
    (1, 40, (4, 2), True, [0, 1, 2, 39, 40], 1, 3, 2),
])
def test_blockwise_split_matches_reference(B, T, heads, causal, cu, window, block, chunk):
    gen = torch.Generator().manual_seed(T + B)
    q = torch.randn(B, T, heads[0], D, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, T, heads[1], D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    o = blockwise.attention(q, k, v, causal=causal, cu_seqlens=cu, window=window, block_size=block, chunk=chunk)
    ref = reference(q, k, v, causal, cu, window)
    for got, want in zip([o, *torch.autograd.grad(o, (q, k, v), do)], [ref, *torch.autograd.grad(ref, (q, k, v), do)]):
        assert rel_err(got, want) < TOL


def test_tiles_never_hold_an_empty_row():
    """Every tile row sees at least one key, so a tile's log-sum-exp is finite (flash relies on it)."""
    for mask in [blockwise.Mask(True, w, cu) for w in (None, 1, 3, 8) for cu in (None, (0, 3, 4, 11, 20))]:
        for q0, k0 in itertools.product(range(0, 20, 4), range(0, 20, 3)):
            for t in blockwise.tiles(mask, q0, min(q0 + 4, 20), k0, min(k0 + 3, 20)):
                nq, nk = t.q1 - t.q0, t.k1 - t.k0
                for r in range(nq):
                    lo = 0 if t.left is None else r + nk - nq - t.left
                    hi = nk - 1 if t.right is None else r + nk - nq + t.right
                    assert max(lo, 0) <= min(hi, nk - 1), (mask, t, r)


def test_tiles_cover_the_mask_exactly_in_flash_terms():
    """The tiles of a block pair see exactly the (query, key) pairs the mask allows, each once, and
    a banded tile never has more queries than keys (FlashAttention's varlen kernels read an open or
    over-wide band side as the number of keys, so such a tile would lose rows on the GPU)."""
    T = 24
    for mask in [blockwise.Mask(True, w, cu) for w in (None, 1, 4, 9) for cu in (None, (0, 5, 6, 17, 24))]:
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        want = (j <= i) & ((i - j < mask.window) if mask.window else True)
        if mask.cu_seqlens:
            doc = torch.bucketize(torch.arange(T), torch.tensor(mask.cu_seqlens[1:]), right=True)
            want &= doc[:, None] == doc[None]
        for (q0, nq), (k0, nk) in itertools.product([(0, 11), (11, 13), (3, 7)], [(0, 3), (3, 8), (11, 13), (0, 24)]):
            got = torch.zeros(T, T, dtype=torch.long)
            for t in blockwise.tiles(mask, q0, q0 + nq, k0, k0 + nk):
                tq, tk = t.q1 - t.q0, t.k1 - t.k0
                assert (t.left is None and t.right is None) or tq <= tk, (mask, t)
                r, c = torch.arange(tq)[:, None], torch.arange(tk)[None]
                ok = torch.ones(tq, tk, dtype=torch.bool)
                if t.right is not None:
                    ok &= c <= r + tk - tq + t.right
                if t.left is not None:
                    ok &= c >= r + tk - tq - t.left
                got[t.q0:t.q1, t.k0:t.k1] += ok
            block = torch.zeros(T, T, dtype=torch.bool)
            block[q0:q0 + nq, k0:k0 + nk] = True
            assert torch.equal(got, (want & block).long()), (mask, q0, nq, k0, nk)


# ---- the GPU benchmark runs end to end on CPU ranks (a smoke test; its numbers come from GPUs) ----------
def test_bench_softmax_smoke(tmp_path):
    import json

    from seqpar.testing import run_cli

    out = str(tmp_path / "softmax.json")
    assert run_cli(["bench", "softmax", "--seq-lens", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                    "--dtype", "fp32", "--repeat", "1", "--warmup", "0", "--check-len", "48", "--split-len", "37",
                    "--out", out], 2) == [0, 0]
    data = json.loads(open(out).read())
    assert data["meta"]["P"] == 2 and data["meta"]["impl"] == "math"
    assert len(data["checks"]) == 5 + 2 * 2 * 2 and all(c["pass"] for c in data["checks"])
    assert len(data["results"]) == 2 * 2
    for r in data["results"]:
        assert r["sp_ms"] > 0 and r["sdpa_1gpu_ms"] > 0 and r["efficiency"] > 0
