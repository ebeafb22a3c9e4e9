"""The Triton kernels on the CPU under TRITON_INTERPRET=1 against the float64 recurrence.

Every entry point (forward, backward, final_state, state_grad, the same with part of h0 / dht
supplied late as the SP layer does, autograd through backend "triton")
at tiny sizes: odd lengths, packed documents, head dimensions that are not powers of two, several
K/V tiles, segments of one chunk (so the segment scan runs), with and without h0 and dht.
The interpreter computes bf16 wrongly (triton issue 11584): fp32 here, and one fp16 case.

The helpers (`check_case`, `Segmented`) take any family, so the delta-rule tests reuse them.
"""
from __future__ import annotations

import functools
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import seqpar_kernels as sk  # noqa: E402
from seqpar_kernels.explicit import Call, ExplicitKernel, plus_late  # noqa: E402
from seqpar_kernels.triton import TritonKernel, delta, family, gated  # noqa: E402
from seqpar_kernels.triton.check import TOLERANCE, Case, run_case  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(gated._state_pass_kernel, InterpretedFunction):
    pytest.skip("seqpar_kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

GATED = ["linear_attn", "lightning", "simple_gla", "gla"]


class Segmented(ExplicitKernel):
    """The kernel family with `segment_chunks` chunks per segment (1: every chunk its own segment)."""

    def __init__(self, segment_chunks: int):
        self.kw = {"segment_chunks": segment_chunks}

    def forward(self, call, h0, h0_late=None):
        return family(call).forward(call, plus_late(h0, h0_late), **self.kw)

    def backward(self, call, h0, do, dht, dht_late=None):
        return family(call).backward(call, h0, do, plus_late(dht, dht_late), **self.kw)

    def final_state(self, call, h0):
        return family(call).final_state(call, h0, **self.kw)

    def state_grad(self, call, do, dht):
        return family(call).state_grad(call, do, dht, **self.kw)


def check_case(case: Case, kernel: ExplicitKernel | None = None, seed: int = 0, tol: float | None = None):
    """Assert that every entry point matches the float64 recurrence within the dtype's tolerance."""
    errs = run_case(case, kernel or TritonKernel(), device="cpu", seed=seed, ref_backend="naive")
    tol = tol or TOLERANCE[case.torch_dtype]
    expected = {"o", "ht", "dq", "dk", "dv", "dh0", "final_state", "state_grad", "autograd_o", "autograd_dq",
                "autograd_dk", "autograd_dv", "autograd_dh0"} | ({"late_o", "late_ht"} if case.h0 else set()) | (
                {"late_dk", "late_dh0"} if case.dht else set())
    assert expected <= set(errs), f"{case.label()}: missing {expected - set(errs)}"
    bad = {k: f"{v:.1e}" for k, v in errs.items() if not v < tol}
    assert not bad, f"{case.label()}: relative errors over {tol:.0e}: {bad}"
    return errs


@pytest.mark.parametrize("variant", GATED)
def test_batched_odd_length(variant):
    errs = check_case(Case(variant, B=2, T=100, H=2, K=16, V=32), seed=1)
    assert ("dg" in errs) == (variant != "linear_attn")


@pytest.mark.parametrize("variant", GATED)
def test_varlen_segments_of_one_chunk(variant):
    """Five documents (one shorter than a chunk, several spanning chunk boundaries), every chunk
    its own segment, head dimensions that are not powers of two."""
    check_case(Case(variant, B=1, T=211, H=2, K=20, V=12, n_docs=5), Segmented(1), seed=2)


@pytest.mark.parametrize("variant", GATED)
def test_no_initial_state_no_final_grad(variant):
    check_case(Case(variant, B=1, T=150, H=1, K=16, V=16, h0=False, dht=False), Segmented(2), seed=3)


@pytest.mark.parametrize("variant", ["simple_gla", "gla"])
def test_several_tiles(variant):
    """K and V wider than one 64-wide tile, the last tile partly masked."""
    check_case(Case(variant, B=1, T=70, H=1, K=72, V=80), seed=4)


@pytest.mark.parametrize("variant", ["linear_attn", "gla"])
def test_fp16(variant):
    check_case(Case(variant, B=1, T=90, H=2, K=16, V=16, dtype="float16", n_docs=2), seed=5)


def test_strong_gates_stay_finite():
    """Log decays of -30 per token (exp(-G) would overflow fp32) still give exact results and
    gradients, with a last chunk of 16 rows (blocks past its end)."""
    x = sk.testing.random_inputs("gla", B=1, T=80, H=1, K=16, V=16, dtype=torch.float32, seed=6,
                                 gate_strength=30.0)
    gen = torch.Generator().manual_seed(6)
    do = torch.randn(x.v.shape, generator=gen)
    dht = torch.randn(x.initial_state.shape, generator=gen)
    got = sk.testing.outputs_and_grads(
        functools.partial(sk.chunk, "gla", output_final_state=True, backend="triton"), x, do, dht)
    want = sk.testing.outputs_and_grads(functools.partial(sk.naive, "gla", output_final_state=True),
                                        x.map(lambda t: t.double()), do.double(), dht.double())
    for name in ("o", "ht", "dq", "dk", "dv", "dg", "dinitial_state"):
        assert torch.isfinite(got[name]).all(), name
        assert sk.testing.rel_err(got[name], want[name]) < 1e-4, name


@pytest.mark.parametrize("variant", ["simple_gla", "gla", "delta_rule", "gated_delta_rule"])
def test_memo_shares_the_state_pass_with_the_kernel(variant):
    """The SP order on one Call with a memo: a state pass, then the kernel with the start state
    late. The kernel reuses the pass's start-independent work (the memo is used up) and gives the
    same numbers, bit for bit, as the plain call with the whole start state."""
    from seqpar_kernels.testing import random_inputs

    x = random_inputs(variant, B=1, T=150, H=2, K=16, V=8, dtype=torch.float32, initial_state=True, seed=5)
    h0, kern = x.initial_state.float(), TritonKernel()
    gen = torch.Generator().manual_seed(6)
    do, dht = torch.randn(x.v.shape, generator=gen), torch.randn(h0.shape, generator=gen)

    def call(memo):
        return Call(x.q, x.k, x.v, x.g, x.beta, 16 ** -0.5, memo=memo)

    plain = call({})  # forward then backward on one Call, as autograd runs them
    o, ht = kern.forward(plain, h0)
    gr = kern.backward(plain, h0, do, dht)
    memo, zero = {}, torch.zeros_like(h0)
    c = call(memo)
    if "delta" in variant:
        kern.final_state_and_transition(c, zero)
    else:
        kern.final_state(c, zero)
    assert memo, "the state pass kept nothing for the kernel"
    o2, ht2 = kern.forward(c, zero, lambda: h0)
    # the forward used what the state pass kept, and keeps what its backward reuses
    kept_for_backward = {"gla": {gated.INTRA}, "delta_rule": {delta.WY_INVERSE},
                         "gated_delta_rule": {delta.WY_INVERSE, delta.WY_GATE}}.get(variant, set())
    assert set(memo) == kept_for_backward, "the forward did not use the state pass"
    c = call(memo)
    kern.state_grad(c, do, zero)
    assert memo
    gr2 = kern.backward(c, h0, do, zero, lambda: dht)
    assert not memo
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    for name in ("dq", "dk", "dv", "dg", "dbeta", "dh0"):
        a, b = getattr(gr, name), getattr(gr2, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("variant", ["gla", "gated_delta_rule"])
def test_what_the_forward_keeps_is_saved_for_backward(variant, monkeypatch):
    """gla's intra-chunk matrix and the delta rules' WY inverse (keep_t) reach the backward as saved
    tensors, so saved-tensor hooks see them (activation checkpointing drops them, save_on_cpu
    offloads them) instead of ctx holding them on the device; checkpointed gradients are the same."""
    from torch.utils.checkpoint import checkpoint

    from seqpar_kernels.testing import random_inputs

    monkeypatch.setitem(delta.CONFIG, "keep_t", True)
    x = random_inputs(variant, B=1, T=150, H=2, K=16, V=8, dtype=torch.float32, seed=5)
    leaves = [t.detach().requires_grad_() for t in (x.q, x.k, x.v, x.g)]

    def f(q, k, v, g):
        return sk.chunk(variant, q, k, v, g=g, beta=x.beta, backend="triton")[0]

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        o = f(*leaves)
    # [rows, H, 64]: one 64-wide row per token and head (no input is 64 wide)
    assert any(t.shape == (150, 2, 64) for t in packed), [tuple(t.shape) for t in packed]
    do = torch.randn_like(o)
    want = torch.autograd.grad(o, leaves, do)
    got = torch.autograd.grad(checkpoint(f, *leaves, use_reentrant=False), leaves, do)
    for name, a, b in zip("qkvg", got, want):
        assert torch.equal(a, b), name


def test_float64_is_refused_with_advice():
    x = sk.testing.random_inputs("simple_gla", T=8, dtype=torch.float64)
    with pytest.raises(sk.InputError, match="backend='torch'"):
        sk.chunk("simple_gla", x.q, x.k, x.v, g=x.g, backend="triton")
