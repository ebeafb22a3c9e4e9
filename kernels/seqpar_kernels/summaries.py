"""Closed forms of the state passes for the gated family (no delta rule).

Within one sequence the transitions are diagonal (a scalar or a per-key decay), so the final
state and the initial-state gradient are each one matrix product per head instead of a chunked
recurrence:
    ht  = exp(G_e) * h0  + sum_t (k_t * exp(G_e - G_t)) v_t^T
    dh0 = exp(G_e) * dht + scale * sum_t (q_t * exp(G_t)) do_t^T
with G the cumulative log decay from the sequence start (inclusive) and e its last token.
The sequence-parallel layer computes these before its collective, so that the exchange overlaps
the main kernel; they cost about as much as reading k, v (or q, do) once.
"""
from __future__ import annotations

import torch

from .naive import compute_dtype, segments


def _cum_log_decay(g: torch.Tensor | None, like: torch.Tensor, dtype) -> torch.Tensor:
    """Cumulative log decay along T of [B, T, H] or [B, T, H, K] gates, as [B, T, H, K or 1].
    Accumulated in float64: over long sequences an fp32 running sum loses the small differences
    G_e - G_t that the decays are made of."""
    if g is None:
        return torch.zeros(*like.shape[:3], 1, dtype=dtype, device=like.device)
    G = g.to(torch.float64).cumsum(1)
    return (G if G.dim() == 4 else G[..., None]).to(dtype)


def _final_state(q, k, v, g, h0, dtype):
    """One batch of equal-length sequences [B, L, H, *]."""
    G = _cum_log_decay(g, k, dtype)
    ht = torch.einsum("bthk,bthv->bhkv", k.to(dtype) * (G[:, -1:] - G).exp(), v.to(dtype))
    if h0 is not None:
        ht = ht + G[:, -1].exp()[..., None] * h0.to(dtype)
    return ht


def _state_grad(q, do, g, dht, scale, dtype):
    G = _cum_log_decay(g, q, dtype)
    dh0 = scale * torch.einsum("bthk,bthv->bhkv", q.to(dtype) * G.exp(), do.to(dtype))
    if dht is not None:
        dh0 = dh0 + G[:, -1].exp()[..., None] * dht.to(dtype)
    return dh0


def _per_sequence(fn, call, tensors, states):
    """Apply fn to every sequence: the whole batch at once, or each packed document in turn."""
    if call.cu_seqlens is None:
        return fn(*tensors, states)
    out = []
    for _, s, e, n in segments(1, call.q.shape[1], call.cu_seqlens):
        part = [t[:, s:e] if t is not None else None for t in tensors]
        out.append(fn(*part, states[n:n + 1] if states is not None else None))
    return torch.cat(out, 0)


def gated_final_state(call, h0) -> torch.Tensor:
    dt = compute_dtype(call.q, call.v, call.g, h0)
    return _per_sequence(lambda q, k, v, g, h: _final_state(q, k, v, g, h, dt),
                         call, (call.q, call.k, call.v, call.g), h0)


def gated_state_grad(call, do, dht) -> torch.Tensor:
    dt = compute_dtype(call.q, call.v, call.g, dht)
    return _per_sequence(lambda q, o, g, d: _state_grad(q, o, g, d, call.scale, dt),
                         call, (call.q, do, call.g), dht)
