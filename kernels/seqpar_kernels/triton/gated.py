"""Triton chunkwise kernels for the gated family: linear_attn, lightning, simple_gla, gla.

Per head, S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T and o_t = scale * S_t^T q_t, with g absent
(GATE 0), one log decay per token (GATE 1, [B,T,H]; lightning arrives expanded to this form) or
one per key channel (GATE 2, [B,T,H,K]).

Chunks of C = 64 tokens. Inside a chunk G is the cumulative log2 decay (g / ln 2, cumsum), and
every decay factor is exp2(G_i - G_j) with G_i <= G_j, never exp(-G): nothing overflows however
strong the gate. The passes:

* state pass (`_state_pass_kernel`): one program per (segment of chunks, head, K/V tile), walking
  its chunks in order and storing the state entering each chunk, started from zero at the segment
  start; reversed (q, do instead of k, v) it gives the state gradient leaving each chunk.
* scan (`_scan_kernel`): per sequence, folds the segments' local states in order to get the true
  state entering (leaving) each segment, with the initial state (final-state gradient).
  A chunk's true state is its local one plus the segment's incoming state decayed to the chunk.
* chunk-parallel passes: outputs and, run backwards in time, dv (`_apply_kernel`); dq/dk/dg
  (`_bwd_dqk_kernel`).

Per-key gates (GATE 2) first form the intra-chunk matrix A_ij = sum_k q_ik k_jk exp2(G_ik - G_jk)
once per chunk and head (`_gla_intra_kernel`, fp32 in memory; the backward also stores dA = do v^T
and G there, and takes A from the forward through call.memo when it can), so the passes above are
plain matrix products with it. Inside a chunk, blocks of BC = 16 tokens: pairs in different blocks
go through tensor-core products, the decay split at block ends into factors that are all <= 1
(one exp2 per element on each side); pairs inside a block are formed element by element, a 16-step
loop over the rows of every block at once ([4, 16, BK] tensors). No tl.trans anywhere: transposed
operands are loaded transposed (Triton 3.4-3.7.0 on Hopper miscompiles tl.trans of matrix-product
results).

dg uses the chunk-local identity dG_i = q_i*dq_i - k_i*dk_i (plus the state term at the chunk end)
and dg = reverse cumsum of dG within the chunk, so nothing long-range cancels.
"""
from __future__ import annotations

import functools

import json
import os

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ..explicit import Call, Grads, hand_over, plus_late, reuse, take
from ._plan import Plan, cdiv, default_segment_chunks, dot_precision, make_plan, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)  # gates become log2 decays: exp2 is the fast exponential
CHUNK = 64
INTRA = "intra"  # memo key of the forward's intra-chunk matrix A (per-key gates), for the backward
BLOCK = 16  # sub-chunk of the per-key intra-chunk products

# (BK, BV, num_warps, num_stages) of each kernel by gate kind (0 none, 1 per token, 2 per key).
# BK and BV are caps: smaller head dimensions take their own (power-of-two) width. Chosen from the
# sm_90 compiler's resource report (Triton 3.6): no register spills, two or more programs per SM
# where the tiles allow; then by GPU timing: the per-key state and intra tiles won the H100 tile
# sweep of docs/performance.md (intra at BK=64 spills 40-64 B and is still 0.6 ms faster at 64K);
# the H200's sweep (run 13) then moved dq/dk of ungated and scalar-gated calls to 4 warps (scalar:
# spills 240 B and is still 0.6 ms faster; 3 stages helps only ungated calls) and the per-key
# output/dv to 4 warps, 3 stages; all three are faster on the H100 too.
# SEQPAR_GATED_TILES='{"out:2": [32, 64, 4, 2]}' overrides entries, for tuning runs: every setting
# used must pass the GPU check.
TILES = {
    "state": {0: (64, 64, 4, 3), 1: (64, 64, 4, 3), 2: (32, 128, 4, 3)},
    "out": {0: (64, 128, 8, 2), 1: (64, 128, 8, 2), 2: (32, 128, 4, 3)},
    "dqk": {0: (64, 64, 4, 3), 1: (64, 64, 4, 2), 2: (32, 64, 8, 2)},
    "dv": {0: (64, 128, 8, 2), 1: (64, 128, 8, 2), 2: (32, 128, 4, 3)},
    "intra": {2: (64, 64, 4, 2)},  # per-key A (BK) and, backward, dA (BV)
}
for _key, _val in json.loads(os.environ.get("SEQPAR_GATED_TILES", "{}")).items():
    _name, _gate = _key.split(":")
    TILES[_name][int(_gate)] = tuple(_val)


# ----------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)

@triton.jit
def _gate_scalar(g, t0, o_t, m_t, i_h, H):
    """Per-token gate of one chunk as log2 decays: (G [C] cumulative, G_last scalar)."""
    b_g = tl.load(g + t0 * H + i_h + o_t * H, mask=m_t, other=0).to(tl.float32) * LOG2E
    return tl.cumsum(b_g, 0), tl.sum(b_g, 0)


@triton.jit
def _gate_key(g, t0, o_t, m_t, i_h, H, K: tl.constexpr, o_k, m_k):
    """Per-key gate [C, BK] of one chunk: (G cumulative over rows, G_last [BK])."""
    b_g = _tile(g, t0, o_t, m_t, i_h, H, K, o_k, m_k).to(tl.float32) * LOG2E
    return tl.cumsum(b_g, 0), tl.sum(b_g, 0)


@triton.jit
def _gate_key_t(g, t0, o_t, m_t, i_h, H, K: tl.constexpr, o_k, m_k):
    """The same, loaded transposed [BK, C] (cumulative over columns)."""
    b_g = _tile_t(g, t0, o_t, m_t, i_h, H, K, o_k, m_k).to(tl.float32) * LOG2E
    return tl.cumsum(b_g, 1)


@triton.jit
def _chunk(chunk_start, chunk_end, chunk_seg, i_c):
    """Chunk i_c: (first row, number of rows, segment)."""
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_end + i_c) - t0
    return t0.to(tl.int64), n, tl.load(chunk_seg + i_c).to(tl.int64)


@triton.jit
def _tile(x, t0, o_t, m_t, i_h, H, D: tl.constexpr, o_d, m_d):
    """Tile [C, BD] of a [rows, H, D] tensor: rows t0 + o_t, columns o_d. A 64-bit base and
    32-bit offsets (64-bit offsets per element cost registers)."""
    return tl.load(x + (t0 * H + i_h) * D + (o_t[:, None] * (H * D) + o_d[None, :]),
                   mask=m_t[:, None] & m_d[None, :], other=0)


