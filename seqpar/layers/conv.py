"""The short causal convolution of the linear-attention layers (Mamba, GLA, DeltaNet): a depthwise
filter over the last `width` tokens of each channel, followed by SiLU.

Under SP the first width-1 outputs of every shard read the tokens just before the shard, which sit
on another rank (in the layout's global order); seqpar.sp.previous_tokens fetches them and sends
their gradient back. With packed documents a tap never reaches into the previous document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.sp import LocalTokens, previous_tokens

from .projections import PLAIN, Projections


class ShortConv(nn.Module):
    def __init__(self, channels: int, width: int, proj: Projections = PLAIN, what: str = "channels"):
        super().__init__()
        if width < 2:
            raise ValueError(f"a short convolution needs width >= 2 (conv_size 0 turns it off), got {width}")
        self.width = width
        w = torch.empty(proj.local(channels, what), width)
        nn.init.uniform_(w, -1 / math.sqrt(width), 1 / math.sqrt(width))  # nn.Conv1d's default for a depthwise filter
        self.weight = proj.shard(nn.Parameter(w))  # weight[:, -1] multiplies the current token

    def forward(self, x: torch.Tensor, tokens: LocalTokens, group=None, layout: str = "contiguous") -> torch.Tensor:
        B, T, ch = x.shape
        n, W = tokens.n_shards, self.width
        L = T // n
        halo = previous_tokens(x, W - 1, group, layout)      # [B, n, W-1, ch]
        xe = torch.cat([halo, x.view(B, n, L, ch)], dim=2)   # each shard preceded by its halo
        y = xe[:, :, W - 1:] * self.weight[:, W - 1]
        for j in range(1, W):  # tap j reads the token j steps back
            term = xe[:, :, W - 1 - j:W - 1 - j + L] * self.weight[:, W - 1 - j]
            if tokens.packed:  # never reach into the previous document
                term = term * (tokens.index - j >= tokens.doc_start).view(1, n, L, 1).to(x.dtype)
            y = y + term
        return F.silu(y.reshape(B, T, ch))
