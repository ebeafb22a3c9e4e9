"""Sequence-parallel linear attention against the float64 naive recurrence over the whole sequence
on one process: outputs, final state and every gradient, for every variant x method x layout x
world size 1-4 x {batch of 2, packed documents crossing ranks} x {with, without initial state}.
Real gloo collectives; the workers are spawned once per world size and loop over the cases."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import seqpar_kernels as sk
from seqpar import sp
from seqpar.comm import counting
from seqpar.testing import run_ranks
from seqpar_kernels.testing import random_inputs, rel_err

VARIANTS = list(sk.VARIANTS)
TOL = 1e-9


def packed_boundaries(T: int, P: int) -> list[int]:
    """Documents of odd lengths, one ending exactly on a contiguous shard edge (which is also a
    zigzag edge) and, for P >= 3, one spanning three ranks."""
    S = T // P
    cuts = {0, 5, S, S + 3, 3 * S - 2, T - 4, T}
    return sorted(c for c in cuts if 0 <= c <= T)


def full_problem(variant, P, packed, with_h0, seed, L):
    """The whole-sequence inputs and upstream gradients, identical on every rank (same seed)."""
    T = 2 * P * L
    B, cu = (1, packed_boundaries(T, P)) if packed else (2, None)
    n_states = len(cu) - 1 if packed else B
    x = random_inputs(variant, B=B, T=T, H=2, K=3, V=4, n_states=n_states, initial_state=with_h0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    # each rank's loss uses the final state with its own weight: the reference sums them
    dht = [torch.randn(n_states, 2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(P)]
    return x, cu, do, dht


def reference(variant, x, cu, do, dht_total):
    leaves = {n: t.clone().requires_grad_() for n, t in x.tensors().items()}
    o, ht = sk.naive(variant, leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"), beta=leaves.get("beta"),
                     initial_state=leaves.get("initial_state"), output_final_state=True,
                     cu_seqlens=torch.tensor(cu) if cu else None)
    torch.autograd.backward([o, ht], [do, dht_total])
    return o.detach(), ht.detach(), {n: t.grad for n, t in leaves.items()}


def check_case(rank, P, variant, method, layout, packed, with_h0, L=5, seed=0, backend="torch",
               dtype=torch.float64, tol=TOL, ht_ranks=None):
    """ht_ranks: the ranks whose loss uses the final state (default: all)."""
    group = dist.group.WORLD
    x, cu, do, dht = full_problem(variant, P, packed, with_h0, seed, L)
    ht_ranks = range(P) if ht_ranks is None else ht_ranks
    o_ref, ht_ref, g_ref = reference(variant, x, cu, do, sum(dht[r] for r in ht_ranks))

    def local(t):
        return sp.shard(t, group, layout)

    # per-token tensors are sharded; initial_state and lightning's per-head decay are replicated
    replicated = {"initial_state"} | ({"g"} if variant == "lightning" else set())
    leaves = {n: (t if n in replicated else local(t)).detach().to(dtype).requires_grad_()
              for n, t in x.tensors().items()}
    o, ht = sp.linear_attention(leaves["q"], leaves["k"], leaves["v"], variant=variant, g=leaves.get("g"),
                                beta=leaves.get("beta"), initial_state=leaves.get("initial_state"),
                                output_final_state=True, cu_seqlens=cu, group=group, method=method,
                                layout=layout, backend=backend, zeco_slices=3)
    if rank in ht_ranks:
        torch.autograd.backward([o, ht], [local(do).to(dtype), dht[rank].to(ht.dtype)])
    else:  # this rank's loss ignores the final state: no gradient arrives for it here
        o.backward(local(do).to(dtype))
    what = f"{variant}/{method}/{layout}/P={P}/{'packed' if packed else 'B=2'}/h0={with_h0}"
    errs = {"o": rel_err(o, local(o_ref)), "ht": rel_err(ht, ht_ref)}
    for n, leaf in leaves.items():
        got = leaf.grad
        if n in replicated:
            dist.all_reduce(got)  # each rank holds its share of a replicated input's gradient
            want = g_ref[n]
        else:
            want = local(g_ref[n])
        errs["d" + n] = rel_err(got, want)
    bad = {k: v for k, v in errs.items() if not v < tol}
    return what, bad


def sweep(rank, P, cases):
    failures = []
    for case in cases:
        what, bad = check_case(rank, P, *case)
        if bad:
            failures.append(f"{what}: " + ", ".join(f"{k} err {v:.1e}" for k, v in bad.items()))
    return failures


def all_cases():
    return list(itertools.product(VARIANTS, sp.METHODS, sp.LAYOUTS, [False, True], [False, True]))


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_sp_matches_whole_sequence(P):
    cases = all_cases()
    results = run_ranks(sweep, P, args=(cases,))
    failures = sorted(set(f for r in results for f in r))
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:40])


def longer_cases(rank, P):
    """Shards longer than the reference kernel's 64-token chunk: several chunks per shard."""
    fails = []
    for variant in VARIANTS:
        for method, layout, packed in [("lasp2", "zigzag", True), ("zeco", "contiguous", False),
                                       ("ring", "zigzag", False)]:
            what, bad = check_case(rank, P, variant, method, layout, packed, True, L=70, seed=3)
            if bad:
                fails.append(f"{what}: {bad}")
    return fails


