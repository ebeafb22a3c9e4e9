"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate and up split over TP by channel, down sums.

At long sequences its [T, ffn] intermediates are the largest tensors of a block (three of them,
and their gradients: ~30 GiB at 512K tokens for the 1.3B models), so `token_chunk` computes it
`token_chunk` tokens at a time, each chunk checkpointed on its own: only the chunk's input is kept
and its intermediates exist for one chunk at a time, in forward and in backward. Tokens are
independent in an MLP, so the result is the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .projections import PLAIN, Projections


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, proj: Projections = PLAIN, init_std: float = 0.02,
                 out_init_std: float | None = None):
        super().__init__()
        proj.local(ffn_hidden_size, "ffn_hidden_size")
        self.gate_proj = proj.column(hidden_size, ffn_hidden_size, init_std)
        self.up_proj = proj.column(hidden_size, ffn_hidden_size, init_std)
        self.down_proj = proj.row(ffn_hidden_size, hidden_size, out_init_std or init_std)
        self.token_chunk = 0  # tokens per chunk along dim 1 (0: all at once)

    def _ffn(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x):
        n = self.token_chunk
        if not n or x.shape[1] <= n:
            return self._ffn(x)
        if not torch.is_grad_enabled():
            return torch.cat([self._ffn(c) for c in x.split(n, dim=1)], dim=1)
        return torch.cat([checkpoint(self._ffn, c, use_reentrant=False) for c in x.split(n, dim=1)], dim=1)
