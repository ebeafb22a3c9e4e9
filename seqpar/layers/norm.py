"""Norms. Block norms are torch.nn.RMSNorm, the very module megatron-core's local layer spec builds,
so the plain and the Megatron model compute the same thing. HeadRMSNorm normalises each head's
output separately (the output norm of the linear-attention layers), with its own weight per head
so that the weight splits over TP with the heads."""
from __future__ import annotations

import torch
from torch import nn

from .projections import PLAIN, Projections

RMSNorm = nn.RMSNorm


class HeadRMSNorm(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5, proj: Projections = PLAIN):
        super().__init__()
        self.eps = eps
        self.weight = proj.shard(nn.Parameter(torch.ones(proj.local(num_heads, "num_heads"), head_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., H_local, D]
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight
