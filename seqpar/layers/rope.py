"""Rotary position embedding (Llama's rotate-half form) at given positions: the softmax layers pass
each local token's position in the global sequence (restarting at every packed document), so a
sharded sequence is rotated exactly as the whole one would be."""
from __future__ import annotations

import torch
from seqpar_kernels import wide_dtype


def apply_rope(x: torch.Tensor, position: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, T, H, D] (D even), position [T] -> x rotated by position * base^(-2i/D)."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {D}")
    wide = wide_dtype(x.dtype)
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=wide) / D)
    angle = position.to(device=x.device, dtype=wide)[:, None] * inv_freq  # [T, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]           # [T, 1, D/2]
    x1, x2 = x.to(wide).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