def test_sp_multi_chunk_shards():
    assert not any(run_ranks(longer_cases, 2))


def final_state_on_some_ranks(rank, P):
    fails = []
    for variant, method in [("simple_gla", "lasp2"), ("gated_delta_rule", "zeco")]:
        what, bad = check_case(rank, P, variant, method, "zigzag", True, True, ht_ranks=[1])
        if bad:
            fails.append(f"{what}: {bad}")
    return fails


def test_final_state_used_by_some_ranks_only():
    """A rank whose loss ignores final_state gets no gradient for it but still joins the all-reduce
    that sums the others' (no hang, exact gradients)."""
    assert not any(run_ranks(final_state_on_some_ranks, 3, timeout=120))


def triton_cases(rank, P):
    """The Triton kernels under SP (fp32; the interpreter on CPU): the state pass and the kernel
    share their start-independent work through Call.memo, in forward and in backward."""
    from seqpar_kernels.triton import delta

    fails = []
    for variant in ["simple_gla", "gla", "gated_delta_rule"]:
        for method, layout, packed in [("lasp2", "zigzag", True), ("zeco", "contiguous", False)]:
            what, bad = check_case(rank, P, variant, method, layout, packed, True, L=70, seed=4, backend="triton",
                                   dtype=torch.float32, tol=1e-4)
            if bad:
                fails.append(f"{what}: {bad}")
    # the delta rules' summaries over segments of one chunk: the kernel after them runs only the
    # scan and pass 3, the reverse summary takes the forward's transitions
    delta.CONFIG["state_seg_chunks"] = 1
    for method, layout, packed in [("lasp2", "zigzag", True), ("ring", "contiguous", False)]:
        what, bad = check_case(rank, P, "gated_delta_rule", method, layout, packed, True, L=140, seed=5,
                               backend="triton", dtype=torch.float32, tol=1e-4)
        if bad:
            fails.append(f"{what} (segments): {bad}")
    return fails


def test_sp_with_triton_kernels():
    assert not any(run_ranks(triton_cases, 2, timeout=600))


def memo_handover(rank, P):
    """What the SP forward's Call kept for the backward, before and after the backward."""
    from seqpar_kernels.triton import delta

    kept = {}
    # (case, variant, tokens per rank); the last with state segments of one chunk: each half shard two
    for case, variant, t_rank in [("gla", "gla", 64), ("gated_delta_rule", "gated_delta_rule", 64),
                                  ("gated_delta_rule/segments", "gated_delta_rule", 256)]:
        if case.endswith("/segments"):
            delta.CONFIG["state_seg_chunks"] = 1
        x = random_inputs(variant, B=1, T=t_rank * P, H=1, K=16, V=16, dtype=torch.float32, initial_state=False,
                          seed=3)
        leaves = {n: sp.shard(t, None, "zigzag").requires_grad_() for n, t in x.tensors().items()}
        o, _ = sp.linear_attention(leaves["q"], leaves["k"], leaves["v"], variant=variant, g=leaves.get("g"),
                                   beta=leaves.get("beta"), layout="zigzag", backend="triton")
        # saved for the backward (through save_for_backward), left in the memo, left after the backward
        saved, left = sorted(o.grad_fn.memo_keys), sorted(o.grad_fn.memo)
        o.sum().backward()
        kept[case] = (saved, left, sorted(o.grad_fn.memo))
    return kept


