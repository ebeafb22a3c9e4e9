"""The PyTorch references: chunked == naive recurrence in float64, the split property, gradcheck,
and clear errors on bad input."""
from __future__ import annotations

import functools

import pytest
import torch

import seqpar_kernels as sk
from seqpar_kernels.testing import outputs_and_grads, random_cu_seqlens, random_inputs, rel_err

VARIANTS = list(sk.VARIANTS)
TOL = 1e-10


def assert_close_all(got: dict, want: dict, tol=TOL, what=""):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, f"{what} {name}"
            continue
        assert got[name] is not None, f"{what}: {name} missing"
        err = rel_err(got[name], want[name])
        assert err < tol, f"{what}: {name} relative error {err:.2e} >= {tol:.0e}"


def run_both(variant, x, cu_seqlens=None, chunk_size=None, seed=0):
    """Outputs and all gradients from chunked and naive, with random upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    n_states = x.q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    H, K, V = x.q.shape[2], x.q.shape[3], x.v.shape[3]
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(n_states, H, K, V, generator=gen, dtype=torch.float64)
    chunk = functools.partial(sk.chunk, variant, backend="torch", output_final_state=True,
                              cu_seqlens=cu_seqlens)
    naive = functools.partial(sk.naive, variant, output_final_state=True, cu_seqlens=cu_seqlens)
    return outputs_and_grads(chunk, x, do, dht), outputs_and_grads(naive, x, do, dht)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("H,K,V,T", [(1, 8, 5, 37), (3, 6, 10, 130)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunk_matches_naive(variant, H, K, V, T, with_h0):
    x = random_inputs(variant, B=2, T=T, H=H, K=K, V=V, initial_state=with_h0, seed=T + H)
    got, want = run_both(variant, x)
    assert set(got) >= {"o", "ht", "dq", "dk", "dv"}
    assert_close_all(got, want, what=f"{variant} H={H} K={K} V={V} T={T} h0={with_h0}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_docs", [1, 2, 5])
def test_chunk_matches_naive_varlen(variant, n_docs):
    T = 149  # odd, not a multiple of any chunk size
    cu = random_cu_seqlens(T, n_docs, seed=n_docs)
    x = random_inputs(variant, B=1, T=T, H=3, K=6, V=4, n_states=n_docs, seed=n_docs)
    got, want = run_both(variant, x, cu_seqlens=cu)
    assert got["ht"].shape == (n_docs, 3, 6, 4)
    assert_close_all(got, want, what=f"{variant} varlen {cu.tolist()}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen_equals_separate_sequences(variant):
    """Packing resets the state: each document alone gives the same output and final state."""
    cu = torch.tensor([0, 7, 40, 41, 90])
    x = random_inputs(variant, B=1, T=90, H=2, K=4, V=3, n_states=4, seed=3)
    o, ht = sk.chunk(variant, x.q, x.k, x.v, **x.kwargs(), output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        kw = x.kwargs()
        for name in ("g", "beta"):
            if kw[name] is not None and kw[name].dim() > 1:
                kw[name] = kw[name][:, s:e]
        kw["initial_state"] = kw["initial_state"][n:n + 1]
        o_n, ht_n = sk.naive(variant, x.q[:, s:e], x.k[:, s:e], x.v[:, s:e], **kw, output_final_state=True)
        assert rel_err(o[:, s:e], o_n) < TOL
        assert rel_err(ht[n:n + 1], ht_n) < TOL


def _split_call(variant, t_split, q, k, v, g=None, beta=None, initial_state=None):
    """The sequence run as two calls chained by the state; the state's gradient flows back."""
    def part(x, sl):
        return x[:, sl] if x is not None and x.dim() > 1 else x

    first, second = slice(0, t_split), slice(t_split, None)
    o1, h1 = sk.chunk(variant, part(q, first), part(k, first), part(v, first), g=part(g, first),
                      beta=part(beta, first), initial_state=initial_state, output_final_state=True)
    o2, h2 = sk.chunk(variant, part(q, second), part(k, second), part(v, second), g=part(g, second),
                      beta=part(beta, second), initial_state=h1, output_final_state=True)
    return torch.cat([o1, o2], 1), h2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t_split", [1, 33, 64])
