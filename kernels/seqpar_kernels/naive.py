"""The ground truth: the recurrence token by token, in float64 when given float64.

Slow on purpose and written to be read against the algebra:
    S_t = exp(g_t) S_{t-1}                       (decay; scalar per head or per key channel)
    S_t = S_t + k_t u_t^T,  u_t = v_t            (plain write)
    or    u_t = beta_t (v_t - S_t^T k_t)         (delta rule, after the decay)
    o_t = scale * S_t^T q_t
Gradients come from autograd.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32: the references never run in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def segments(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None):
    """(batch row, start, end, state index) of every independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq_len, b) for b in range(batch)]
    c = cu_seqlens.tolist()
    return [(0, s, e, n) for n, (s, e) in enumerate(zip(c, c[1:]))]


def naive_recurrence(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """q, k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H] | [B,T,H,K] (log decay); beta None | [B,T,H].
    Returns (o [B,T,H,V] in v's dtype, final state [N,H,K,V] in the compute dtype or None)."""
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    outs, finals = [], []
    for b, s, e, n in segments(B, T, cu_seqlens):
        S = (initial_state[n].to(dt) if initial_state is not None
             else q.new_zeros(H, K, V, dtype=dt))
        seq_out = []
        for t in range(s, e):
            qt, kt, vt = q[b, t].to(dt), k[b, t].to(dt), v[b, t].to(dt)
            if g is not None:
                decay = g[b, t].to(dt).exp()
                S = S * (decay[:, None, None] if decay.dim() == 1 else decay[:, :, None])
            if beta is not None:
                vt = beta[b, t].to(dt)[:, None] * (vt - torch.einsum("hkv,hk->hv", S, kt))
            S = S + kt[:, :, None] * vt[:, None, :]
            seq_out.append(scale * torch.einsum("hkv,hk->hv", S, qt))
        outs.append(torch.stack(seq_out, 0))
        finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs, 0)
    else:
        o = torch.cat(outs, 0).unsqueeze(0)
    final = torch.stack(finals, 0) if output_final_state else None
    return o.to(v.dtype), final
