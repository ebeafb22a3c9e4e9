"""GPU only: the flash tiles of blockwise attention against the math tiles, row by row.

A masking mismatch between the two (the band convention of FlashAttention's varlen kernels
against ours) shows up as O(1) errors on a few rows, which a whole-tensor relative error can hide;
so every block pair of the cases that SP produces is compared per row, forward and backward.
"""
import pytest
import torch

from seqpar.sp import blockwise
from seqpar.sp.blockwise import Mask, Partial, Spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or blockwise.flash_usable(
    torch.empty(1, 1, 1, 64, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16))
    is not None, reason="needs a CUDA GPU with flash attention")


def _row_err(a, b):
    """Largest per-(row, head) error relative to that row's norm, or to the rows' RMS norm where a
    row is nearly zero (a document's first query has dq = 0: its one score's softmax is constant),
    and never below 1e-2 absolute: where every row sees one key, dq and dk are zero in exact
    arithmetic and both paths return rounding noise (~1e-6), while a masking mismatch errs by O(1)."""
    num = (a.float() - b.float()).norm(dim=-1)
    norms = b.float().norm(dim=-1)
    return (num / norms.clamp_min(max(norms.square().mean().sqrt().item(), 1e-2))).max().item()


def _pair(mask, q0, nq, k0, nk, H=4, Hkv=2, D=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(1, nq, H, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, nk, Hkv, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    results = {}
    for impl in ("flash", "math"):
        spec = Spec(((0, nq, q0),), ((0, nk, k0),), mask, D ** -0.5, impl)
        part = Partial(nq, H, D, torch.float32, "cuda")
        blockwise.attend(part, q, k, v, q0, k0, spec)
        seen = torch.isfinite(part.lse)
        out = part.out.view(1, nq, H, D)
        delta = (do.float() * out).sum(-1).reshape(nq, H)
        dq = torch.zeros(nq, H, D, device="cuda")
        dk, dv = torch.zeros(nk, Hkv, D, device="cuda"), torch.zeros(nk, Hkv, D, device="cuda")
        # the backward of this pair alone, with this pair's own log-sum-exp as the final one
        lse = torch.where(seen, part.lse, torch.zeros_like(part.lse))
        blockwise.attend_backward(q, k, v, out.to(q.dtype), do, lse, delta, q0, k0, dq, dk, dv, spec)
        results[impl] = (out[0][seen], part.lse[seen], dq[seen], dk, dv)
    return results


def _block_pairs(T, P, layout, cu, window):
    n = T // (2 * P) if layout == "zigzag" else T // P
    starts = range(0, T, n)
    mask = Mask(True, window, tuple(cu) if cu else None)
    return mask, [(qs, n, ks, n) for qs in starts for ks in starts if blockwise.tiles(mask, qs, qs + n, ks, ks + n)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("window", [None, 2051])
def test_flash_tiles_match_math_per_row(layout, window):
    T, P = 8192, 2
    gen = torch.Generator().manual_seed(6)
    cu = [0] + sorted((torch.randperm(T - 1, generator=gen)[:6] + 1).tolist()) + [T]
    mask, pairs = _block_pairs(T, P, layout, cu, window)
    assert pairs
    for q0, nq, k0, nk in pairs:
        r = _pair(mask, q0, nq, k0, nk)
        for name, f, m in zip(("o", "lse", "dq", "dk", "dv"), r["flash"], r["math"]):
            assert f.shape == m.shape
            err = _row_err(f, m) if name != "lse" else (f - m).abs().max().item()
            assert err < 5e-2, f"{name}: flash vs math differ by {err:.3g} on block pair q@{q0} k@{k0} ({mask})"


@pytest.mark.parametrize("q0,nq,k0,nk,window", [
    (700, 700, 0, 300, 800),     # more queries than keys, window: the band's right side is open
    (300, 700, 0, 300, 1000),    # overlapping blocks, window wider than the keys
    (0, 300, 0, 700, 50),        # more keys than queries
    (5, 1, 0, 129, 64), (128, 129, 0, 1, 200), (0, 512, 0, 512, 1)])
def test_flash_band_convention(q0, nq, k0, nk, window):
    """Single block pairs with every band shape tiles() makes: flash and math agree row by row."""
    mask = Mask(True, window)
    r = _pair(mask, q0, nq, k0, nk)
    for name, f, m in zip(("o", "lse", "dq", "dk", "dv"), r["flash"], r["math"]):
        assert f.shape == m.shape
        err = _row_err(f, m) if name != "lse" else (f - m).abs().max().item()
        assert err < 5e-2, f"{name}: flash vs math differ by {err:.3g} ({mask}, q@{q0}+{nq}, k@{k0}+{nk})"