def test_split_property(variant, t_split):
    """First half then second half, chained by final -> initial state (and d(initial) -> d(final)
    backwards), equals the unsplit run in outputs and every gradient."""
    x = random_inputs(variant, B=2, T=101, H=2, K=5, V=6, seed=t_split)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64)
    whole = outputs_and_grads(functools.partial(sk.chunk, variant, output_final_state=True), x, do, dht)
    split = outputs_and_grads(functools.partial(_split_call, variant, t_split), x, do, dht)
    assert set(whole) == {"o", "ht", "dq", "dk", "dv", "dinitial_state"} | (
        {"dg"} if x.g is not None else set()) | ({"dbeta"} if x.beta is not None else set())
    assert_close_all(split, whole, what=f"{variant} split at {t_split}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_gradcheck(variant, backend):
    x = random_inputs(variant, B=1, T=9, H=1, K=3, V=2, seed=1).requires_grad_()
    names = list(x.tensors())

    def f(*tensors):
        kw = dict(zip(names, tensors))
        o, ht = sk.chunk(variant, kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw, output_final_state=True,
                         backend=backend)
        return o, ht

    assert torch.autograd.gradcheck(f, tuple(x.tensors().values()), eps=1e-6, atol=1e-7)


def test_chunk_sizes_agree():
    x = random_inputs("gated_delta_rule", B=1, T=50, H=2, K=4, V=4, seed=5)
    outs = [sk.chunk("gated_delta_rule", x.q, x.k, x.v, **x.kwargs(), output_final_state=True)]
    from seqpar_kernels.chunk_torch import chunk_reference

    g, beta = x.g, x.beta
    for C in (1, 7, 16, 128):
        outs.append(chunk_reference(x.q, x.k, x.v, g, beta, 0.5, x.initial_state, True, None, chunk_size=C))
    ref = sk.naive("gated_delta_rule", x.q, x.k, x.v, **x.kwargs(), scale=0.5, output_final_state=True)
    for o, ht in outs[1:]:
        assert rel_err(o, ref[0]) < TOL and rel_err(ht, ref[1]) < TOL


def test_low_precision_inputs():
    """bf16 inputs: computed in fp32, output in bf16, final state in fp32."""
    x = random_inputs("gla", B=1, T=40, H=2, K=8, V=8, dtype=torch.bfloat16, seed=2)
    o, ht = sk.chunk_gla(x.q, x.k, x.v, g=x.g, initial_state=x.initial_state.float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    ref, ref_ht = sk.naive_gla(*(t.double() for t in (x.q, x.k, x.v)), g=x.g.double(),
                               initial_state=x.initial_state.double(), output_final_state=True)
    assert rel_err(o, ref) < 1e-2 and rel_err(ht, ref_ht) < 1e-4


def test_strong_decay_is_finite():
    """Gates far below zero must not overflow the chunked form (no exp(-G) anywhere)."""
    x = random_inputs("gla", B=1, T=128, H=1, K=4, V=4, dtype=torch.float32, seed=4, gate_strength=40.0)
    o, ht = sk.chunk_gla(x.q, x.k, x.v, g=x.g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    ref, _ = sk.naive_gla(x.q.double(), x.k.double(), x.v.double(), g=x.g.double())
    assert rel_err(o, ref) < 1e-5


def test_public_names():
    import seqpar.ops as ops

    for v in VARIANTS:
        assert callable(getattr(ops, f"chunk_{v}")) and callable(getattr(ops, f"naive_{v}"))
    x = random_inputs("simple_gla", T=20, seed=0)
    o1, _ = ops.chunk_simple_gla(x.q, x.k, x.v, g=x.g)
    o2, _ = ops.naive_simple_gla(x.q, x.k, x.v, g=x.g)
    assert rel_err(o1, o2) < TOL


def test_lightning_default_decay():
    x = random_inputs("lightning", T=30, H=4, seed=0)
    o_default, _ = sk.chunk_lightning(x.q, x.k, x.v)
    o_explicit, _ = sk.naive_lightning(x.q, x.k, x.v, g=sk.lightning_decay(4, dtype=torch.float64))
    assert rel_err(o_default, o_explicit) < TOL


# ---- bad input: each raises InputError naming the problem, before any work -----------------------

def _base(variant="gated_delta_rule", **kw):
    x = random_inputs(variant, B=1, T=16, H=2, K=4, V=4, seed=0)
    args = dict(q=x.q, k=x.k, v=x.v, **x.kwargs())
    args.update(kw)
    return args


@pytest.mark.parametrize("variant,change,match", [
    ("gated_delta_rule", dict(k=torch.randn(1, 16, 2, 5, dtype=torch.float64)), "same shape"),
    ("gated_delta_rule", dict(v=torch.randn(1, 15, 2, 4, dtype=torch.float64)), "v must be"),
    ("gated_delta_rule", dict(q=torch.randn(1, 16, 2, 4)), "one dtype"),
    ("gated_delta_rule", dict(q=torch.randn(16, 2, 4, dtype=torch.float64)), r"\[B, T, H, D\]"),
    ("gated_delta_rule", dict(g=-torch.rand(1, 16, 2, 4, dtype=torch.float64)), r"g must be \[B, T, H\]"),
    ("gated_delta_rule", dict(g=None), "needs the log-decay gate"),
    ("gated_delta_rule", dict(beta=None), "needs beta"),
    ("gated_delta_rule", dict(beta=torch.rand(1, 16, 3, dtype=torch.float64)), "beta must be"),
    ("gated_delta_rule", dict(g=torch.rand(1, 16, 2, dtype=torch.float64)), "must be <= 0"),
    ("gated_delta_rule", dict(initial_state=torch.zeros(1, 2, 4, 5, dtype=torch.float64)), "initial_state must be"),
    ("gla", dict(g=-torch.rand(1, 16, 2, dtype=torch.float64)), r"g must be \[B, T, H, K\]"),
    ("gla", dict(g=torch.rand(1, 16, 2, 4, dtype=torch.float64)), "must be <= 0"),
    ("linear_attn", dict(g=-torch.rand(1, 16, 2, dtype=torch.float64)), "takes no gate"),
    ("simple_gla", dict(beta=torch.rand(1, 16, 2, dtype=torch.float64)), "takes no beta"),
    ("lightning", dict(g=-torch.rand(3, dtype=torch.float64)), r"per-head log decay of shape \[H\]"),
    ("gated_delta_rule", dict(cu_seqlens=torch.tensor([0, 9, 9, 16])), "strictly increasing"),
    ("gated_delta_rule", dict(cu_seqlens=torch.tensor([0, 9, 15])), "end at the sequence length 16"),
    ("gated_delta_rule", dict(cu_seqlens=torch.tensor([[0, 16]])), "1-D"),
])
def test_bad_input(variant, change, match):
    args = _base(variant, **change)
    with pytest.raises(sk.InputError, match=match):
        sk.chunk(variant, args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_bad_input_batched_varlen():
    x = random_inputs("simple_gla", B=2, T=16, seed=0)
    with pytest.raises(sk.InputError, match="batch size 1"):
        sk.chunk_simple_gla(x.q, x.k, x.v, g=x.g, cu_seqlens=torch.tensor([0, 8, 16]))


def test_unknown_variant_and_backend():
    x = random_inputs("linear_attn", T=8, seed=0)
    with pytest.raises(ValueError, match="unknown linear-attention variant 'mamba'"):
        sk.chunk("mamba", x.q, x.k, x.v)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        sk.chunk("linear_attn", x.q, x.k, x.v, backend="cuda")


def test_call_boundaries_use_the_host_copy():
    """Kernels read sequence boundaries on the host; a Call that carries them (the SP layer's do)
    is never copied back from the device."""
    from seqpar_kernels.explicit import Call

    q = torch.zeros(1, 10, 1, 2)
    cu = torch.tensor([0, 4, 10])
    assert Call(q, q, q, None, None, 1.0, cu).boundaries() == (0, 4, 10)
    assert Call(q, q, q, None, None, 1.0, cu, cu_host=(0, 5, 10)).boundaries() == (0, 5, 10)  # not read from cu
    b = torch.zeros(2, 3, 1, 2)
    assert Call(b, b, b, None, None, 1.0).boundaries() == (0, 3, 6)
