"""The linear-attention token mixer, one class for the six variants, following their papers:

| variant          | q, k                              | decay g (log, <= 0)                            | beta          |
|------------------|-----------------------------------|------------------------------------------------|---------------|
| linear_attn      | 1 + elu (Katharopoulos et al.)    | none                                           |               |
| lightning        | SiLU (TransNormerLLM)             | fixed per head, RetNet's log(1 - 2^(-5-h))     |               |
| simple_gla       | as projected                      | logsigmoid(W_g x) / 16, one per head           |               |
| gla              | as projected                      | logsigmoid(W_g x) / 16, one per key channel    |               |
| delta_rule       | L2-normalised per head (DeltaNet) | none                                           | sigmoid(W_b x)|
| gated_delta_rule | L2-normalised per head            | -exp(A_log) softplus(W_a x + dt_bias) (GDN)    | sigmoid(W_b x)|

q, k and v first pass an optional short causal convolution with SiLU (conv_size > 0; its halo
crosses SP ranks, see conv.py); lightning without the convolution applies SiLU itself. The output of
every head is RMS-normalised (which also stands in for linear attention's denominator, as in
TransNormer) and gated by silu(W_o' x), then projected back: o_proj(norm(o) * silu(gate)).

Heads split over TP: every projection into heads is a column projection, o_proj a row projection,
per-head parameters are TP-sharded; nothing is replicated across TP, so no TP gradient sync is needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import seqpar_kernels
from seqpar import sp
from seqpar.parallel import ParallelContext
from seqpar.sp.tokens import cu_list
from seqpar_kernels import get_variant, lightning_decay, wide_dtype

from .conv import ShortConv
from .norm import HeadRMSNorm
from .projections import PLAIN, Projections

GATE_LOGIT_NORMALIZER = 16.0  # GLA's gate temperature: slow decays at initialisation


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class LinearMixer(nn.Module):
    def __init__(self, variant: str, hidden_size: int, num_heads: int, head_dim: int, *,
                 parallel: ParallelContext | None = None, proj: Projections = PLAIN, conv_size: int = 4,
                 init_std: float = 0.02, out_init_std: float | None = None, norm_eps: float = 1e-5):
        super().__init__()
        self.variant = get_variant(variant)
        self.parallel = parallel or ParallelContext()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.heads = proj.local(num_heads, "num_heads")           # this TP rank's heads
        self.head_slice = proj.local_slice(num_heads, "num_heads")
        inner = num_heads * head_dim
        self.q_proj = proj.column(hidden_size, inner, init_std)
        self.k_proj = proj.column(hidden_size, inner, init_std)
        self.v_proj = proj.column(hidden_size, inner, init_std)
        self.conv_size = conv_size
        if conv_size:
            self.q_conv, self.k_conv, self.v_conv = (ShortConv(inner, conv_size, proj, "num_heads x head_dim")
                                                     for _ in range(3))
        name, var = self.variant.name, self.variant
        if name == "simple_gla":
            self.g_proj = proj.column(hidden_size, num_heads, init_std)
        elif name == "gla":
            self.g_proj = proj.column(hidden_size, inner, init_std)
        elif name == "gated_delta_rule":
            self.a_proj = proj.column(hidden_size, num_heads, init_std)
            A = torch.empty(self.heads).uniform_(1, 16)
            dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(1e-1)))
            self.A_log = proj.shard(nn.Parameter(A.log()))
            self.dt_bias = proj.shard(nn.Parameter(dt + torch.log(-torch.expm1(-dt))))  # softplus(dt_bias) = dt
        if var.delta:
            self.b_proj = proj.column(hidden_size, num_heads, init_std)
        self.out_norm = HeadRMSNorm(num_heads, head_dim, norm_eps, proj)
        self.gate_proj = proj.column(hidden_size, inner, init_std)
        self.o_proj = proj.row(inner, hidden_size, out_init_std or init_std)

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """x [B, T_local, hidden] (this rank's tokens in the layout's order); cu_seqlens: global
        document boundaries (B = 1) or None."""
        B, T, _ = x.shape
        par, H, D = self.parallel, self.heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size:
            tokens = sp.local_tokens(T, par.sp_group, par.layout, cu_seqlens, x.device)
            q, k, v = (conv(t, tokens, par.sp_group, par.layout)
                       for conv, t in ((self.q_conv, q), (self.k_conv, k), (self.v_conv, v)))
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        name = self.variant.name
        if name == "linear_attn":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        elif name == "lightning" and not self.conv_size:
            q, k = F.silu(q), F.silu(k)
        elif self.variant.delta:
            q, k = _l2norm(q), _l2norm(k)
        g, beta = self._gates(x, B, T)
        o = self._attend(q, k, v, g, beta, cu_seqlens)
        o = self.out_norm(o) * F.silu(self.gate_proj(x)).view(B, T, H, D)
        return self.o_proj(o.reshape(B, T, H * D))

    def _gates(self, x, B, T):
        wide = wide_dtype(x.dtype)  # decays stay in fp32 under bf16
        name, g, beta = self.variant.name, None, None
        if name == "lightning":
            g = lightning_decay(self.num_heads, device=x.device, dtype=wide)[self.head_slice]
        elif name == "simple_gla":
            g = F.logsigmoid(self.g_proj(x).to(wide)) / GATE_LOGIT_NORMALIZER
        elif name == "gla":
            g = (F.logsigmoid(self.g_proj(x).to(wide)) / GATE_LOGIT_NORMALIZER).view(B, T, self.heads, self.head_dim)
        elif name == "gated_delta_rule":
            g = -self.A_log.to(wide).exp() * F.softplus(self.a_proj(x).to(wide) + self.dt_bias.to(wide))
        if self.variant.delta:
            beta = torch.sigmoid(self.b_proj(x))
        return g, beta

    def _attend(self, q, k, v, g, beta, cu_seqlens):
        par, name = self.parallel, self.variant.name
        if par.sp_size == 1:
            cu = None if cu_seqlens is None else torch.as_tensor(cu_list(cu_seqlens), device=q.device)
            o, _ = seqpar_kernels.chunk(name, q, k, v, g=g, beta=beta, cu_seqlens=cu, backend=par.backend)
            return o
        o, _ = sp.linear_attention(q, k, v, variant=name, g=g, beta=beta, group=par.sp_group,
                                   method=par.linear_method, layout=par.layout,
                                   cu_seqlens=cu_list(cu_seqlens), backend=par.backend,
                                   zeco_slices=par.zeco_slices, validate=par.validate)
        return o
