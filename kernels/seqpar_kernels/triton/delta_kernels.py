"""Triton kernels of the chunked delta rule (plain and gated); the host side is in delta.py.

Per chunk of C = 64 tokens (cumulative in-chunk log gate g, gl = g at the chunk's last token):
    Akk = strict_lower(diag(beta) K K^T * exp(g_i - g_j)),   T = (I + Akk)^-1
    W = T diag(beta exp(g)) K,   U = T diag(beta) V                       (the WY form)
    Vn = U - W S                                                          (S: state at chunk start)
    O  = scale (diag(exp(g)) Q S + (Q K^T * exp(g_i - g_j))_{j<=i} Vn)
    S' = exp(gl) S + (diag(exp(gl - g)) K)^T Vn

Kernels: `wy_solve_apply` (gates, T, W, U; in the backward without a kept T also the local dVn
term), `wy_apply` (W, U and the local dVn term from the T the forward kept), `state_pass`
(the only sequential one: the forward state chain and/or the reverse gradient chain; the two are
independent, so the backward runs both in one launch), `output`, `bwd_dqk` (dq, dk, dW, dg from
the chain's states) and `bwd_wy` (through T to dk, dv, dbeta, dg).

Hopper hazards (triton 3.6): no tl.trans anywhere. Every transposed operand is loaded transposed
from memory (dAkk^T in bwd_wy goes through a scratch tile for that), never made by transposing a
dot result. Decay ratios are always exp(g_i - g_j) with i after j inside one chunk (<= 0), never
exp(-g); masked positions get -inf before exp.
"""
from __future__ import annotations

import triton
import triton.language as tl

C: tl.constexpr = tl.constexpr(64)  # chunk size; the block solve hard-codes its four 16-row blocks


@triton.jit
def _chunk_coords(pid, cu_ptr, idx_ptr, T, NT, IS_VARLEN: tl.constexpr):
    """(document, first token of the chunk, end of the document) of global chunk `pid`."""
    if IS_VARLEN:
        n = tl.load(idx_ptr + pid * 2).to(tl.int32)
        i = tl.load(idx_ptr + pid * 2 + 1).to(tl.int32)
        bos = tl.load(cu_ptr + n).to(tl.int32)
        eos = tl.load(cu_ptr + n + 1).to(tl.int32)
    else:
        n = pid // NT
        i = pid % NT
        bos = n * T
        eos = bos + T
    return n, bos + i * 64, eos


@triton.jit
def _tile(ptr, row0, eos, stride, col0, ncols, R: tl.constexpr, BD: tl.constexpr):
    """Rows row0..row0+R (tokens, < eos) x columns col0..col0+BD (< ncols) of a [tokens, stride] view."""
    r = row0 + tl.arange(0, R)
    c = col0 + tl.arange(0, BD)
    p = ptr + r.to(tl.int64)[:, None] * stride + c[None, :]
    return tl.load(p, mask=(r[:, None] < eos) & (c[None, :] < ncols), other=0.0)


@triton.jit
def _tile_t(ptr, row0, eos, stride, col0, ncols, R: tl.constexpr, BD: tl.constexpr):
    """The same tile loaded transposed: [BD, R]."""
    r = row0 + tl.arange(0, R)
    c = col0 + tl.arange(0, BD)
    p = ptr + r.to(tl.int64)[None, :] * stride + c[:, None]
    return tl.load(p, mask=(r[None, :] < eos) & (c[:, None] < ncols), other=0.0)


@triton.jit
def _store_tile(ptr, x, row0, eos, stride, col0, ncols, R: tl.constexpr, BD: tl.constexpr):
    r = row0 + tl.arange(0, R)
    c = col0 + tl.arange(0, BD)
    p = ptr + r.to(tl.int64)[:, None] * stride + c[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(r[:, None] < eos) & (c[None, :] < ncols))


@triton.jit
def _transposed(scratch_ptr, x, row0, eos, stride):
    """A 64 x 64 tile transposed without tl.trans of a product (the Hopper hazard): written to the
    program's own scratch tile, then read back transposed once every thread has written its part."""
    _store_tile(scratch_ptr, x, row0, eos, stride, 0, 64, 64, 64)
    tl.debug_barrier()
    return _tile_t(scratch_ptr, row0, eos, stride, 0, 64, 64, 64)


@triton.jit
def _vec(ptr, row0, eos, stride, R: tl.constexpr):
    r = row0 + tl.arange(0, R)
    return tl.load(ptr + r.to(tl.int64) * stride, mask=r < eos, other=0.0).to(tl.float32)


@triton.jit
def _store_vec(ptr, x, row0, eos, stride, R: tl.constexpr):
    r = row0 + tl.arange(0, R)
    tl.store(ptr + r.to(tl.int64) * stride, x.to(ptr.dtype.element_ty), mask=r < eos)


@triton.jit
def _ratio(diff, mask):
    """exp(g_i - g_j) where mask (i after j), 0 elsewhere. Padded rows load g = 0, so their
    differences can be positive: clamp (a valid causal difference is always <= 0)."""
    return tl.exp(tl.where(mask, tl.minimum(diff, 0.0), float("-inf")))


@triton.jit
def _state_tile(ptr, K, V, col0, BK: tl.constexpr, BV: tl.constexpr):
    """[BK, BV] block (columns col0..) of one K x V state at ptr."""
    rk = tl.arange(0, BK)
    cv = col0 + tl.arange(0, BV)
    return tl.load(ptr + rk[:, None] * V + cv[None, :], mask=(rk[:, None] < K) & (cv[None, :] < V), other=0.0)


@triton.jit
def _state_tile_t(ptr, K, V, col0, BK: tl.constexpr, BV: tl.constexpr, k0):
    """[BV, BK] transposed block of one K x V state at ptr (rows: V columns col0.., cols: K from k0)."""
    rk = k0 + tl.arange(0, BK)
    cv = col0 + tl.arange(0, BV)
    return tl.load(ptr + rk[None, :] * V + cv[:, None], mask=(rk[None, :] < K) & (cv[:, None] < V), other=0.0)


