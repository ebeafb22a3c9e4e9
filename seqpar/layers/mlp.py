"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate and up split over TP by channel, down sums."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .projections import PLAIN, Projections


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, proj: Projections = PLAIN, init_std: float = 0.02,
                 out_init_std: float | None = None):
        super().__init__()
        proj.local(ffn_hidden_size, "ffn_hidden_size")
        self.gate_proj = proj.column(hidden_size, ffn_hidden_size, init_std)
        self.up_proj = proj.column(hidden_size, ffn_hidden_size, init_std)
        self.down_proj = proj.row(ffn_hidden_size, hidden_size, out_init_std or init_std)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