@triton.jit
def _tile_t(x, t0, o_t, m_t, i_h, H, D: tl.constexpr, o_d, m_d):
    """The transposed tile [BD, C]."""
    return tl.load(x + (t0 * H + i_h) * D + (o_t[None, :] * (H * D) + o_d[:, None]),
                   mask=m_t[None, :] & m_d[:, None], other=0)


@triton.jit
def _state_tiles(local, seg_in, c, s, i_h, H, K: tl.constexpr, V: tl.constexpr, o_k, m_k, o_v, m_v,
                 TRANS: tl.constexpr):
    """Chunk c's segment-local state and its segment's incoming state, as stored: [BK, BV] each,
    or [BV, BK] if TRANS. The chunk's true state is local + decay_to_chunk * incoming."""
    if TRANS:
        off = o_k[None, :] * V + o_v[:, None]
        m = m_k[None, :] & m_v[:, None]
    else:
        off = o_k[:, None] * V + o_v[None, :]
        m = m_k[:, None] & m_v[None, :]
    b_l = tl.load(local + (c * H + i_h) * K * V + off, mask=m, other=0)
    b_s = tl.load(seg_in + (s * H + i_h) * K * V + off, mask=m, other=0)
    return b_l, b_s


@triton.jit
def _decay_to_chunk(cdec, c, i_h, H, K: tl.constexpr, o_k, m_k, GATE: tl.constexpr):
    """exp2 of the log2 decay between the segment boundary and chunk c: 1 (GATE 0), a scalar
    (GATE 1) or one value per key [BK] (GATE 2)."""
    if GATE == 1:
        return tl.exp2(tl.load(cdec + c * H + i_h))
    elif GATE == 2:
        return tl.exp2(tl.load(cdec + (c * H + i_h) * K + o_k, mask=m_k, other=0))
    else:
        return 1.0


@triton.jit
def _chunk_matrix(x, t0, o_t, m_t, i_h, H, C: tl.constexpr, TRANS: tl.constexpr):
    """A [rows, H, C] per-chunk matrix (A, dA) of one chunk: [C, C], or its transpose if TRANS."""
    if TRANS:
        off = o_t[None, :] * (H * C) + o_t[:, None]
    else:
        off = o_t[:, None] * (H * C) + o_t[None, :]
    return tl.load(x + (t0 * H + i_h) * C + off, mask=m_t[:, None] & m_t[None, :], other=0)


@triton.jit
def _blocks(t0, n, i_h, H, K: tl.constexpr, o_k, m_k, NB: tl.constexpr, BC: tl.constexpr):
    """Offsets and mask of a chunk's rows, columns o_k, as [NB, BC, BK] (block, row in the block,
    key): the pairs inside a block are formed for every block at once."""
    rows = tl.arange(0, NB)[:, None] * BC + tl.arange(0, BC)[None, :]
    off = (t0 * H + i_h) * K + (rows[:, :, None] * (H * K) + o_k[None, None, :])
    return off, (rows < n)[:, :, None] & m_k[None, None, :]


@triton.jit
def _blocks_t(t0, n, i_h, H, K: tl.constexpr, o_k, m_k, NB: tl.constexpr, BC: tl.constexpr):
    """The same, transposed: [BK, NB, BC]."""
    rows = tl.arange(0, NB)[:, None] * BC + tl.arange(0, BC)[None, :]
    off = (t0 * H + i_h) * K + (rows[None, :, :] * (H * K) + o_k[:, None, None])
    return off, (rows < n)[None, :, :] & m_k[:, None, None]


@triton.jit
def _block_row(t0, n, i_h, H, K: tl.constexpr, o_k, m_k, NB: tl.constexpr, BC: tl.constexpr, l):
    """Offsets and mask of row l of every block, columns o_k: [NB, BK]."""
    p = tl.arange(0, NB) * BC + l
    return (t0 * H + i_h) * K + (p[:, None] * (H * K) + o_k[None, :]), (p < n)[:, None] & m_k[None, :]


# ----------------------------------------------------------------------------------------------
# state pass and scan