def test_sp_backward_takes_what_the_forward_kept():
    """gla's forward keeps its intra-chunk matrix for the backward, the delta rules their WY inverse
    and gate (as outside SP) and, where the summary ran over segments, the segments' transitions
    for the reverse summary, all as saved tensors, and the backward uses them up; nothing else
    outlives the forward (it would hold memory until the backward)."""
    from seqpar_kernels.triton import delta, gated

    wy = [delta.WY_GATE, delta.WY_INVERSE]
    for kept in run_ranks(memo_handover, 2, timeout=600):
        assert kept == {"gla": ([gated.INTRA], [], []), "gated_delta_rule": (sorted(wy), [], []),
                        "gated_delta_rule/segments": (sorted(wy + [delta.TRANSITIONS]), [], [])}, kept


def first_and_last_transitions(rank, P):
    """The scan never uses the transition of the chain's first shard (it multiplies a zero incoming
    state) or of its last (whose outgoing state goes nowhere): garbage there changes nothing, so the
    SP layer may skip computing them (the delta rules' K x K pass)."""
    from seqpar.comm import Family, StateScan
    from seqpar.sp.plan import make_plan

    out = []
    for layout, method in itertools.product(sp.LAYOUTS, sp.METHODS):
        plan = make_plan(layout, rank, P, 1, 8 * (2 if layout == "zigzag" else 1), None)
        fam = Family("dense")
        gen = torch.Generator().manual_seed(rank)
        n = len(plan.positions)
        T, dS, D = (torch.randn(n, 1, 2, 3, 3, generator=gen), torch.randn(n, 1, 2, 3, 4, generator=gen),
                    torch.randn(n, 1, 2, 3, 4, generator=gen))
        junk = T.clone()
        for i, p in enumerate(plan.positions):
            if p in (0, plan.chain.n - 1):
                junk[i] = 7.0
        results = []
        for t in (T, junk):
            scan = StateScan(method, fam, plan.chain, plan.positions, None, 2)
            results.append((scan.forward(t, dS), scan.backward(D, t)))
        same = all(a is b is None or torch.equal(a, b) for a, b in zip(*results))  # None: a zero result
        out.append((layout, method, same, plan.needs_transitions))
    return out


@pytest.mark.parametrize("P", [2, 3])
def test_first_and_last_transitions_are_never_used(P):
    results = run_ranks(first_and_last_transitions, P)
    for rank, rows in enumerate(results):
        for layout, method, same, inner in rows:
            assert same, (P, rank, layout, method)
    # two ranks, contiguous: no rank holds an inner shard, so no K x K transition is computed
    assert P != 2 or not any(inner for rows in results for lay, _, _, inner in rows if lay == "contiguous")


# ---- what crosses the wire ---------------------------------------------------------------------

def count_traffic(rank, P):
    out = {}
    for variant, method in itertools.product(["gla", "gated_delta_rule"], sp.METHODS):
        x = random_inputs(variant, B=1, T=8 * P, H=2, K=4, V=6, initial_state=False, seed=1, dtype=torch.float32)
        leaves = {n: sp.shard(t, None, "contiguous").detach().requires_grad_() for n, t in x.tensors().items()}
        with counting() as fwd:
            o, _ = sp.linear_attention(leaves["q"], leaves["k"], leaves["v"], variant=variant, g=leaves.get("g"),
                                       beta=leaves.get("beta"), method=method, zeco_slices=3, backend="torch")
        with counting() as bwd:
            o.sum().backward()
        out[(variant, method)] = (dict(fwd.calls), dict(fwd.bytes_sent), dict(bwd.calls), dict(bwd.bytes_sent))
    return out


def test_communication_volume():
    P = 3
    results = run_ranks(count_traffic, P)
    state_bytes = 2 * 4 * 6 * 4  # H x K x V fp32
    for rank, res in enumerate(results):
        for (variant, method), (fc, fb, bc, bb) in res.items():
            if method == "lasp2":
                assert fc.get("all_gather") == 1 and bc.get("all_gather") == 1, (variant, fc, bc)
                assert "send" not in fc and "send" not in bc
            else:
                assert "all_gather" not in fc and "all_gather" not in bc
                # one state's worth per rank per direction (the last rank sends nothing forward)
                assert fb.get("send", 0) == (state_bytes if rank < P - 1 else 0), (variant, method, rank, fb)
                assert bb.get("send", 0) == (state_bytes if rank > 0 else 0), (variant, method, rank, bb)
                slices = 3 if method == "zeco" else 1
                assert fc.get("send", 0) == (slices if rank < P - 1 else 0)


# ---- errors: raised on every rank, before any data moves ---------------------------------------