@triton.jit
def _store_state(ptr, x, K, V, col0, BK: tl.constexpr, BV: tl.constexpr):
    rk = tl.arange(0, BK)
    cv = col0 + tl.arange(0, BV)
    tl.store(ptr + rk[:, None] * V + cv[None, :], x.to(ptr.dtype.element_ty),
             mask=(rk[:, None] < K) & (cv[None, :] < V))


# ----------------------------------------------------------------------------------------------
# WY preparation: one program per (chunk, head)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _akk(a, ba, ga, gb, DIAG: tl.constexpr, USE_G: tl.constexpr):
    """Scale a 16 x 16 block of K K^T into Akk = beta_i k_i.k_j exp(g_i - g_j) (strictly lower)."""
    a = a * ba[:, None]
    if DIAG:
        i = tl.arange(0, 16)
        lower = i[:, None] > i[None, :]
        if USE_G:
            a = a * _ratio(ga[:, None] - gb[None, :], lower)
        a = tl.where(lower, a, 0.0)
    elif USE_G:
        a = a * tl.exp(ga[:, None] - gb[None, :])
    return a


@triton.jit
def _gates16(beta_ptr, g_ptr, gc_ptr, ih, t0, eos, H, USE_G: tl.constexpr):
    """beta and the cumulative in-chunk gate of the chunk's four 16-token blocks (the gate is also
    stored); without a gate the gate outputs are placeholders."""
    bh = beta_ptr + ih
    b0 = _vec(bh, t0, eos, H, 16)
    b1 = _vec(bh, t0 + 16, eos, H, 16)
    b2 = _vec(bh, t0 + 32, eos, H, 16)
    b3 = _vec(bh, t0 + 48, eos, H, 16)
    if USE_G:
        gh = g_ptr + ih
        r0 = _vec(gh, t0, eos, H, 16)
        r1 = _vec(gh, t0 + 16, eos, H, 16)
        r2 = _vec(gh, t0 + 32, eos, H, 16)
        r3 = _vec(gh, t0 + 48, eos, H, 16)
        s0 = tl.sum(r0, 0)
        s1 = s0 + tl.sum(r1, 0)
        s2 = s1 + tl.sum(r2, 0)
        g0 = tl.cumsum(r0, 0)
        g1 = tl.cumsum(r1, 0) + s0
        g2 = tl.cumsum(r2, 0) + s1
        g3 = tl.cumsum(r3, 0) + s2
        gch = gc_ptr + ih
        _store_vec(gch, g0, t0, eos, H, 16)
        _store_vec(gch, g1, t0 + 16, eos, H, 16)
        _store_vec(gch, g2, t0 + 32, eos, H, 16)
        _store_vec(gch, g3, t0 + 48, eos, H, 16)
    else:
        g0 = b0
        g1 = b1
        g2 = b2
        g3 = b3
    return b0, b1, b2, b3, g0, g1, g2, g3


