"""The Triton delta-rule kernels (delta_rule, gated_delta_rule) against the float64 token
recurrence, on the CPU under the Triton interpreter: outputs, final states and every gradient,
with and without initial state / final-state gradient, odd lengths, packed documents, the
state-only passes and the identity-start transition. fp32 and fp16 only (bf16 is wrong in the
interpreter, triton issue 11584)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import functools  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import seqpar_kernels as sk  # noqa: E402
from seqpar_kernels.explicit import Call  # noqa: E402
from seqpar_kernels.testing import outputs_and_grads, random_inputs, rel_err  # noqa: E402
from seqpar_kernels.triton import delta  # noqa: E402

VARIANTS = ["delta_rule", "gated_delta_rule"]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


@pytest.fixture(params=[0, 1], ids=["whole-documents", "segments-of-1-chunk"])
def segments(request, monkeypatch):
    """Chains over whole documents, or over segments combined by the fp32 segment scan."""
    monkeypatch.setitem(delta.CONFIG, "seg_chunks", request.param)
    monkeypatch.setitem(delta.CONFIG, "state_seg_chunks", request.param)
    return request.param


def _reference(variant, x, do, dht, cu_seqlens=None):
    """o, ht and every gradient from the float64 token recurrence."""
    naive = functools.partial(sk.naive, variant, output_final_state=True, cu_seqlens=cu_seqlens)
    return outputs_and_grads(naive, x, do, dht)


def _call(x, dtype, cu_seqlens=None):
    """The kernel call in `dtype`; gates and states stay fp32 (as a model passes them)."""
    low = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    g = x.g.float() if x.g is not None else None
    return Call(low(x.q), low(x.k), low(x.v), g, low(x.beta), x.q.shape[-1] ** -0.5, cu_seqlens)


def _check(got: dict, want: dict, tol: float, what: str):
    for name, ref in want.items():
        assert got[name] is not None, f"{what}: {name} missing"
        assert torch.isfinite(got[name]).all(), f"{what}: {name} has non-finite values"
        err = rel_err(got[name], ref)
        assert err < tol, f"{what}: {name} relative error {err:.2e} >= {tol:.0e}"


def _run(variant, x, dtype, with_h0, with_dht, cu_seqlens=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_states = x.q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    H, K, V = x.q.shape[2], x.q.shape[3], x.v.shape[3]
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(n_states, H, K, V, generator=gen, dtype=torch.float64) if with_dht else None
    if not with_h0:  # the kernel gets none; d(initial state) is still returned: compare at h0 = 0
        x.initial_state = torch.zeros_like(x.initial_state)
    want = _reference(variant, x, do, dht, cu_seqlens)
    call = _call(x, dtype, cu_seqlens)
    h0 = x.initial_state.float() if with_h0 else None
    o, ht = delta.forward(call, h0)
    gr = delta.backward(call, h0, do.to(dtype), dht.float() if with_dht else None)
    got = {"o": o, "ht": ht, "dq": gr.dq, "dk": gr.dk, "dv": gr.dv, "dbeta": gr.dbeta,
           "dinitial_state": gr.dh0}
    if x.g is not None:
        got["dg"] = gr.dg
    else:
        assert gr.dg is None
    assert set(got) == set(want)
    assert o.dtype == dtype and ht.dtype == torch.float32 and gr.dh0.dtype == torch.float32
    return got, want


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_h0,with_dht", [(True, True), (False, False)])
def test_matches_naive(variant, dtype, with_h0, with_dht):
    T = 100  # odd: one full chunk and a partial one
    x = random_inputs(variant, B=2, T=T, H=2, K=16, V=32, seed=3)
    got, want = _run(variant, x, dtype, with_h0, with_dht)
    _check(got, want, TOL[dtype], f"{variant} {dtype} h0={with_h0} dht={with_dht}")


def test_delta_rule_above_128_runs_the_gated_path():
    """delta_rule with a head dim above 128 runs the gated kernels with a zero gate (the ungated
    chains fault there on an H100): same results, no gate gradient returned."""
    x = random_inputs("delta_rule", B=1, T=70, H=1, K=136, V=130, seed=29)
    got, want = _run("delta_rule", x, torch.float32, True, True)  # asserts dg is None
    _check(got, want, TOL[torch.float32], "delta_rule K=136 V=130")


@pytest.mark.parametrize("variant", VARIANTS)
def test_odd_head_dims_and_short_sequence(variant):
    """K, V not powers of two (masked columns) and T shorter than one chunk."""
    x = random_inputs(variant, B=1, T=37, H=3, K=20, V=12, seed=5)
    got, want = _run(variant, x, torch.float32, True, True)
    _check(got, want, TOL[torch.float32], f"{variant} K=20 V=12 T=37")


@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen(variant, segments):
    """Packed documents of lengths 1, 64, 65, 19 (state reset at each boundary, per-document h0/ht)."""
    cu = torch.tensor([0, 1, 65, 130, 149])
    x = random_inputs(variant, B=1, T=149, H=2, K=16, V=16, n_states=4, seed=7)
    got, want = _run(variant, x, torch.float32, True, True, cu_seqlens=cu)
    assert got["ht"].shape == (4, 2, 16, 16)
    _check(got, want, TOL[torch.float32], f"{variant} varlen {cu.tolist()}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_passes(variant, segments):
    """final_state and state_grad alone equal the full forward's ht and the full backward's dh0."""
    cu = torch.tensor([0, 50, 61, 160])
    x = random_inputs(variant, B=1, T=160, H=2, K=16, V=16, n_states=3, seed=11)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(x.initial_state.shape, generator=gen, dtype=torch.float64)
    want = _reference(variant, x, do, dht, cu)
    call = _call(x, torch.float32, cu)
    ht = delta.final_state(call, x.initial_state.float())
    assert ht.dtype == torch.float32 and rel_err(ht, want["ht"]) < 1e-4
    dh0 = delta.state_grad(call, do.float(), dht.float())
    assert dh0.dtype == torch.float32 and rel_err(dh0, want["dinitial_state"]) < 1e-4
    # without a final-state gradient only the outputs reach the initial state
    want0 = _reference(variant, x, do, None, cu)
    assert rel_err(delta.state_grad(call, do.float(), None), want0["dinitial_state"]) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("settings", [
    {"wy_mid_in_input_dtype": False, "dk_part_fp32": True},  # the fp32 intermediates of bwd_wy
    {"chain_gate_results": False},  # the chains' gates on the loaded tiles (as at K > 128)
    {"dqk_bk": 16},  # bwd_dqk over two K blocks (and bwd_wy summing their gate parts)
], ids=["fp32-wy-backward", "gated-tiles-in-chains", "dqk-k-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_alternative_settings(variant, settings, dtype, monkeypatch):
    """Launch settings other than the defaults give the same results: packed documents, head dims
    not powers of two, h0 and dht."""
    for key, value in settings.items():
        monkeypatch.setitem(delta.CONFIG, key, value)
    cu = torch.tensor([0, 1, 65, 130, 149])
    x = random_inputs(variant, B=1, T=149, H=2, K=20, V=12, n_states=4, seed=17)
    got, want = _run(variant, x, dtype, True, True, cu_seqlens=cu)
    _check(got, want, TOL[dtype], f"{variant} {settings} {dtype}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep_t", [False, True])
def test_backward_from_the_forwards_inverse(variant, keep_t, segments, monkeypatch):
    """As under autograd and in the SP layer's order (final_state, forward, state_grad, backward on
    one Call with a memo): with keep_t the forward leaves T and the gate for the backward, whose
    WY preparation is then wy_apply alone; over segments, the forward runs the scan and pass 3
    after the summary's pass 1 and leaves the segments' transitions for state_grad. The results
    are the same either way."""
    monkeypatch.setitem(delta.CONFIG, "keep_t", keep_t)
    cu = torch.tensor([0, 1, 65, 130, 149])
    x = random_inputs(variant, B=1, T=149, H=2, K=20, V=12, n_states=4, seed=23)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(x.initial_state.shape, generator=gen, dtype=torch.float64)
    want = _reference(variant, x, do, dht, cu)
    call = replace(_call(x, torch.float32, cu), memo={})
    h0 = x.initial_state.float()
    ht = delta.final_state(call, h0)
    o, ht = delta.forward(call, h0)
    kept = ({delta.WY_INVERSE, delta.WY_GATE} if x.g is not None else {delta.WY_INVERSE}) if keep_t else set()
    assert set(call.memo) == kept | ({delta.TRANSITIONS} if segments else set())
    do = do.float()
    dh0 = delta.state_grad(call, do, dht.float())
    gr = delta.backward(call, h0, do, dht.float())
    assert call.memo == {}  # everything kept was used up
    got = {"o": o, "ht": ht, "dq": gr.dq, "dk": gr.dk, "dv": gr.dv, "dbeta": gr.dbeta, "dinitial_state": gr.dh0}
    if x.g is not None:
        got["dg"] = gr.dg
    _check(got, want, TOL[torch.float32], f"{variant} keep_t={keep_t}")
    assert torch.equal(dh0, gr.dh0)


def test_late_states():
    """h0_late / dht_late, resolved after the WY preparation, add to h0 / dht."""
    x = random_inputs("gated_delta_rule", B=1, T=70, H=1, K=16, V=16, seed=19)
    call = _call(x, torch.float32)
    h0, extra = x.initial_state.float(), torch.randn(1, 1, 16, 16)
    do, dht = torch.randn(1, 70, 1, 16), torch.randn(1, 1, 16, 16)
    o, ht = delta.forward(call, h0 + extra)
    o_late, ht_late = delta.forward(call, h0, h0_late=lambda: extra)
    assert torch.allclose(o, o_late) and torch.allclose(ht, ht_late)
    gr = delta.backward(call, h0, do, dht)
    gr_late = delta.backward(call, h0, do, None, dht_late=lambda: dht)
    for name in ("dq", "dk", "dv", "dg", "dbeta", "dh0"):
        assert torch.allclose(getattr(gr, name), getattr(gr_late, name)), name


def _transition(x, cu):
    """prod_t exp(g_t) (I - beta_t k_t k_t^T), last token leftmost, per document and head (float64)."""
    H, K = x.k.shape[2], x.k.shape[3]
    out = []
    for s, e in zip(cu.tolist(), cu.tolist()[1:]):
        M = torch.eye(K, dtype=torch.float64).expand(H, K, K).clone()
        for t in range(s, e):
            kt, bt = x.k[0, t], x.beta[0, t]
            A = torch.eye(K, dtype=torch.float64) - bt[:, None, None] * kt[:, :, None] * kt[:, None, :]
            if x.g is not None:
                A = A * x.g[0, t].exp()[:, None, None]
            M = A @ M
        out.append(M)
    return torch.stack(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_start_transition(variant, segments):
    """final_state with v = 0 and h0 = I (K x K) is the dense transition the SP layer exchanges."""
    cu = torch.tensor([0, 70, 71, 130])
    x = random_inputs(variant, B=1, T=130, H=2, K=16, V=16, n_states=3, seed=13)
    call = _call(x, torch.float32, cu)
    K = 16
    zero_v = torch.zeros(1, 130, 2, K)
    eye = torch.eye(K).expand(3, 2, K, K).contiguous()
    got = delta.final_state(Call(call.q, call.k, zero_v, call.g, call.beta, call.scale, cu), eye)
    assert rel_err(got, _transition(x, cu)) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_state_and_transition_in_one_pass(variant, segments):
    """The SP summary of the delta rules: final state and dense transition from one state pass."""
    cu = torch.tensor([0, 70, 71, 200])
    x = random_inputs(variant, B=1, T=200, H=2, K=16, V=8, n_states=3, seed=17)
    ht, M = delta.final_state_and_transition(_call(x, torch.float32, cu), x.initial_state.float())
    _, want_ht = sk.naive(variant, x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.initial_state,
                          output_final_state=True, cu_seqlens=cu)
    assert rel_err(ht, want_ht) < 1e-4
    assert rel_err(M, _transition(x, cu)) < 1e-4


def test_rejects_float64():
    x = random_inputs("delta_rule", B=1, T=8, H=1, K=16, V=16, seed=0)
    with pytest.raises(ValueError, match="float64"):
        delta.forward(Call(x.q, x.k, x.v, None, x.beta, 0.25), None)


def _dot_calls(source: str):
    """Every tl.dot(...) call of a kernel source, parentheses matched."""
    i = source.find("tl.dot(")
    while i >= 0:
        j, depth = i + len("tl.dot("), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(source[j], 0)
            j += 1
        yield source[i:j]
        i = source.find("tl.dot(", i + 1)


@pytest.mark.parametrize("module", ["delta_kernels", "gated"])
def test_every_matrix_product_states_its_precision(module):
    """fp32 inputs must get full-fp32 products: Triton's default is TF32 (~1e-3 relative error,
    measured on the H100), and no compile option changes it, so every tl.dot names its precision."""
    import importlib.util
    path = importlib.util.find_spec(f"seqpar_kernels.triton.{module}").origin
    calls = list(_dot_calls(open(path).read()))
    assert calls
    bare = [c for c in calls if "input_precision" not in c]
    assert not bare, f"{module}: tl.dot without input_precision: {bare}"