def bad_calls(rank, P):
    x = random_inputs("simple_gla", B=1, T=12, H=2, K=4, V=4, initial_state=False, seed=0)
    cases = {
        "local lengths differ": dict(q=x.q[:, : 6 if rank == 0 else 4], k=x.k[:, : 6 if rank == 0 else 4],
                                     v=x.v[:, : 6 if rank == 0 else 4], g=x.g[:, : 6 if rank == 0 else 4]),
        "layout cannot split": dict(q=x.q[:, :3], k=x.k[:, :3], v=x.v[:, :3], g=x.g[:, :3], layout="zigzag"),
        "cu_seqlens differ": dict(q=x.q[:, :6], k=x.k[:, :6], v=x.v[:, :6], g=x.g[:, :6],
                                  cu_seqlens=[0, 5 + rank, 12]),
        "unknown variant": dict(q=x.q[:, :6], k=x.k[:, :6], v=x.v[:, :6], variant="mamba"),
        "unknown method": dict(q=x.q[:, :6], k=x.k[:, :6], v=x.v[:, :6], g=x.g[:, :6], method="tree"),
        "missing gate": dict(q=x.q[:, :6], k=x.k[:, :6], v=x.v[:, :6]),
        "bad gate on one rank": dict(q=x.q[:, :6], k=x.k[:, :6], v=x.v[:, :6],
                                     g=x.g[:, :6] if rank == 0 else x.g[:, :6, :1]),
    }
    messages = {}
    for name, kw in cases.items():
        kw.setdefault("variant", "simple_gla")
        try:
            sp.linear_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), backend="torch", **kw)
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def test_errors_on_every_rank():
    results = run_ranks(bad_calls, 2, timeout=120)
    expect = {
        "local lengths differ": "local_length differs",
        "layout cannot split": "cannot be split into 4 equal shards",
        "cu_seqlens differ": "cu_seqlens differs",
        "unknown variant": "unknown linear-attention variant 'mamba'",
        "unknown method": "unknown SP method 'tree'",
        "missing gate": "needs the log-decay gate",
        "bad gate on one rank": "rank 1: simple_gla: g must be",
    }
    for rank, msgs in enumerate(results):
        for name, fragment in expect.items():
            assert msgs[name] is not None, f"rank {rank}: {name} raised nothing"
            assert fragment in msgs[name], f"rank {rank}: {name}: {msgs[name]}"


# ---- what the host issues per call -------------------------------------------------------------
# At short lengths the SP call is launch-bound on a GPU (docs/performance.md): its cost is then the
# ops the host issues. Counted on the CPU with the Triton kernels run in the interpreter (launches
# counted, ops inside them not): the SP forward+backward may add to the plain kernel's at most two
# Triton launches (the summary scans), no host sync, and these device ops (zero fills, folds, copies).
EXTRA_DEVICE_OPS = {("contiguous", "lasp2"): 2, ("contiguous", "zeco"): 2, ("contiguous", "ring"): 2,
                    ("zigzag", "lasp2"): 11, ("zigzag", "ring"): 13, ("zigzag", "zeco"): 45}


def host_counts(rank, P):
    from seqpar.bench.sp import fwd_bwd_plain, fwd_bwd_sp
    from seqpar.bench.sp_host import count, local_inputs

    out = {}
    for variant, layout in itertools.product(["linear_attn", "simple_gla"], sp.LAYOUTS):
        x, do = local_inputs(variant, P, 128, 1, 16, layout)
        plain = count(fwd_bwd_plain(variant, x, do, "triton"), "triton", run_kernels=True)
        for method in sp.METHODS:
            run = fwd_bwd_sp(variant, x, do, method, layout, "triton")
            out[(variant, layout, method)] = (plain, count(run, "triton", run_kernels=True))
    return out


def test_host_ops_per_sp_call():
    results = run_ranks(host_counts, 2, timeout=600)
    for rank, res in enumerate(results):
        for (variant, layout, method), (plain, got) in res.items():
            what = (rank, variant, layout, method, got)
            assert got["triton"] == plain["triton"] + 2, what
            assert got["syncs"] == plain["syncs"], what
            assert got["launching"] <= plain["launching"] + EXTRA_DEVICE_OPS[(layout, method)], what
            if method == "lasp2":
                assert got["comm"] == {"all_gather": 2}, what
            elif layout == "contiguous":  # one hop: ZeCO sends its state in one piece, as ring does
                assert got["comm"] == ({"send": 1, "recv": 1}), what