@triton.jit
def _inv_unit_lower16(L):
    """(I + L)^-1 of a strictly lower 16 x 16 L: (I - L)(I + L^2)(I + L^4)(I + L^8), exact fp32."""
    i = tl.arange(0, 16)
    eye = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    X = eye - L
    P = tl.dot(L, L, input_precision="ieee")
    X = X + tl.dot(X, P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X = X + tl.dot(X, P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X = X + tl.dot(X, P, input_precision="ieee")
    return X


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _solve16(a00, a11, a22, a33, a10, a20, a21, a30, a31, a32, b0, b1, b2, b3, g0, g1, g2, g3,
             USE_G: tl.constexpr):
    """T = (I + Akk)^-1 in 16 x 16 blocks from the blocks of K K^T: the diagonal blocks by the
    nilpotent product formula, the others by block forward substitution, all in fp32."""
    T00 = _inv_unit_lower16(_akk(a00, b0, g0, g0, True, USE_G))
    T11 = _inv_unit_lower16(_akk(a11, b1, g1, g1, True, USE_G))
    T22 = _inv_unit_lower16(_akk(a22, b2, g2, g2, True, USE_G))
    T33 = _inv_unit_lower16(_akk(a33, b3, g3, g3, True, USE_G))
    A10 = _akk(a10, b1, g1, g0, False, USE_G)
    A20 = _akk(a20, b2, g2, g0, False, USE_G)
    A21 = _akk(a21, b2, g2, g1, False, USE_G)
    A30 = _akk(a30, b3, g3, g0, False, USE_G)
    A31 = _akk(a31, b3, g3, g1, False, USE_G)
    A32 = _akk(a32, b3, g3, g2, False, USE_G)
    # T_ab = -T_aa sum_{b<=m<a} A_am T_mb
    T10 = -_mm(T11, _mm(A10, T00))
    T21 = -_mm(T22, _mm(A21, T11))
    T20 = -_mm(T22, _mm(A20, T00) + _mm(A21, T10))
    T32 = -_mm(T33, _mm(A32, T22))
    T31 = -_mm(T33, _mm(A31, T11) + _mm(A32, T21))
    T30 = -_mm(T33, _mm(A30, T00) + _mm(A31, T10) + _mm(A32, T20))
    return T00, T10, T11, T20, T21, T22, T30, T31, T32, T33


@triton.jit
def _store_t16(t_ptr, ih, t0, eos, H, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33):
    """The 64 x 64 T of one chunk into its rows of a [tokens, H, 64] tensor (zeros above)."""
    th = t_ptr + ih * 64
    HC = H * 64
    z = tl.zeros([16, 16], dtype=tl.float32)
    _store_tile(th, T00, t0, eos, HC, 0, 64, 16, 16)
    _store_tile(th, z, t0, eos, HC, 16, 64, 16, 16)
    _store_tile(th, z, t0, eos, HC, 32, 64, 16, 16)
    _store_tile(th, z, t0, eos, HC, 48, 64, 16, 16)
    _store_tile(th, T10, t0 + 16, eos, HC, 0, 64, 16, 16)
    _store_tile(th, T11, t0 + 16, eos, HC, 16, 64, 16, 16)
    _store_tile(th, z, t0 + 16, eos, HC, 32, 64, 16, 16)
    _store_tile(th, z, t0 + 16, eos, HC, 48, 64, 16, 16)
    _store_tile(th, T20, t0 + 32, eos, HC, 0, 64, 16, 16)
    _store_tile(th, T21, t0 + 32, eos, HC, 16, 64, 16, 16)
    _store_tile(th, T22, t0 + 32, eos, HC, 32, 64, 16, 16)
    _store_tile(th, z, t0 + 32, eos, HC, 48, 64, 16, 16)
    _store_tile(th, T30, t0 + 48, eos, HC, 0, 64, 16, 16)
    _store_tile(th, T31, t0 + 48, eos, HC, 16, 64, 16, 16)
    _store_tile(th, T32, t0 + 48, eos, HC, 32, 64, 16, 16)
    _store_tile(th, T33, t0 + 48, eos, HC, 48, 64, 16, 16)


@triton.jit
def _beta_gate64(beta_ptr, gc_ptr, ih, t0, eos, H, USE_G: tl.constexpr):
    """beta, the cumulative gate (beta as a placeholder without one) and beta exp(g) of a chunk."""
    beta = _vec(beta_ptr + ih, t0, eos, H, 64)
    if USE_G:
        g = _vec(gc_ptr + ih, t0, eos, H, 64)
        bg = beta * tl.exp(g)
    else:
        g = beta
        bg = beta
    return beta, g, bg


@triton.jit
def _local_dv(kq, g, do_ptr, dvl_ptr, ih, t0, eos, H, V, scale, BV: tl.constexpr, USE_G: tl.constexpr,
              DOT: tl.constexpr):
    """dVl = scale (K Q^T * exp(g_i - g_j))_{i >= j} dO from kq = K Q^T of the chunk (rows j: keys,
    columns i: queries): the part of dVn that the reverse chain does not carry."""
    o_i = tl.arange(0, 64)
    upper = o_i[:, None] <= o_i[None, :]
    a = kq * scale
    if USE_G:
        a = a * _ratio(g[None, :] - g[:, None], upper)
    a = tl.where(upper, a, 0.0).to(dvl_ptr.dtype.element_ty)
    HV = H * V
    for c0 in range(0, V, BV):
        dof = _tile(do_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        _store_tile(dvl_ptr + ih * V, tl.dot(a, dof, input_precision=DOT), t0, eos, HV, c0, V, 64, BV)


@triton.jit
def _solve_chunk(k_ptr, beta_ptr, g_ptr, gc_ptr, t_ptr, ih, t0, eos, H, K,
                 BK: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr):
    """The cumulative in-chunk gate and T = (I + Akk)^-1 of one (chunk, head), both stored: the
    16 x 16 blocks of K K^T accumulated over K slices of BK, then _solve16."""
    HK = H * K
    kh = k_ptr + ih * K
    a00 = tl.zeros([16, 16], dtype=tl.float32)
    a11 = tl.zeros([16, 16], dtype=tl.float32)
    a22 = tl.zeros([16, 16], dtype=tl.float32)
    a33 = tl.zeros([16, 16], dtype=tl.float32)
    a10 = tl.zeros([16, 16], dtype=tl.float32)
    a20 = tl.zeros([16, 16], dtype=tl.float32)
    a21 = tl.zeros([16, 16], dtype=tl.float32)
    a30 = tl.zeros([16, 16], dtype=tl.float32)
    a31 = tl.zeros([16, 16], dtype=tl.float32)
    a32 = tl.zeros([16, 16], dtype=tl.float32)
    for c0 in range(0, K, BK):
        k0 = _tile(kh, t0, eos, HK, c0, K, 16, BK)
        k1 = _tile(kh, t0 + 16, eos, HK, c0, K, 16, BK)
        k2 = _tile(kh, t0 + 32, eos, HK, c0, K, 16, BK)
        k3 = _tile(kh, t0 + 48, eos, HK, c0, K, 16, BK)
        kt0 = _tile_t(kh, t0, eos, HK, c0, K, 16, BK)
        kt1 = _tile_t(kh, t0 + 16, eos, HK, c0, K, 16, BK)
        kt2 = _tile_t(kh, t0 + 32, eos, HK, c0, K, 16, BK)
        a00 += tl.dot(k0, kt0, input_precision=DOT)
        a11 += tl.dot(k1, kt1, input_precision=DOT)
        a22 += tl.dot(k2, kt2, input_precision=DOT)
        a33 += tl.dot(k3, _tile_t(kh, t0 + 48, eos, HK, c0, K, 16, BK), input_precision=DOT)
        a10 += tl.dot(k1, kt0, input_precision=DOT)
        a20 += tl.dot(k2, kt0, input_precision=DOT)
        a21 += tl.dot(k2, kt1, input_precision=DOT)
        a30 += tl.dot(k3, kt0, input_precision=DOT)
        a31 += tl.dot(k3, kt1, input_precision=DOT)
        a32 += tl.dot(k3, kt2, input_precision=DOT)
    b0, b1, b2, b3, g0, g1, g2, g3 = _gates16(beta_ptr, g_ptr, gc_ptr, ih, t0, eos, H, USE_G)
    T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = _solve16(
        a00, a11, a22, a33, a10, a20, a21, a30, a31, a32, b0, b1, b2, b3, g0, g1, g2, g3, USE_G)
    _store_t16(t_ptr, ih, t0, eos, H, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33)


@triton.jit
def _apply_chunk(k_ptr, v_ptr, beta_ptr, gc_ptr, t_ptr, q_ptr, do_ptr, w_ptr, u_ptr, dvl_ptr, scale,
                 ih, t0, eos, H, K, V, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                 STORE_U: tl.constexpr, DO_DVL: tl.constexpr, DOT: tl.constexpr):
    """W = T diag(beta exp(g)) K, U = T diag(beta) V (full 64-row products with the stored T), and
    for the backward dVl = scale (Q K^T * D)^T dO, the part of dVn the chain does not carry."""
    HK = H * K
    HV = H * V
    tm = _tile(t_ptr + ih * 64, t0, eos, H * 64, 0, 64, 64, 64)
    dt = tm.dtype
    beta, g, bg = _beta_gate64(beta_ptr, gc_ptr, ih, t0, eos, H, USE_G)
    for c0 in range(0, K, BK):
        x = (_tile(k_ptr + ih * K, t0, eos, HK, c0, K, 64, BK) * bg[:, None]).to(dt)
        _store_tile(w_ptr + ih * K, tl.dot(tm, x, input_precision=DOT), t0, eos, HK, c0, K, 64, BK)
    if STORE_U:
        for c0 in range(0, V, BV):
            y = (_tile(v_ptr + ih * V, t0, eos, HV, c0, V, 64, BV) * beta[:, None]).to(dt)
            _store_tile(u_ptr + ih * V, tl.dot(tm, y, input_precision=DOT), t0, eos, HV, c0, V, 64, BV)
    if DO_DVL:
        a = tl.zeros([64, 64], dtype=tl.float32)
        for c0 in range(0, K, BK):
            a += tl.dot(_tile(k_ptr + ih * K, t0, eos, HK, c0, K, 64, BK),
                        _tile_t(q_ptr + ih * K, t0, eos, HK, c0, K, 64, BK), input_precision=DOT)
        _local_dv(a, g, do_ptr, dvl_ptr, ih, t0, eos, H, V, scale, BV, USE_G, DOT)


@triton.jit
def wy_apply(k_ptr, v_ptr, beta_ptr, gc_ptr, t_ptr, q_ptr, do_ptr, w_ptr, u_ptr, dvl_ptr, scale,
             cu_ptr, idx_ptr, T, NT, H, K, V,
             BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_G: tl.constexpr,
             STORE_U: tl.constexpr, DO_DVL: tl.constexpr, DOT: tl.constexpr):
    """_apply_chunk per (chunk, head), from the T the forward kept."""
    n, t0, eos = _chunk_coords(tl.program_id(0), cu_ptr, idx_ptr, T, NT, IS_VARLEN)
    _apply_chunk(k_ptr, v_ptr, beta_ptr, gc_ptr, t_ptr, q_ptr, do_ptr, w_ptr, u_ptr, dvl_ptr, scale,
                 tl.program_id(1), t0, eos, H, K, V, BK, BV, USE_G, STORE_U, DO_DVL, DOT)


@triton.jit
def wy_solve_apply(k_ptr, v_ptr, beta_ptr, g_ptr, q_ptr, do_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, dvl_ptr, scale,
                   cu_ptr, idx_ptr, T, NT, H, K, V,
                   BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_G: tl.constexpr,
                   STORE_U: tl.constexpr, DO_DVL: tl.constexpr, DOT: tl.constexpr):
    """_solve_chunk then _apply_chunk in one program: T and the gate go out and come back (from L1 /
    L2) in the layout of the 64-row products, so the solve's registers are free for them."""
    ih = tl.program_id(1)
    n, t0, eos = _chunk_coords(tl.program_id(0), cu_ptr, idx_ptr, T, NT, IS_VARLEN)
    _solve_chunk(k_ptr, beta_ptr, g_ptr, gc_ptr, t_ptr, ih, t0, eos, H, K, BK, USE_G, DOT)
    tl.debug_barrier()  # T and the gate written by every thread before any reads them back
    _apply_chunk(k_ptr, v_ptr, beta_ptr, gc_ptr, t_ptr, q_ptr, do_ptr, w_ptr, u_ptr, dvl_ptr, scale,
                 ih, t0, eos, H, K, V, BK, BV, USE_G, STORE_U, DO_DVL, DOT)


# ----------------------------------------------------------------------------------------------
# The state chains: one program per (column block, segment x head[, direction])
#
# A segment is a run of chunks of one document (the whole document, or a piece of it when long
# documents are cut to get more programs in flight). Table row: (document, first token, number of
# chunks, global index of its first chunk).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _segment(seg_ptr, s, cu_ptr, T, IS_VARLEN: tl.constexpr):
    n = tl.load(seg_ptr + s * 4)
    tb = tl.load(seg_ptr + s * 4 + 1)
    nc = tl.load(seg_ptr + s * 4 + 2)
    goff = tl.load(seg_ptr + s * 4 + 3)
    if IS_VARLEN:
        eos = tl.load(cu_ptr + n + 1).to(tl.int32)
    else:
        eos = (n + 1) * T
    return tb, eos, nc, goff


@triton.jit
def _forward_chain(k_ptr, gc_ptr, w_ptr, u_ptr, init_ptr, h_ptr, vn_ptr, out_ptr,
                   s, ih, c0, tb, eos, nc, goff, H, K, V,
                   BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, INIT: tl.constexpr,
                   STORE: tl.constexpr, WRITE_FINAL: tl.constexpr, TRANSITION: tl.constexpr,
                   GATE_RESULTS: tl.constexpr, DOT: tl.constexpr):
    """S <- exp(gl) S + Kd^T (U - W S) over the segment's chunks, S in fp32. INIT: 0 zero, 1 from
    init_ptr[s]. STORE: S at every chunk start and Vn. TRANSITION: the dense transition instead
    (U = 0, S starts at the identity; columns index K)."""
    HK = H * K
    HV = H * V
    sb = (s * H + ih).to(tl.int64)
    if TRANSITION:
        rk = tl.arange(0, BK)
        cv = c0 + tl.arange(0, BV)
        st = tl.where(rk[:, None] == cv[None, :], 1.0, 0.0)
    elif INIT == 1:
        st = _state_tile(init_ptr + sb * K * V, K, V, c0, BK, BV).to(tl.float32)
    else:
        st = tl.zeros([BK, BV], dtype=tl.float32)
    for it in range(nc):
        t0 = tb + it * 64
        w = _tile(w_ptr + ih * K, t0, eos, HK, 0, K, 64, BK)
        kt = _tile_t(k_ptr + ih * K, t0, eos, HK, 0, K, 64, BK)
        if STORE:
            _store_state(h_ptr + ((goff + it) * H + ih).to(tl.int64) * K * V, st, K, V, c0, BK, BV)
        if TRANSITION:
            vn = -tl.dot(w, st.to(w.dtype), input_precision=DOT)
        else:
            u = _tile(u_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
            vn = u.to(tl.float32) - tl.dot(w, st.to(w.dtype), input_precision=DOT)
        if STORE:
            _store_tile(vn_ptr + ih * V, vn, t0, eos, HV, c0, V, 64, BV)
        if USE_G:
            last = tl.minimum(t0 + 64, eos) - 1
            gl = tl.load(gc_ptr + last.to(tl.int64) * H + ih)
            g = _vec(gc_ptr + ih, t0, eos, H, 64)
            if GATE_RESULTS:  # Kd^T Vn = K^T (d Vn): the loaded K goes to the product unchanged
                vn = vn * tl.exp(gl - g)[:, None]
            else:
                kt = (kt * tl.exp(gl - g)[None, :]).to(w.dtype)
            st = st * tl.exp(gl)
        st += tl.dot(kt, vn.to(w.dtype), input_precision=DOT)
    if WRITE_FINAL:
        if TRANSITION:
            _store_state(out_ptr + sb * K * K, st, K, K, c0, BK, BV)
        else:
            _store_state(out_ptr + sb * K * V, st, K, V, c0, BK, BV)


@triton.jit
def _reverse_chain(q_ptr, k_ptr, gc_ptr, w_ptr, do_ptr, dvl_ptr, init_ptr, dh_ptr, dvn_ptr, out_ptr,
                   s, ih, c0, tb, eos, nc, goff, scale, H, K, V,
                   BK: tl.constexpr, BV: tl.constexpr, INIT: tl.constexpr,
                   STORE: tl.constexpr, WRITE_FINAL: tl.constexpr, GATE_RESULTS: tl.constexpr, DOT: tl.constexpr):
    """The adjoint chain, last chunk first: with dS the gradient of the chunk's end state,
    dVn = dVl + Kd dS;  dS <- exp(gl) dS + scale (Q exp(g))^T dO - W^T dVn. Always with a gate:
    delta_rule passes a zero one (without, this chain ran 40 % slower on an H100, run 11k)."""
    HK = H * K
    HV = H * V
    sb = (s * H + ih).to(tl.int64)
    if INIT == 1:
        ds = _state_tile(init_ptr + sb * K * V, K, V, c0, BK, BV).to(tl.float32)
    else:
        ds = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(nc):
        it = nc - 1 - j
        t0 = tb + it * 64
        kk = _tile(k_ptr + ih * K, t0, eos, HK, 0, K, 64, BK)
        qt = _tile_t(q_ptr + ih * K, t0, eos, HK, 0, K, 64, BK)
        wt = _tile_t(w_ptr + ih * K, t0, eos, HK, 0, K, 64, BK)
        do = _tile(do_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        dvl = _tile(dvl_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        if STORE:
            _store_state(dh_ptr + ((goff + it) * H + ih).to(tl.int64) * K * V, ds, K, V, c0, BK, BV)
        last = tl.minimum(t0 + 64, eos) - 1
        gl = tl.load(gc_ptr + last.to(tl.int64) * H + ih)
        g = _vec(gc_ptr + ih, t0, eos, H, 64)
        if GATE_RESULTS:  # the gates scale the products' results (and dO), not the loaded Q and K
            kds = tl.dot(kk, ds.to(wt.dtype), input_precision=DOT) * tl.exp(gl - g)[:, None]
            qdo = tl.dot(qt, (do * (tl.exp(g) * scale)[:, None]).to(wt.dtype), input_precision=DOT)
        else:
            kk = (kk * tl.exp(gl - g)[:, None]).to(wt.dtype)
            qt = (qt * (tl.exp(g) * scale)[None, :]).to(wt.dtype)
            kds = tl.dot(kk, ds.to(wt.dtype), input_precision=DOT)
            qdo = tl.dot(qt, do, input_precision=DOT)
        dvn = dvl.to(tl.float32) + kds
        if STORE:
            _store_tile(dvn_ptr + ih * V, dvn, t0, eos, HV, c0, V, 64, BV)
        ds = ds * tl.exp(gl)
        ds += qdo - tl.dot(wt, dvn.to(wt.dtype), input_precision=DOT)
    if WRITE_FINAL:
        _store_state(out_ptr + sb * K * V, ds, K, V, c0, BK, BV)


@triton.jit
def state_pass(q_ptr, k_ptr, gc_ptr, w_ptr, u_ptr, do_ptr, dvl_ptr,
               finit_ptr, h_ptr, vn_ptr, fout_ptr, m_ptr, rinit_ptr, dh_ptr, dvn_ptr, rout_ptr,
               scale, seg_ptr, cu_ptr, T, H, K, V, NVB,
               BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_G: tl.constexpr,
               FORWARD: tl.constexpr, REVERSE: tl.constexpr, FWD_V: tl.constexpr, WITH_M: tl.constexpr,
               FINIT: tl.constexpr, RINIT: tl.constexpr, STORE: tl.constexpr, WRITE_FINAL: tl.constexpr,
               GATE_RESULTS: tl.constexpr, DOT: tl.constexpr):
    """Grid (column blocks, segments x heads, FORWARD + REVERSE). Forward programs: the first NVB
    column blocks run the state over V (FWD_V), the next ones the transition over K (WITH_M).
    Reverse programs: the gradient chain over V. The directions are independent, so a backward
    runs both side by side in one launch."""
    iv = tl.program_id(0)
    sh = tl.program_id(1)
    s = sh // H
    ih = sh % H
    tb, eos, nc, goff = _segment(seg_ptr, s, cu_ptr, T, IS_VARLEN)
    if FORWARD and REVERSE:
        run_forward = tl.program_id(2) == 0
    else:
        run_forward = FORWARD
    if run_forward:
        if FWD_V:
            if iv < NVB:
                _forward_chain(k_ptr, gc_ptr, w_ptr, u_ptr, finit_ptr, h_ptr, vn_ptr, fout_ptr,
                               s, ih, iv * BV, tb, eos, nc, goff, H, K, V,
                               BK, BV, USE_G, FINIT, STORE, WRITE_FINAL, False, GATE_RESULTS, DOT)
            elif WITH_M:
                _forward_chain(k_ptr, gc_ptr, w_ptr, u_ptr, finit_ptr, h_ptr, vn_ptr, m_ptr,
                               s, ih, (iv - NVB) * BV, tb, eos, nc, goff, H, K, K,
                               BK, BV, USE_G, 0, False, True, True, GATE_RESULTS, DOT)
        elif WITH_M:
            _forward_chain(k_ptr, gc_ptr, w_ptr, u_ptr, finit_ptr, h_ptr, vn_ptr, m_ptr,
                           s, ih, iv * BV, tb, eos, nc, goff, H, K, K,
                           BK, BV, USE_G, 0, False, True, True, GATE_RESULTS, DOT)
    elif REVERSE:  # a compile-time branch: a forward-only launch has no gate to give the reverse chain
        if iv < NVB:
            _reverse_chain(q_ptr, k_ptr, gc_ptr, w_ptr, do_ptr, dvl_ptr, rinit_ptr, dh_ptr, dvn_ptr, rout_ptr,
                           s, ih, iv * BV, tb, eos, nc, goff, scale, H, K, V,
                           BK, BV, RINIT, STORE, WRITE_FINAL, GATE_RESULTS, DOT)


@triton.jit
def segment_scan(m_ptr, fsum_ptr, rsum_ptr, h0_ptr, start_ptr, ht_ptr, dht_ptr, grad_ptr, dh0_ptr,
                 segoff_ptr, H, K, V,
                 BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr,
                 FORWARD: tl.constexpr, REVERSE: tl.constexpr, USE_H0: tl.constexpr, USE_DHT: tl.constexpr,
                 USE_SUMS: tl.constexpr):
    """Across the segments of one document, in fp32: forward S_in(s+1) = M_s S_in(s) + dS_s from h0
    (writes every S_in and ht; without USE_SUMS dS = 0, so from the identity ht is the document's
    transition); reverse G(s-1) = M_s^T G(s) + D_s from dht (writes every G, the
    gradient of segment s's end state, and dh0). The product contracts over K in blocks of KB
    re-read from the state just written (a [BK, BK] transition would not fit in registers)."""
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    ih = nh % H
    c0 = iv * BV
    s_begin = tl.load(segoff_ptr + n)
    s_end = tl.load(segoff_ptr + n + 1)
    if FORWARD and REVERSE:
        run_forward = tl.program_id(2) == 0
    else:
        run_forward = FORWARD
    KV = K * V
    KK = K * K
    rk = tl.arange(0, BK)
    cv = c0 + tl.arange(0, BV)
    rb = tl.arange(0, KB)
    if run_forward:
        if USE_H0:
            st = _state_tile(h0_ptr + (n * H + ih).to(tl.int64) * KV, K, V, c0, BK, BV).to(tl.float32)
        else:
            st = tl.zeros([BK, BV], dtype=tl.float32)
        for s in range(s_begin, s_end):
            sb = (s * H + ih).to(tl.int64)
            _store_state(start_ptr + sb * KV, st, K, V, c0, BK, BV)
            tl.debug_barrier()
            if USE_SUMS:
                st = _state_tile(fsum_ptr + sb * KV, K, V, c0, BK, BV)
            else:
                st = tl.zeros([BK, BV], dtype=tl.float32)
            for kb in range(0, K, KB):
                m = tl.load(m_ptr + sb * KK + rk[:, None] * K + kb + rb[None, :],
                            mask=(rk[:, None] < K) & (kb + rb[None, :] < K), other=0.0)
                x = tl.load(start_ptr + sb * KV + (kb + rb[:, None]) * V + cv[None, :],
                            mask=(kb + rb[:, None] < K) & (cv[None, :] < V), other=0.0)
                st += tl.dot(m, x, input_precision="tf32x3")
            tl.debug_barrier()
        _store_state(ht_ptr + (n * H + ih).to(tl.int64) * KV, st, K, V, c0, BK, BV)
    else:
        if USE_DHT:
            gs = _state_tile(dht_ptr + (n * H + ih).to(tl.int64) * KV, K, V, c0, BK, BV).to(tl.float32)
        else:
            gs = tl.zeros([BK, BV], dtype=tl.float32)
        for j in range(s_end - s_begin):
            s = s_end - 1 - j
            sb = (s * H + ih).to(tl.int64)
            _store_state(grad_ptr + sb * KV, gs, K, V, c0, BK, BV)
            tl.debug_barrier()
            gs = _state_tile(rsum_ptr + sb * KV, K, V, c0, BK, BV)
            for kb in range(0, K, KB):
                mt = tl.load(m_ptr + sb * KK + (kb + rb[None, :]) * K + rk[:, None],
                             mask=(rk[:, None] < K) & (kb + rb[None, :] < K), other=0.0)
                x = tl.load(grad_ptr + sb * KV + (kb + rb[:, None]) * V + cv[None, :],
                            mask=(kb + rb[:, None] < K) & (cv[None, :] < V), other=0.0)
                gs += tl.dot(mt, x, input_precision="tf32x3")
            tl.debug_barrier()
        _store_state(dh0_ptr + (n * H + ih).to(tl.int64) * KV, gs, K, V, c0, BK, BV)


# ----------------------------------------------------------------------------------------------
# Outputs: one program per (chunk, head, V block)
# ----------------------------------------------------------------------------------------------

@triton.jit
def output(q_ptr, k_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, scale,
           cu_ptr, idx_ptr, T, NT, H, K, V,
           BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr):
    """O = scale (diag(exp(g)) Q S + (Q K^T * D)_{causal} Vn), the K-contractions in slices of BK
    (a pipelined loop: its loads overlap the products)."""
    pid = tl.program_id(0)
    ih = tl.program_id(1)
    c0 = tl.program_id(2) * BV
    n, t0, eos = _chunk_coords(pid, cu_ptr, idx_ptr, T, NT, IS_VARLEN)
    HK = H * K
    HV = H * V
    hs = h_ptr + (pid * H + ih).to(tl.int64) * K * V
    a = tl.zeros([64, 64], dtype=tl.float32)
    o = tl.zeros([64, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        q = _tile(q_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
        a += tl.dot(q, _tile_t(k_ptr + ih * K, t0, eos, HK, k0, K, 64, BK), input_precision=DOT)
        o += tl.dot(q, _state_tile(hs + k0 * V, K - k0, V, c0, BK, BV), input_precision=DOT)
    vn = _tile(vn_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
    o_i = tl.arange(0, 64)
    causal = o_i[:, None] >= o_i[None, :]
    if USE_G:
        g = _vec(gc_ptr + ih, t0, eos, H, 64)
        a = a * _ratio(g[:, None] - g[None, :], causal)
        o = o * tl.exp(g)[:, None]
    a = tl.where(causal, a, 0.0).to(vn.dtype)
    o = (o + tl.dot(a, vn, input_precision=DOT)) * scale
    _store_tile(o_ptr + ih * V, o, t0, eos, HV, c0, V, 64, BV)


# ----------------------------------------------------------------------------------------------
# Backward through the outputs and the chain: one program per (chunk, head, K block)
# ----------------------------------------------------------------------------------------------

@triton.jit
def bwd_dqk(q_ptr, k_ptr, gc_ptr, h_ptr, vn_ptr, do_ptr, dh_ptr, dvn_ptr,
            dq_ptr, dk_ptr, dw_ptr, dg_ptr, scale,
            cu_ptr, idx_ptr, T, NT, H, K, V, NROWS,
            BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_G: tl.constexpr,
            DOT: tl.constexpr):
    """dq (final), dk (the part through outputs and chain), dW = -dVn S^T and the partial gate
    gradient of this K block (w.r.t. the cumulative gate). dA^T for dk is formed by its own
    products (dO^T Vn^T), not transposed (the Hopper tl.trans hazard): as fast as reading it back
    from a scratch tile (run 10h), and simpler."""
    pid = tl.program_id(0)
    ih = tl.program_id(1)
    ik = tl.program_id(2)
    k0 = ik * BK
    n, t0, eos = _chunk_coords(pid, cu_ptr, idx_ptr, T, NT, IS_VARLEN)
    HK = H * K
    HV = H * V
    st = (pid * H + ih).to(tl.int64) * K * V
    dohT = tl.zeros([64, BK], dtype=tl.float32)
    vndhT = tl.zeros([64, BK], dtype=tl.float32)
    dvnhT = tl.zeros([64, BK], dtype=tl.float32)
    dp = tl.zeros([64, 64], dtype=tl.float32)
    dpt = tl.zeros([64, 64], dtype=tl.float32)
    hdh = 0.0  # sum of h * dh over the state: the chunk's share of the last token's gate gradient
    for c0 in range(0, V, BV):
        do = _tile(do_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        vn = _tile(vn_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        vnt = _tile_t(vn_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        dvn = _tile(dvn_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        ht = _state_tile_t(h_ptr + st, K, V, c0, BK, BV, k0)
        dht = _state_tile_t(dh_ptr + st, K, V, c0, BK, BV, k0)
        dohT += tl.dot(do, ht, input_precision=DOT)
        vndhT += tl.dot(vn, dht, input_precision=DOT)
        dvnhT += tl.dot(dvn, ht, input_precision=DOT)
        dp += tl.dot(do, vnt, input_precision=DOT)
        dpt += tl.dot(vn, _tile_t(do_ptr + ih * V, t0, eos, HV, c0, V, 64, BV), input_precision=DOT)
        if USE_G:
            hdh += tl.sum(tl.sum(ht.to(tl.float32) * dht.to(tl.float32), 1), 0)
    q = _tile(q_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
    k = _tile(k_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
    dt = q.dtype
    o_i = tl.arange(0, 64)
    causal = o_i[:, None] >= o_i[None, :]
    anti = o_i[:, None] <= o_i[None, :]
    if USE_G:
        g = _vec(gc_ptr + ih, t0, eos, H, 64)
        last = tl.minimum(t0 + 64, eos) - 1
        gl = tl.load(gc_ptr + last.to(tl.int64) * H + ih)
        dp = dp * _ratio(g[:, None] - g[None, :], causal)
        dpt = dpt * _ratio(g[None, :] - g[:, None], anti)
    da = tl.where(causal, dp * scale, 0.0).to(dt)
    dat = tl.where(anti, dpt * scale, 0.0).to(dt)
    dq = tl.dot(da, k, input_precision=DOT)
    dk_in = tl.dot(dat, q, input_precision=DOT)
    if USE_G:
        dq += dohT * (tl.exp(g) * scale)[:, None]
        kd = vndhT * tl.exp(gl - g)[:, None]
        dk = dk_in + kd
        kf = k.to(tl.float32)
        dgk = tl.sum(kf * kd, 1)
        dg = tl.sum(q.to(tl.float32) * dq, 1) - tl.sum(kf * dk_in, 1) - dgk
        dg += tl.where(t0 + o_i == last, tl.sum(dgk, 0) + tl.exp(gl) * hdh, 0.0)
        _store_vec(dg_ptr + ik * NROWS * H + ih, dg, t0, eos, H, 64)
    else:
        dq += dohT * scale
        dk = dk_in + vndhT
    _store_tile(dq_ptr + ih * K, dq, t0, eos, HK, k0, K, 64, BK)
    _store_tile(dk_ptr + ih * K, dk, t0, eos, HK, k0, K, 64, BK)
    _store_tile(dw_ptr + ih * K, -dvnhT, t0, eos, HK, k0, K, 64, BK)


# ----------------------------------------------------------------------------------------------
# Backward through the WY form: one program per (chunk, head)
# ----------------------------------------------------------------------------------------------

@triton.jit
def bwd_wy(k_ptr, v_ptr, beta_ptr, gc_ptr, t_ptr, dw_ptr, dvn_ptr, dkp_ptr, dgp_ptr, s_ptr,
           dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,
           cu_ptr, idx_ptr, T, NT, H, K, V, NROWS,
           BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
           IS_VARLEN: tl.constexpr, USE_G: tl.constexpr, MID_IN_INPUT_DTYPE: tl.constexpr, DOT: tl.constexpr):
    """With dU = dVn, dW from bwd_dqk:  R = dU (beta V)^T + dW (beta exp(g) K)^T,
    dAkk = -T^T R T^T (strictly lower), dV = beta T^T dU, d(beta exp(g) K) = T^T dW, and dAkk
    into dk, dbeta, dg. dAkk^T goes through the program's tile of the scratch s_ptr ([tokens, H, 64];
    tl.trans of a product is the Hopper hazard): forming it by its own products took a
    third more matrix products and the registers that kept this kernel at 8 warps (docs/performance.md,
    run 10)."""
    pid = tl.program_id(0)
    ih = tl.program_id(1)
    n, t0, eos = _chunk_coords(pid, cu_ptr, idx_ptr, T, NT, IS_VARLEN)
    HK = H * K
    HV = H * V
    HC = H * 64
    tmt = _tile_t(t_ptr + ih * 64, t0, eos, HC, 0, 64, 64, 64)
    dt = tmt.dtype
    beta, g, bg = _beta_gate64(beta_ptr, gc_ptr, ih, t0, eos, H, USE_G)
    r = tl.zeros([64, 64], dtype=tl.float32)
    dbeta = tl.zeros([64], dtype=tl.float32)
    for c0 in range(0, V, BV):
        du = _tile(dvn_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        v = _tile(v_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        vt = _tile_t(v_ptr + ih * V, t0, eos, HV, c0, V, 64, BV)
        r += tl.dot(du, (vt * beta[None, :]).to(dt), input_precision=DOT)
        dut_ = tl.dot(tmt, du, input_precision=DOT)  # T^T dU
        dbeta += tl.sum(dut_ * v.to(tl.float32), 1)
        _store_tile(dv_ptr + ih * V, dut_ * beta[:, None], t0, eos, HV, c0, V, 64, BV)
    for k0 in range(0, K, BK):
        dw = _tile(dw_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
        kt = _tile_t(k_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
        r += tl.dot(dw, (kt * bg[None, :]).to(dt), input_precision=DOT)
    o_i = tl.arange(0, 64)
    lower = o_i[:, None] > o_i[None, :]
    upper = o_i[:, None] < o_i[None, :]
    if MID_IN_INPUT_DTYPE:  # R and T^T R rounded to the input dtype: 16-bit products, fewer registers
        y = -tl.dot(tl.dot(tmt, r.to(dt), input_precision=DOT).to(dt), tmt, input_precision=DOT)  # dAkk
    else:
        tmtf = tmt.to(tl.float32)
        y = -tl.dot(tl.dot(tmtf, r, input_precision=DOT), tmtf, input_precision=DOT)  # dAkk
    if USE_G:
        y = y * _ratio(g[:, None] - g[None, :], lower)
    y = tl.where(lower, y, 0.0)  # Y = dAkk * Gamma: dAkk_ij = beta_i Y_ij k_i.k_j
    yt = _transposed(s_ptr + ih * 64, y, t0, eos, HC).to(tl.float32)
    xt = tl.where(upper, yt * beta[None, :], 0.0)  # X^T with X = diag(beta) Y
    yk_dt = y.to(dt)
    xt_dt = xt.to(dt)
    dg = tl.zeros([64], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = _tile(k_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
        kf = k.to(tl.float32)
        dw = _tile(dw_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
        dwt_ = tl.dot(tmt, dw, input_precision=DOT)  # T^T dW = d(beta exp(g) K)
        yk = tl.dot(yk_dt, k, input_precision=DOT)
        xtk = tl.dot(xt_dt, k, input_precision=DOT)
        dkp = _tile(dkp_ptr + ih * K, t0, eos, HK, k0, K, 64, BK)
        dk = dkp + dwt_ * bg[:, None] + yk * beta[:, None] + xtk
        _store_tile(dk_ptr + ih * K, dk, t0, eos, HK, k0, K, 64, BK)
        kyk = tl.sum(kf * yk, 1)
        if USE_G:
            dbeta += tl.sum(dwt_ * kf, 1) * tl.exp(g) + kyk
            dg += tl.sum(dwt_ * kf, 1) * bg + beta * kyk - tl.sum(kf * xtk, 1)
        else:
            dbeta += tl.sum(dwt_ * kf, 1) + kyk
    _store_vec(dbeta_ptr + ih, dbeta, t0, eos, H, 64)
    if USE_G:
        for ik in range(NK):
            dg += _vec(dgp_ptr + ik * NROWS * H + ih, t0, eos, H, 64)
        # gradient w.r.t. the raw gates: reverse cumulative sum inside the chunk
        dg = tl.sum(dg, 0) - tl.cumsum(dg, 0) + dg
        _store_vec(dg_ptr + ih, dg, t0, eos, H, 64)
