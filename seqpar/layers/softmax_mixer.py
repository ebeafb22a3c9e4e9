"""Softmax attention as a token mixer (Llama style): q, k, v projections with grouped-query
attention (num_kv_heads <= num_heads), RoPE at each token's position in the global sequence
(restarting at every packed document), causal attention over the whole sequence through
seqpar.sp.softmax_attention (all-gather of K/V or ring over the SP group), output projection.
Heads split over TP (query and KV heads both divisible by TP)."""
from __future__ import annotations

import torch
from torch import nn

from seqpar import sp
from seqpar.parallel import ParallelContext
from seqpar.sp.tokens import cu_list

from .projections import PLAIN, Projections
from .rope import apply_rope


class SoftmaxMixer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 parallel: ParallelContext | None = None, proj: Projections = PLAIN, rope_base: float = 10000.0,
                 init_std: float = 0.02, out_init_std: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads} "
                             "(grouped-query attention shares each KV head among a whole group of query heads)")
        self.parallel, self.rope_base, self.head_dim = parallel or ParallelContext(), rope_base, head_dim
        self.heads = proj.local(num_heads, "num_heads")
        self.kv_heads = proj.local(num_kv_heads, "num_kv_heads")
        self.q_proj = proj.column(hidden_size, num_heads * head_dim, init_std)
        self.k_proj = proj.column(hidden_size, num_kv_heads * head_dim, init_std)
        self.v_proj = proj.column(hidden_size, num_kv_heads * head_dim, init_std)
        self.o_proj = proj.row(num_heads * head_dim, hidden_size, out_init_std or init_std)

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        B, T, _ = x.shape
        par, D = self.parallel, self.head_dim
        position = sp.local_tokens(T, par.sp_group, par.layout, cu_seqlens, x.device).position
        q = apply_rope(self.q_proj(x).view(B, T, self.heads, D), position, self.rope_base)
        k = apply_rope(self.k_proj(x).view(B, T, self.kv_heads, D), position, self.rope_base)
        v = self.v_proj(x).view(B, T, self.kv_heads, D)
        o = sp.softmax_attention(q, k, v, group=par.sp_group, method=par.softmax_method, layout=par.layout,
                                 causal=True, cu_seqlens=cu_list(cu_seqlens), validate=par.validate)
        return self.o_proj(o.reshape(B, T, self.heads * D))
