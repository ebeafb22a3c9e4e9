"""Chunkwise-parallel reference in plain PyTorch: exact (float64-capable), differentiable by
autograd, fast enough to train small models on a CPU.

Two algorithms cover the six variants:

* gated (linear_attn, lightning, simple_gla, gla): inside a chunk of C tokens the output is a
  masked, decay-weighted attention; across chunks the state is carried by
      S_next = diag(exp(G_C)) S + (k * exp(G_C - G))^T v
  where G is the within-chunk cumulative log decay. Decay differences are always formed as
  G_i - G_j with j <= i (never exp(-G)), so nothing overflows however strong the decay.
* delta (delta_rule, gated_delta_rule): the WY form. With L_ij = exp(G_i - G_j) k_i.k_j (j < i),
  the chunk's corrected values are U = (I + diag(beta) L)^-1 diag(beta) (V - (K * exp(G)) S),
  split into U_v - W S so that only the cheap part depends on the incoming state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import compute_dtype, segments


def _pad_to_chunks(x: torch.Tensor | None, C: int) -> torch.Tensor | None:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded at the end. Zero padding is inert:
    k = 0 writes nothing, g = 0 decays nothing, beta = 0 leaves the delta state unchanged."""
    if x is None:
        return None
    B, T, H = x.shape[:3]
    N = -(-T // C)
    pad = N * C - T
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if x.dim() > 3 else F.pad(x, (0, 0, 0, pad))
    x = x.reshape(B, N, C, H, *x.shape[3:])
    return x.movedim(3, 1)  # [B, H, N, C, ...]


def _decay_matrix(G: torch.Tensor, strict: bool) -> torch.Tensor:
    """exp(G_i - G_j) on the causal triangle (j <= i, or j < i if strict), 0 elsewhere.
    G: [..., C] cumulative scalar log decay -> [..., C, C]."""
    C = G.shape[-1]
    diff = G[..., :, None] - G[..., None, :]
    mask = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    return diff.masked_fill(~mask, float("-inf")).exp()


def _chunk_gated(q, k, v, g, scale, h0):
    """q, k [B,H,N,C,K]; v [B,H,N,C,V]; g None | [B,H,N,C] | [B,H,N,C,K]; h0 [B,H,K,V] or None."""
    B, H, N, C, K = q.shape
    V = v.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2)  # [B,H,N,C,C]
    if g is None:
        A = scores.masked_fill(~causal, 0.0)
        q_in, k_out, chunk_decay = q, k, None
    elif g.dim() == 4:  # one scalar per token
        G = g.cumsum(-1)
        A = scores * _decay_matrix(G, strict=False)
        q_in = q * G.exp()[..., None]
        k_out = k * (G[..., -1:] - G).exp()[..., None]
        chunk_decay = G[..., -1].exp()[..., None, None]  # [B,H,N,1,1]
    else:  # one decay per key channel: decay differences per channel, [.., C, C, K]
        G = g.cumsum(-2)
        diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        A = torch.einsum("...ik,...jk,...ijk->...ij", q, k, diff.exp())
        q_in = q * G.exp()
        k_out = k * (G[..., -1:, :] - G).exp()
        chunk_decay = G[..., -1, :].exp()[..., None]  # [B,H,N,K,1]
    o_intra = A @ v
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    o_inter = []
    for n in range(N):
        o_inter.append(q_in[:, :, n] @ S)
        S = (S if chunk_decay is None else chunk_decay[:, :, n] * S) + k_out[:, :, n].transpose(-1, -2) @ v[:, :, n]
    return scale * (o_intra + torch.stack(o_inter, 2)), S


def _chunk_delta(q, k, v, beta, g, scale, h0):
    """q, k [B,H,N,C,K]; v [B,H,N,C,V]; beta [B,H,N,C]; g None | [B,H,N,C]; h0 [B,H,K,V] or None."""
    B, H, N, C, K = q.shape
    V = v.shape[-1]
    G = g.cumsum(-1) if g is not None else torch.zeros_like(beta)
    kk = k @ k.transpose(-1, -2)
    lower = kk * _decay_matrix(G, strict=True)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    M = eye + beta[..., :, None] * lower  # unit lower triangular
    b = beta[..., None]
    U_v = torch.linalg.solve_triangular(M, b * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(M, b * k * G.exp()[..., None], upper=False, unitriangular=True)
    A = (q @ k.transpose(-1, -2)) * _decay_matrix(G, strict=False)
    q_in = q * G.exp()[..., None]
    k_out = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for n in range(N):
        u = U_v[:, :, n] - W[:, :, n] @ S
        outs.append(q_in[:, :, n] @ S + A[:, :, n] @ u)
        S = chunk_decay[:, :, n] * S + k_out[:, :, n].transpose(-1, -2) @ u
    return scale * torch.stack(outs, 2), S


def _segment(q, k, v, g, beta, scale, h0, chunk_size):
    """One batch of equal-length sequences [B, T, H, *]; returns o [B, T, H, V] and the final state."""
    T = q.shape[1]
    qc, kc, vc, gc, bc = (_pad_to_chunks(x, chunk_size) for x in (q, k, v, g, beta))
    if beta is None:
        o, ht = _chunk_gated(qc, kc, vc, gc, scale, h0)
    else:
        o, ht = _chunk_delta(qc, kc, vc, bc, gc, scale, h0)
    B, H, N, C, V = o.shape
    return o.movedim(1, 3).reshape(B, N * C, H, V)[:, :T], ht


def default_chunk_size(g: torch.Tensor | None, q: torch.Tensor) -> int:
    # per-key gates materialise [C, C, K] decay tensors: keep their chunks small
    return 16 if g is not None and g.dim() == 4 else 64


def chunk_reference(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size=None):
    """Same arguments and results as naive.naive_recurrence (inputs already checked)."""
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    C = chunk_size or default_chunk_size(g, q)
    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    gd = g.to(dt) if g is not None else None
    bd = beta.to(dt) if beta is not None else None
    h0 = initial_state.to(dt) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _segment(qd, kd, vd, gd, bd, scale, h0, C)
    else:
        outs, finals = [], []
        for _, s, e, n in segments(1, q.shape[1], cu_seqlens):
            part = lambda x: x[:, s:e] if x is not None else None  # noqa: E731
            o_n, h_n = _segment(part(qd), part(kd), part(vd), part(gd), part(bd), scale,
                                h0[n:n + 1] if h0 is not None else None, C)
            outs.append(o_n)
            finals.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(finals, 0)
    return o.to(v.dtype), (ht if output_final_state else None)