@triton.jit
def _state_pass_kernel(x, y, g, states, seg_state, seg_decay, chunk_decay,
                       chunk_start, chunk_end, seg_first, seg_count, scale, H,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       C: tl.constexpr, GATE: tl.constexpr, REVERSE: tl.constexpr, STORE: tl.constexpr,
                       DOT: tl.constexpr):
    """Forward (x=k, y=v): S <- D S + (x * exp2(G_last - G))^T y, storing S before each chunk.
    REVERSE (x=q, y=do, chunks last to first): dS <- D dS + scale (x * exp2(G))^T y, storing dS
    after each chunk. Started from zero at the segment boundary; also stores the segment's local
    result, its total log2 decay, and each stored state's log2 decay to the segment boundary."""
    i_kv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_t = tl.arange(0, C)
    c_first = tl.load(seg_first + i_s).to(tl.int64)
    n_c = tl.load(seg_count + i_s)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    b_acc = tl.zeros([BK], dtype=tl.float32)  # log2 decay from the boundary (one value for GATE 1)
    s_out = scale if GATE == 0 else 1.0  # without a gate the scale is applied on the way out
    for step in range(0, n_c):
        if REVERSE:
            c = c_first + (n_c - 1 - step)
        else:
            c = c_first + step
        t0 = tl.load(chunk_start + c)
        m_t = o_t < tl.load(chunk_end + c) - t0
        t0 = t0.to(tl.int64)
        if STORE:
            p = states + (c * H + i_h) * K * V + (o_k[:, None] * V + o_v[None, :])
            tl.store(p, (b_S * s_out).to(states.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
            if GATE == 1:
                if i_kv == 0:
                    tl.store(chunk_decay + c * H + i_h, tl.max(b_acc, 0))
            elif GATE == 2:
                if i_v == 0:
                    tl.store(chunk_decay + (c * H + i_h) * K + o_k, b_acc, mask=m_k)
        b_xt = _tile_t(x, t0, o_t, m_t, i_h, H, K, o_k, m_k)
        b_y = _tile(y, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        # the decay goes into the product's accumulator and the scale into x's weights
        if GATE == 0:
            b_S = tl.dot(b_xt, b_y, b_S, input_precision=DOT)
        elif GATE == 1:
            b_G, b_Gl = _gate_scalar(g, t0, o_t, m_t, i_h, H)
            if REVERSE:
                b_w = tl.exp2(b_G) * scale
            else:
                b_w = tl.exp2(b_Gl - b_G)
            b_xw = (b_xt * b_w[None, :]).to(b_xt.dtype)
            b_S = tl.dot(b_xw, b_y, b_S * tl.exp2(b_Gl), input_precision=DOT)
            b_acc += b_Gl
        else:
            b_Gt = _gate_key_t(g, t0, o_t, m_t, i_h, H, K, o_k, m_k)
            b_Gl = tl.sum(tl.where(o_t[None, :] == C - 1, b_Gt, 0.0), 1)
            if REVERSE:
                b_w = tl.exp2(b_Gt) * scale
            else:
                b_w = tl.exp2(b_Gl[:, None] - b_Gt)
            b_xw = (b_xt * b_w).to(b_xt.dtype)
            b_S = tl.dot(b_xw, b_y, b_S * tl.exp2(b_Gl)[:, None], input_precision=DOT)
            b_acc += b_Gl
    p = seg_state + (i_s * H + i_h) * K * V + (o_k[:, None] * V + o_v[None, :])
    tl.store(p, b_S * s_out, mask=m_k[:, None] & m_v[None, :])
    if GATE == 1:
        if i_kv == 0:
            tl.store(seg_decay + i_s * H + i_h, tl.max(b_acc, 0))
    elif GATE == 2:
        if i_v == 0:
            tl.store(seg_decay + (i_s * H + i_h) * K + o_k, b_acc, mask=m_k)


@triton.jit
def _scan_kernel(seg_state, seg_decay, h0, seg_in, h_out, seq_first, seq_count, H,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 GATE: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr, STORE_IN: tl.constexpr):
    """Per sequence: carry <- D_s carry + local_s over its segments (last to first if REVERSE),
    storing the carry entering each segment; starts from h0 and ends in h_out."""
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    off = o_k[:, None] * V + o_v[None, :]
    m = m_k[:, None] & m_v[None, :]
    s_first = tl.load(seq_first + i_n).to(tl.int64)
    n_s = tl.load(seq_count + i_n)
    if HAS_H0:
        b_c = tl.load(h0 + (i_n * H + i_h) * K * V + off, mask=m, other=0).to(tl.float32)
    else:
        b_c = tl.zeros([BK, BV], dtype=tl.float32)
    for step in range(0, n_s):
        if REVERSE:
            s = s_first + (n_s - 1 - step)
        else:
            s = s_first + step
        if STORE_IN:
            tl.store(seg_in + (s * H + i_h) * K * V + off, b_c.to(seg_in.dtype.element_ty), mask=m)
        if GATE == 1:
            b_c = b_c * tl.exp2(tl.load(seg_decay + s * H + i_h))
        elif GATE == 2:
            b_c = b_c * tl.exp2(tl.load(seg_decay + (s * H + i_h) * K + o_k, mask=m_k, other=0))[:, None]
        b_c += tl.load(seg_state + (s * H + i_h) * K * V + off, mask=m, other=0)
    tl.store(h_out + (i_n * H + i_h) * K * V + off, b_c, mask=m)


# ----------------------------------------------------------------------------------------------
# per-key gates: the intra-chunk matrices

@triton.jit
def _gla_intra_kernel(q, k, g, v, do, A, dA, Gs, chunk_start, chunk_end, chunk_seg, H,
                      K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                      BC: tl.constexpr, FORM_A: tl.constexpr, BACKWARD: tl.constexpr,
                      DOT: tl.constexpr):
    """One chunk and head. FORM_A: A_ij = sum_k q_ik k_jk exp2(G_ik - G_jk) for j <= i (0 elsewhere),
    fp32, unscaled. BACKWARD: dA_ij = do_i . v_j for j <= i and the cumulative log2 gate G (a
    backward that kept the forward's A runs without FORM_A)."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    NB: tl.constexpr = C // BC
    o_t = tl.arange(0, C)
    t0, n_t, _ = _chunk(chunk_start, chunk_end, chunk_seg, i_c)
    m_t = o_t < n_t
    dt = q.dtype.element_ty
    if BACKWARD:
        for i_k in range(NK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_G = _gate_key(g, t0, o_t, m_t, i_h, H, K, o_k, m_k)[0]
            tl.store(Gs + (t0 * H + i_h) * K + (o_t[:, None] * (H * K) + o_k[None, :]), b_G,
                     mask=m_t[:, None] & m_k[None, :])
    if FORM_A:
        # everything through within-block cumulative gates W (rows past the end add g = 0) and
        # block totals T: for i in block b and j in an earlier block c,
        #   exp2(G_i - G_j) = exp2(W_i) exp2(T_{c+1} + ... + T_{b-1}) exp2(T_c - W_j),
        # every factor <= 1, so the pairs in different blocks are tensor-core products of bf16
        # operands with one exp2 per element on each side
        o_l = tl.arange(0, BC)
        o_b = tl.arange(0, NB)
        b_A = tl.zeros([C, C], dtype=tl.float32)
        b_Ad = tl.zeros([NB, BC, BC], dtype=tl.float32)
        for i_k in range(NK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            off3, m3 = _blocks(t0, n_t, i_h, H, K, o_k, m_k, NB, BC)
            b_q3 = tl.load(q + off3, mask=m3, other=0).to(tl.float32)
            b_W3 = tl.cumsum(tl.load(g + off3, mask=m3, other=0).to(tl.float32) * LOG2E, 1)
            off3t, m3t = _blocks_t(t0, n_t, i_h, H, K, o_k, m_k, NB, BC)
            b_gt3 = tl.load(g + off3t, mask=m3t, other=0).to(tl.float32) * LOG2E
            b_Tt = tl.sum(b_gt3, 2)  # [BK, NB]
            b_kt3 = tl.load(k + off3t, mask=m3t, other=0).to(tl.float32) * tl.exp2(b_Tt[:, :, None] - tl.cumsum(b_gt3, 2))
            b_qh = tl.reshape(b_q3 * tl.exp2(b_W3), [C, BK]).to(dt)
            for b in tl.static_range(1, NB):
                # column block c < b scaled by exp2(T_{c+1} + ... + T_{b-1}); c >= b zero
                between = (o_b[:, None] > o_b[None, :]) & (o_b[:, None] < b)  # [m, c]: c < m < b
                b_S = tl.sum(tl.where(between[None, :, :], b_Tt[:, :, None], 0.0), 1)  # [BK, NB(c)]
                b_F = tl.where(o_b[None, :] < b, tl.exp2(b_S), 0.0)
                b_kb = tl.reshape(b_kt3 * b_F[:, :, None], [BK, C]).to(dt)
                in_b = (o_t >= b * BC) & (o_t < b * BC + BC)
                b_A = tl.dot(tl.where(in_b[:, None], b_qh, 0.0).to(dt), b_kb, b_A, input_precision=DOT)
            # pairs inside a block: step j forms column j of every diagonal block from row j of
            # each block ([NB, BK] loads) against all rows ([NB, BC, BK] in registers)
            b_Wj = tl.zeros([NB, BK], dtype=tl.float32)
            for j in range(BC):
                off_j, m_j = _block_row(t0, n_t, i_h, H, K, o_k, m_k, NB, BC, j)
                b_kj = tl.load(k + off_j, mask=m_j, other=0).to(tl.float32)
                b_Wj += tl.load(g + off_j, mask=m_j, other=0).to(tl.float32) * LOG2E
                b_e = tl.exp2(tl.where((o_l >= j)[None, :, None], b_W3 - b_Wj[:, None, :], float("-inf")))
                b_col = tl.sum(b_q3 * b_kj[:, None, :] * b_e, 2)
                b_Ad += tl.where(o_l[None, None, :] == j, b_col[:, :, None], 0.0)
        base = A + (t0 * H + i_h) * C
        # b_A is zero in and above the diagonal blocks, which are stored from b_Ad
        other_block = (o_t[:, None] // BC) != (o_t[None, :] // BC)
        tl.store(base + (o_t[:, None] * (H * C) + o_t[None, :]), b_A, mask=m_t[:, None] & other_block)
        first = o_b[:, None, None] * BC  # each diagonal block's first row and column
        rows = first + o_l[None, :, None]
        tl.store(base + (rows * (H * C) + first + o_l[None, None, :]), b_Ad, mask=rows < n_t)
    if BACKWARD:
        b_dA = tl.zeros([C, C], dtype=tl.float32)
        # not software-pipelined: on Hopper, Triton 3.6's pipelined version (async copies into two
        # buffers and async wgmma) gave wrong dA once the loop reuses its buffers (V > 2 BV)
        NV: tl.constexpr = (V + BV - 1) // BV
        for i_v in tl.range(0, NV, num_stages=1):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            b_do = _tile(do, t0, o_t, m_t, i_h, H, V, o_v, m_v)
            b_vt = _tile_t(v, t0, o_t, m_t, i_h, H, V, o_v, m_v)
            b_dA = tl.dot(b_do, b_vt, b_dA, input_precision=DOT)
        b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA, 0.0)
        tl.store(dA + (t0 * H + i_h) * C + (o_t[:, None] * (H * C) + o_t[None, :]), b_dA, mask=m_t[:, None])


# ----------------------------------------------------------------------------------------------
# chunk-parallel passes

@triton.jit
def _apply_kernel(x, y, z, g, A, states, cdec, seg_in, out, chunk_start, chunk_end, chunk_seg, scale, H,
                  K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                  GATE: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr):
    """Outputs of one chunk, head and V tile from its state and its intra-chunk products:
    forward (x=q, y=k, z=v, states h):     o  = scale ((q * exp2(G)) h + sum_{j<=i} A_ij v_j)
    REVERSE (x=k, y=q, z=do, states dh):   dv = (k * exp2(G_l - G)) dh + scale sum_{i>=j} A_ij do_i
    with A_ij = sum_k q_ik k_jk exp2(G_ik - G_jk) and a state = local + decay * incoming. Scalar
    gates form A here from x and y; per-key gates read it from A (`_gla_intra_kernel`)."""
    i_c, i_v, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    NK: tl.constexpr = (K + BK - 1) // BK
    o_t = tl.arange(0, C)
    t0, n_t, s = _chunk(chunk_start, chunk_end, chunk_seg, i_c)
    m_t = o_t < n_t
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    dt = x.dtype.element_ty
    if REVERSE:
        keep = o_t[:, None] <= o_t[None, :]  # A^T: row j, column i >= j
    else:
        keep = o_t[:, None] >= o_t[None, :]
    b_o = tl.zeros([C, BV], dtype=tl.float32)
    b_os = tl.zeros([C, BV], dtype=tl.float32)  # x times the incoming state (scalar gates)
    b_A = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_x = _tile(x, t0, o_t, m_t, i_h, H, K, o_k, m_k)
        if GATE < 2:
            b_yt = _tile_t(y, t0, o_t, m_t, i_h, H, K, o_k, m_k)
        b_h, b_s = _state_tiles(states, seg_in, i_c, s, i_h, H, K, V, o_k, m_k, o_v, m_v, False)
        if GATE < 2:
            # the scalar gate factors out of the products: applied once after the loop
            b_o = tl.dot(b_x, b_h.to(dt), b_o, input_precision=DOT)
            b_os = tl.dot(b_x, b_s.to(dt), b_os, input_precision=DOT)
            b_A = tl.dot(b_x, b_yt, b_A, input_precision=DOT)
        else:
            b_Gx, b_Gl = _gate_key(g, t0, o_t, m_t, i_h, H, K, o_k, m_k)
            if REVERSE:
                b_xw = b_x * tl.exp2(b_Gl[None, :] - b_Gx)
            else:
                b_xw = b_x * tl.exp2(b_Gx)
            # the true state, formed once in fp32: one product instead of two
            b_d = _decay_to_chunk(cdec, i_c, i_h, H, K, o_k, m_k, GATE)
            b_h = b_h.to(tl.float32) + b_d[:, None] * b_s.to(tl.float32)
            b_o = tl.dot(b_xw.to(dt), b_h.to(dt), b_o, input_precision=DOT)
    b_z = _tile(z, t0, o_t, m_t, i_h, H, V, o_v, m_v)
    if GATE == 0:
        b_o += b_os
        b_A = tl.where(keep, b_A, 0.0)
    elif GATE == 1:
        b_G, b_Gl = _gate_scalar(g, t0, o_t, m_t, i_h, H)
        b_d = _decay_to_chunk(cdec, i_c, i_h, H, K, o_t, m_t, GATE)
        if REVERSE:
            b_o = (b_o + b_d * b_os) * tl.exp2(b_Gl - b_G)[:, None]
            b_A = b_A * tl.exp2(tl.where(keep, b_G[None, :] - b_G[:, None], float("-inf")))
        else:
            b_o = (b_o + b_d * b_os) * tl.exp2(b_G)[:, None]
            b_A = b_A * tl.exp2(tl.where(keep, b_G[:, None] - b_G[None, :], float("-inf")))
    else:
        b_A = _chunk_matrix(A, t0, o_t, m_t, i_h, H, C, REVERSE)
    if REVERSE:
        b_o = tl.dot((b_A * scale).to(dt), b_z, b_o, input_precision=DOT)
    else:
        b_o = tl.dot(b_A.to(dt), b_z, b_o, input_precision=DOT) * scale
    tl.store(out + (t0 * H + i_h) * V + (o_t[:, None] * (H * V) + o_v[None, :]), b_o.to(out.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _bwd_dqk_kernel(q, k, v, g, do, states, cdec_f, seg_in, dstates, cdec_r, seg_dout, dA_mem, G_mem, dq, dk, dg,
                    chunk_start, chunk_end, chunk_seg, scale, H, T_all,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                    BC: tl.constexpr, GATE: tl.constexpr, DOT: tl.constexpr):
    """dq, dk (and dg) of one chunk, head and K tile.
    dq_i = scale exp2(G_i) (h do_i) + sum_{j<=i} dA_ij exp2(G_i - G_j) k_j
    dk_j = exp2(G_l - G_j) (dh v_j) + sum_{i>=j} dA_ij exp2(G_i - G_j) q_i,   dA = scale do v^T.
    Per-key gates read do v^T and G from dA_mem and G_mem (`_gla_intra_kernel`)."""
    i_c, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    NB: tl.constexpr = C // BC
    o_t = tl.arange(0, C)
    t0, n_t, s = _chunk(chunk_start, chunk_end, chunk_seg, i_c)
    m_t = o_t < n_t
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    dt = q.dtype.element_ty
    b_q = _tile(q, t0, o_t, m_t, i_h, H, K, o_k, m_k)
    b_k = _tile(k, t0, o_t, m_t, i_h, H, K, o_k, m_k)
    b_a = _decay_to_chunk(cdec_f, i_c, i_h, H, K, o_k, m_k, GATE)  # true h = local + b_a * incoming
    b_b = _decay_to_chunk(cdec_r, i_c, i_h, H, K, o_k, m_k, GATE)  # true dh likewise
    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    b_dqs = tl.zeros([C, BK], dtype=tl.float32)
    b_dk = tl.zeros([C, BK], dtype=tl.float32)
    b_dks = tl.zeros([C, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    b_dA = tl.zeros([C, C], dtype=tl.float32)
    b_dAt = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = _tile(do, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        b_v = _tile(v, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        if GATE < 2:
            b_dot = _tile_t(do, t0, o_t, m_t, i_h, H, V, o_v, m_v)
            b_vt = _tile_t(v, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        b_hl, b_hs = _state_tiles(states, seg_in, i_c, s, i_h, H, K, V, o_k, m_k, o_v, m_v, True)
        b_dhl, b_dhs = _state_tiles(dstates, seg_dout, i_c, s, i_h, H, K, V, o_k, m_k, o_v, m_v, True)
        b_dq = tl.dot(b_do, b_hl.to(dt), b_dq, input_precision=DOT)
        b_dqs = tl.dot(b_do, b_hs.to(dt), b_dqs, input_precision=DOT)
        b_dk = tl.dot(b_v, b_dhl.to(dt), b_dk, input_precision=DOT)
        b_dks = tl.dot(b_v, b_dhs.to(dt), b_dks, input_precision=DOT)
        if GATE < 2:
            b_dA = tl.dot(b_do, b_vt, b_dA, input_precision=DOT)
            b_dAt = tl.dot(b_v, b_dot, b_dAt, input_precision=DOT)
        if GATE == 1:
            b_hdh += tl.sum((b_hl.to(tl.float32) + b_a * b_hs.to(tl.float32)) *
                            (b_dhl.to(tl.float32) + b_b * b_dhs.to(tl.float32)), 0)
        elif GATE == 2:
            b_hdh += tl.sum((b_hl.to(tl.float32) + b_a[None, :] * b_hs.to(tl.float32)) *
                            (b_dhl.to(tl.float32) + b_b[None, :] * b_dhs.to(tl.float32)), 0)
    if GATE == 2:
        b_dq += b_dqs * b_a[None, :]
        b_dk += b_dks * b_b[None, :]
        b_dA = _chunk_matrix(dA_mem, t0, o_t, m_t, i_h, H, C, False)
        b_dAt = _chunk_matrix(dA_mem, t0, o_t, m_t, i_h, H, C, True)
    else:
        b_dq += b_dqs * b_a
        b_dk += b_dks * b_b
    b_dA = b_dA * scale
    b_dAt = b_dAt * scale
    causal = o_t[:, None] >= o_t[None, :]
    upper = o_t[:, None] <= o_t[None, :]  # dA^T[j, i] lives at j <= i
    if GATE == 0:
        b_dq = b_dq * scale
        b_dq = tl.dot(tl.where(causal, b_dA, 0.0).to(dt), b_k, b_dq, input_precision=DOT)
        b_dk = tl.dot(tl.where(upper, b_dAt, 0.0).to(dt), b_q, b_dk, input_precision=DOT)
    elif GATE == 1:
        b_G, b_Gl = _gate_scalar(g, t0, o_t, m_t, i_h, H)
        b_dq = b_dq * (scale * tl.exp2(b_G))[:, None]
        b_dk = b_dk * tl.exp2(b_Gl - b_G)[:, None]
        b_bnd = tl.exp2(b_Gl) * b_hdh + tl.sum(b_k.to(tl.float32) * b_dk, 0)
        b_M = tl.exp2(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        b_Mt = tl.exp2(tl.where(upper, b_G[None, :] - b_G[:, None], float("-inf")))
        b_dq = tl.dot((b_dA * b_M).to(dt), b_k, b_dq, input_precision=DOT)
        b_dk = tl.dot((b_dAt * b_Mt).to(dt), b_q, b_dk, input_precision=DOT)
    else:
        # G as the intra kernel stored it: the in-block pairs below gather it by row
        g_base = G_mem + (t0 * H + i_h) * K
        b_Gl = tl.load(g_base + (n_t - 1) * (H * K) + o_k, mask=m_k, other=0)
        b_Gq = tl.load(g_base + (o_t[:, None] * (H * K) + o_k[None, :]), mask=m_t[:, None] & m_k[None, :], other=0)
        b_Gq = tl.where(m_t[:, None], b_Gq, b_Gl[None, :])  # rows past the end keep G_l: no exponent > 0
        b_dq = b_dq * scale * tl.exp2(b_Gq)
        b_dk = b_dk * tl.exp2(b_Gl[None, :] - b_Gq)
        b_bnd = tl.exp2(b_Gl) * b_hdh + tl.sum(b_k.to(tl.float32) * b_dk, 0)
        # pairs in different blocks: for i in block b and j in an earlier block c, with E_c = G at
        # the end of block c (rows past the end keep G_l),
        #   exp2(G_i - G_j) = exp2(G_i - E_{b-1}) exp2(E_{b-1} - E_c) exp2(E_c - G_j),
        # every factor <= 1: one exp2 per element on each side, the middle one per key
        o_blk = o_t // BC
        end_own = tl.minimum(o_blk * BC + BC - 1, n_t - 1)
        end_prev = tl.minimum(o_blk * BC - 1, n_t - 1)
        b_Eown = tl.load(g_base + (end_own[:, None] * (H * K) + o_k[None, :]), mask=m_k[None, :], other=0)
        b_Eprev = tl.load(g_base + (end_prev[:, None] * (H * K) + o_k[None, :]),
                          mask=(end_prev >= 0)[:, None] & m_k[None, :], other=0)
        e_q = tl.exp2(b_Gq - b_Eprev)
        e_k = tl.exp2(b_Eown - b_Gq)
        b_kh = b_k * e_k
        b_qh = b_q * e_q
        b_dAb = b_dA.to(dt)
        b_dAtb = b_dAt.to(dt)
        b_dqo = tl.zeros([C, BK], dtype=tl.float32)
        b_dko = tl.zeros([C, BK], dtype=tl.float32)
        for b in tl.static_range(1, NB):
            b_Eb = tl.load(g_base + tl.minimum(b * BC - 1, n_t - 1) * (H * K) + o_k, mask=m_k, other=0)
            b_F = tl.zeros([C, BK], dtype=tl.float32)  # exp2(E_{b-1} - E_c) on the rows of block c < b
            for c in tl.static_range(0, b):
                b_Ec = tl.load(g_base + tl.minimum(c * BC + BC - 1, n_t - 1) * (H * K) + o_k, mask=m_k, other=0)
                b_F = tl.where((o_blk == c)[:, None], tl.exp2(b_Eb - b_Ec)[None, :], b_F)
            in_b = (o_blk == b)[:, None]
            b_dqo += tl.where(in_b, tl.dot(b_dAb, (b_kh * b_F).to(dt), input_precision=DOT), 0.0)
            b_dko += b_F * tl.dot(b_dAtb, tl.where(in_b, b_qh, 0.0).to(dt), input_precision=DOT)
        b_dq += e_q * b_dqo
        b_dk += e_k * b_dko
        # pairs inside a block, every block at once ([NB, BC, BK]): step l pairs each row i with row
        # l of its block (loaded as [NB, BK]): l <= i makes l the earlier token (a dq_i term), l >= i
        # the later one (a dk_i term); one exp2 serves both as the exponent is G_later - G_earlier
        o_l = tl.arange(0, BC)
        rows = tl.arange(0, NB)[:, None] * BC + o_l[None, :]
        in_t = rows < n_t
        off3, m3 = _blocks(t0, n_t, i_h, H, K, o_k, m_k, NB, BC)
        b_G3 = tl.load(G_mem + off3, mask=m3, other=0)
        b_G3 = tl.where(in_t[:, :, None], b_G3, b_Gl[None, None, :])  # as b_Gq: no exponent > 0
        b_dq3 = tl.zeros([NB, BC, BK], dtype=tl.float32)
        b_dk3 = tl.zeros([NB, BC, BK], dtype=tl.float32)
        a_base = dA_mem + (t0 * H + i_h) * C
        for l in range(BC):
            off_l, m_l = _block_row(t0, n_t, i_h, H, K, o_k, m_k, NB, BC, l)
            p = rows - o_l[None, :] + l  # row l of each row's block
            ok_q = in_t & (o_l[None, :] >= l)  # every such p is in the chunk
            ok_k = in_t & (o_l[None, :] <= l) & (p < n_t)
            b_kl = tl.load(k + off_l, mask=m_l, other=0).to(tl.float32)
            b_ql = tl.load(q + off_l, mask=m_l, other=0).to(tl.float32)
            b_Gp = tl.load(G_mem + off_l, mask=m_l, other=0)
            b_da = tl.load(a_base + (rows * (H * C) + p), mask=ok_q, other=0) * scale
            b_dat = tl.load(a_base + (p * (H * C) + rows), mask=ok_k, other=0) * scale
            b_e = tl.where(ok_q[:, :, None], b_G3 - b_Gp[:, None, :],
                           tl.where(ok_k[:, :, None], b_Gp[:, None, :] - b_G3, float("-inf")))
            b_e = tl.exp2(b_e)
            b_dq3 += b_da[:, :, None] * b_e * b_kl[:, None, :]
            b_dk3 += b_dat[:, :, None] * b_e * b_ql[:, None, :]
        b_dq += tl.reshape(b_dq3, [C, BK])
        b_dk += tl.reshape(b_dk3, [C, BK])
    m = m_t[:, None] & m_k[None, :]
    off = (t0 * H + i_h) * K
    tl.store(dq + off + (o_t[:, None] * (H * K) + o_k[None, :]), b_dq.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + off + (o_t[:, None] * (H * K) + o_k[None, :]), b_dk.to(dk.dtype.element_ty), mask=m)
    if GATE > 0:
        b_dG = b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk
        if GATE == 1:
            b_dG = tl.sum(b_dG, 1)
            b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG + tl.sum(b_bnd, 0)
            tl.store(dg + (i_k * T_all + t0) * H + i_h + o_t * H, b_dg, mask=m_t)
        else:
            b_dg = tl.sum(b_dG, 0)[None, :] - tl.cumsum(b_dG, 0) + b_dG + b_bnd[None, :]
            tl.store(dg + off + (o_t[:, None] * (H * K) + o_k[None, :]), b_dg.to(dg.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# launchers

class _Setup:
    """Shapes, tile sizes and the chunk/segment plan of one call."""

    def __init__(self, call: Call, segment_chunks: int | None):
        check_supported(call)
        self.q, self.k, self.v = (x.contiguous() for x in (call.q, call.k, call.v))
        self.g = call.g.contiguous() if call.g is not None else None
        self.gate = 0 if call.g is None else (1 if call.g.dim() == 3 else 2)
        self.scale = call.scale
        B, T, self.H, self.K = self.q.shape
        self.V = self.v.shape[-1]
        self.rows = B * T
        self.dev = self.q.device
        self.dot = dot_precision(self.q.dtype)
        # bf16 states hold what the bf16 matrix products use anyway; fp16 would overflow
        self.state_dtype = torch.bfloat16 if self.q.dtype == torch.bfloat16 else torch.float32
        self.bk, self.bv, self.launch = self.tiles("state")
        self.segment_chunks, self.plan = _chunking(call.boundaries(), self.H, self.K, self.V, self.gate, self.dev,
                                                   segment_chunks)

    def tiles(self, kernel: str) -> tuple[int, int, dict]:
        """(BK, BV, launch options) of a kernel for this call."""
        return _tiles(kernel, self.gate, self.K, self.V, self.state_dtype == torch.float32)

    def empty(self, *shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=self.dev)

    def decay_shape(self, n):
        return (n, self.H) if self.gate == 1 else (n, self.H, self.K)

    def state_pass(self, x, y, reverse: bool, store: bool):
        """(states per chunk, their log2 decays to the segment boundary, segment-local states,
        segment log2 decays); the first two only if store."""
        p, H, K, V = self.plan, self.H, self.K, self.V
        states = self.empty(p.n_chunks, H, K, V, dtype=self.state_dtype) if store else self.empty(1)
        cdec = self.empty(*self.decay_shape(p.n_chunks)) if store and self.gate else self.empty(1)
        seg_state = self.empty(p.n_segs, H, K, V)
        seg_dec = self.empty(*self.decay_shape(p.n_segs)) if self.gate else self.empty(1)
        grid = (cdiv(K, self.bk) * cdiv(V, self.bv), p.n_segs, H)
        _state_pass_kernel[grid](
            x, y, self.g if self.g is not None else x, states, seg_state, seg_dec, cdec,
            p.chunk_start, p.chunk_end, p.seg_first, p.seg_count, self.scale if reverse else 1.0, H,
            K=K, V=V, BK=self.bk, BV=self.bv, C=CHUNK, GATE=self.gate, REVERSE=reverse, STORE=store,
            DOT=self.dot, **self.launch)
        return states, cdec, seg_state, seg_dec

    def scan(self, seg_state, seg_dec, start, reverse: bool, store_in: bool):
        """(state entering every segment in the scan's direction, or None; the carry at the end)."""
        p, H, K, V = self.plan, self.H, self.K, self.V
        # stored like the chunk states: the kernels use the two together in matrix products
        seg_in = self.empty(p.n_segs, H, K, V, dtype=self.state_dtype) if store_in else self.empty(1)
        out = self.empty(p.n_seqs, H, K, V)
        start = start.to(torch.float32).contiguous() if start is not None else None
        grid = (cdiv(K, self.bk) * cdiv(V, self.bv), p.n_seqs, H)
        _scan_kernel[grid](
            seg_state, seg_dec, start if start is not None else out, seg_in, out, p.seq_first, p.seq_count, H,
            K=K, V=V, BK=self.bk, BV=self.bv, GATE=self.gate, REVERSE=reverse, HAS_H0=start is not None,
            STORE_IN=store_in, **self.launch)
        return (seg_in if store_in else None), out

    def states(self, x, y, start, start_late, reverse: bool):
        """Chunk states (forward: x, y = k, v, start = h0) or state gradients (reverse: q, do, dht),
        their decays, every segment's incoming state and the carry at the end (ht or dh0). The
        segment-local pass does not need the start: start_late() is called only after it is queued,
        so an exchange that supplies part of the start overlaps it."""
        states, cdec, seg_state, seg_dec = self.state_pass(x, y, reverse=reverse, store=True)
        seg_in, end = self.scan(seg_state, seg_dec, plus_late(start, start_late), reverse=reverse, store_in=True)
        return states, cdec, seg_in, end

    def apply(self, x, y, z, states, cdec, seg_in, reverse: bool, A=None):
        """The output pass (x, y, z = q, k, v) or, reversed, the dv pass (k, q, do); per-key gates
        take the intra-chunk matrix A from `intra`."""
        out = torch.empty_like(z)
        bk, bv, launch = self.tiles("dv" if reverse else "out")
        _apply_kernel[(self.plan.n_chunks, cdiv(self.V, bv), self.H)](
            x, y, z, self.g if self.g is not None else x, A if A is not None else x, states, cdec, seg_in, out,
            *self.chunk_args(), self.scale, self.H, K=self.K, V=self.V, BK=bk, BV=bv, C=CHUNK, GATE=self.gate,
            REVERSE=reverse, DOT=self.dot, **launch)
        return out

    def intra(self, do=None, A=None):
        """Per-key gates: the intra-chunk matrix A [rows, H, C] (fp32, unscaled); given do (backward)
        also dA = do v^T [rows, H, C] and the cumulative log2 gate G [rows, H, K]; an A passed in (the
        forward's) is not formed again."""
        backward = do is not None
        form_a = A is None
        if form_a:
            A = self.empty(self.rows, self.H, CHUNK)
        dA = self.empty(self.rows, self.H, CHUNK) if backward else A
        G = self.empty(self.rows, self.H, self.K) if backward else A
        bk, bv, launch = self.tiles("intra")
        _gla_intra_kernel[(self.plan.n_chunks, self.H)](
            self.q, self.k, self.g, self.v, do if backward else self.v, A, dA, G, *self.chunk_args(), self.H,
            K=self.K, V=self.V, BK=bk, BV=bv, C=CHUNK, BC=BLOCK, FORM_A=form_a,
            BACKWARD=backward, DOT=self.dot, **launch)
        return (A, dA, G) if backward else A

    def chunk_args(self):
        p = self.plan
        return p.chunk_start, p.chunk_end, p.chunk_seg


# what a call's shapes fix, cached: working it out again costs the host more than a launch

@functools.lru_cache(maxsize=256)
def _tiles(kernel: str, gate: int, K: int, V: int, fp32_states: bool) -> tuple[int, int, dict]:
    bk, bv, warps, stages = TILES[kernel][gate]
    if fp32_states:  # (fp16 and fp32 inputs) twice the bytes per state tile: dq/dk at 3 stages would
        stages = min(stages, 2)  # need 250-290 KB of shared memory, sm_90 has 227 KB
    return tile(K, bk), tile(V, bv), {"num_warps": warps, "num_stages": stages}


@functools.lru_cache(maxsize=256)
def _chunking(boundaries: tuple, H: int, K: int, V: int, gate: int, device, segment_chunks: int | None
              ) -> tuple[int, Plan]:
    """(chunks per segment, the chunk/segment plan) of sequences with these token boundaries."""
    bounds = list(zip(boundaries, boundaries[1:]))
    if segment_chunks is None:
        bk, bv, _ = _tiles("state", gate, K, V, False)  # the widths only, which the dtype does not change
        total = sum(cdiv(e - s, CHUNK) for s, e in bounds)
        segment_chunks = default_segment_chunks(total, H * cdiv(K, bk) * cdiv(V, bv), device)
    return segment_chunks, make_plan(bounds, device, CHUNK, segment_chunks)


def tile(d: int, cap: int) -> int:
    """Tile width for a head dimension d: a power of two, at least 16 (the matrix-unit minimum)."""
    return min(max(16, next_power_of_2(d)), cap)


def check_supported(call: Call) -> None:
    from ..variants import InputError

    if call.q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"the Triton kernels take bf16, fp16 or fp32 inputs, got {call.q.dtype}; "
                         "use backend='torch' for float64")
    K, V = call.q.shape[-1], call.v.shape[-1]
    if K > 256 or V > 256:
        raise InputError(f"the Triton kernels support head dimensions up to 256, got K={K}, V={V}; "
                         "use backend='torch' or split the heads")


def _fp16_per_key(call: Call) -> bool:
    """fp16 with per-key gates overflowed to inf in the output/dv pass on an H100 (the fp32 and
    bf16 versions pass the GPU check): such calls run through the fp32 kernels."""
    return call.q.dtype == torch.float16 and call.g is not None and call.g.dim() == 4


def _widened(call: Call) -> Call:
    return replace(call, q=call.q.float(), k=call.k.float(), v=call.v.float(), memo=None)


def _segment_states(st: _Setup, call: Call, key: str, x, y, reverse: bool, keep: bool, tag=None):
    """st.state_pass(x, y) with the chunk states, shared through call.memo: the segment-local pass
    does not depend on the start state, so the SP summary (final_state / state_grad, keep=True) and
    the kernel after it (forward / backward) run it once. Without a memo a state pass alone needs no
    chunk states. fp16 per-key calls are left out: their kernels run on widened copies."""
    memo = None if _fp16_per_key(call) else call.memo
    return reuse(memo, (key, st.segment_chunks), tag, keep,
                 lambda: st.state_pass(x, y, reverse=reverse, store=memo is not None or not keep))


def forward(call: Call, h0, h0_late=None, *, segment_chunks: int | None = None):
    """(o, ht): outputs in v's dtype and the fp32 final state of every sequence."""
    if _fp16_per_key(call):
        o, ht = forward(_widened(call), h0, h0_late, segment_chunks=segment_chunks)
        return o.to(call.v.dtype), ht
    st = _Setup(call, segment_chunks)
    states, cdec, seg_state, seg_dec = _segment_states(st, call, "forward", st.k, st.v, reverse=False, keep=False)
    seg_in, ht = st.scan(seg_state, seg_dec, plus_late(h0, h0_late), reverse=False, store_in=True)
    A = st.intra() if st.gate == 2 else None
    if A is not None:
        hand_over(call.memo, INTRA, A)  # the backward needs it too
    return st.apply(st.q, st.k, st.v, states, cdec, seg_in, reverse=False, A=A), ht


def final_state(call: Call, h0, *, segment_chunks: int | None = None):
    """The final states alone: one pass over k, v (and g), no outputs. With call.memo, the pass
    also stores the chunk states and leaves them for a forward on the same Call."""
    st = _Setup(call, segment_chunks)
    _, _, seg_state, seg_dec = _segment_states(st, call, "forward", st.k, st.v, reverse=False, keep=True)
    return st.scan(seg_state, seg_dec, h0, reverse=False, store_in=False)[1]


def state_grad(call: Call, do, dht, *, segment_chunks: int | None = None):
    """d(initial state) alone: one reverse pass over q, do (and g). With call.memo, the pass also
    stores the chunk state gradients and leaves them for a backward with the same do."""
    st = _Setup(call, segment_chunks)
    do_in, do = do, do.to(st.v.dtype).contiguous()
    _, _, seg_state, seg_dec = _segment_states(st, call, "reverse", st.q, do, reverse=True, keep=True, tag=do_in)
    return st.scan(seg_state, seg_dec, dht, reverse=True, store_in=False)[1]


def backward(call: Call, h0, do, dht, dht_late=None, *, segment_chunks: int | None = None) -> Grads:
    if _fp16_per_key(call):
        gr = backward(_widened(call), h0, do.float(), dht, dht_late, segment_chunks=segment_chunks)
        return replace(gr, dq=gr.dq.to(call.q.dtype), dk=gr.dk.to(call.k.dtype), dv=gr.dv.to(call.v.dtype))
    st = _Setup(call, segment_chunks)
    do_in, do = do, do.to(st.v.dtype).contiguous()
    states, cdec_f, seg_in, _ = st.states(st.k, st.v, h0, None, reverse=False)
    dstates, cdec_r, seg_state, seg_dec = _segment_states(st, call, "reverse", st.q, do, reverse=True, keep=False,
                                                          tag=do_in)
    seg_dout, dh0 = st.scan(seg_state, seg_dec, plus_late(dht, dht_late), reverse=True, store_in=True)
    H, K, V = st.H, st.K, st.V
    gate_arg = st.g if st.g is not None else st.q
    bk, bv, launch = st.tiles("dqk")
    nk = cdiv(K, bk)
    dq, dk = torch.empty_like(st.q), torch.empty_like(st.k)
    if st.gate == 2:
        A, dA, G = st.intra(do, A=take(call.memo, INTRA))  # None: formed again
    else:
        A, dA, G = None, st.q, st.q
    if st.gate == 1:
        dg = st.empty(nk, *st.g.shape)  # partial sums over K tiles
    elif st.gate == 2:
        dg = torch.empty_like(st.g)
    else:
        dg = st.empty(1)
    _bwd_dqk_kernel[(st.plan.n_chunks, nk, H)](
        st.q, st.k, st.v, gate_arg, do, states, cdec_f, seg_in, dstates, cdec_r, seg_dout, dA, G, dq, dk, dg,
        *st.chunk_args(), st.scale, H, st.rows, K=K, V=V, BK=bk, BV=bv, C=CHUNK, BC=BLOCK,
        GATE=st.gate, DOT=st.dot, **launch)
    dv = st.apply(st.k, st.q, do, dstates, cdec_r, seg_dout, reverse=True, A=A)
    if st.gate == 1:
        dg = dg.sum(0).to(st.g.dtype)
    elif st.gate == 0:
        dg = None
    return Grads(dq, dk, dv, dg, None, dh0)
