"""What a rank's local tokens are in the global sequence, and the tokens just before its shards.

* `local_tokens`: the global index of every local token and the start of the document it belongs to
  (from the global `cu_seqlens`), in the layout's local order. RoPE uses index - doc_start
  (positions restart at every document); the short convolution uses doc_start to never mix documents.
* `previous_tokens`: for every local shard, the `width` tokens that precede it in the global order
  (the halo of a causal convolution), fetched from the ranks that hold them; differentiable, the
  gradient goes back to the rank that owns those tokens.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from seqpar.comm import collectives as C
from seqpar.comm import differentiable

from .layout import local_positions, owners_and_slots, split_error


@dataclass(frozen=True)
class LocalTokens:
    index: torch.Tensor      # [T_local] global position of each local token
    doc_start: torch.Tensor  # [T_local] global position of the first token of its document
    n_shards: int            # local shards (1 contiguous, 2 zigzag)
    packed: bool             # documents given (cu_seqlens): doc_start is not all zero

    @property
    def position(self) -> torch.Tensor:
        """Position inside the token's document (RoPE positions)."""
        return self.index - self.doc_start


def cu_list(cu_seqlens) -> tuple[int, ...] | None:
    if cu_seqlens is None:
        return None
    return tuple(int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens))


def local_tokens(local_len: int, group=None, layout: str = "contiguous", cu_seqlens=None,
                 device=None) -> LocalTokens:
    P, r = C.size(group), C.rank(group)
    return _local_tokens(local_len, P, r, layout, cu_list(cu_seqlens), torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _local_tokens(local_len, P, r, layout, cu, device) -> LocalTokens:
    n_local = len(local_positions(layout, r, P))
    err = split_error(local_len * P, layout, P)
    if err or local_len % n_local:
        raise ValueError(f"local length {local_len}: {err or 'not a whole number of shards'}")
    L = local_len // n_local
    index = torch.cat([torch.arange(p * L, (p + 1) * L) for p in local_positions(layout, r, P)])
    if cu is None:
        start = torch.zeros_like(index)
    else:
        if cu[0] != 0 or cu[-1] != local_len * P:
            raise ValueError(f"cu_seqlens must run from 0 to the global length {local_len * P}, got {list(cu)}")
        start = torch.tensor([cu[bisect.bisect_right(cu, int(i)) - 1] for i in index])
    return LocalTokens(index.to(device), start.to(device), n_local, cu is not None)


def previous_tokens(x: torch.Tensor, width: int, group=None, layout: str = "contiguous") -> torch.Tensor:
    """x: [B, T_local, C] in the layout's local order -> [B, n_local_shards, width, C]: the `width`
    tokens before each local shard in the global sequence (zeros before the first token)."""
    P, r = C.size(group), C.rank(group)
    positions = local_positions(layout, r, P)
    B, T_local, ch = x.shape
    L = T_local // len(positions)
    if width > L:
        raise ValueError(f"a causal convolution of width {width + 1} needs at least {width} tokens per shard, "
                         f"but the {layout} layout over {P} ranks leaves {L}; use a longer sequence or a smaller "
                         "conv_size")
    tails = x.view(B, len(positions), L, ch)[:, :, L - width:]
    gathered = differentiable.all_gather(tails, group) if P > 1 else tails[None]  # [P, B, n_local, width, C]
    owners, slots = owners_and_slots(layout, P)
    # shard 0 has no predecessor; its halo is zeros taken from the gathered tensor all the same, so that
    # every rank's backward reaches the all-gather's reduce-scatter (a skipped collective would hang)
    halos = [gathered[owners[p - 1], :, slots[p - 1]] * (p > 0) for p in positions]
    return torch.stack(halos, dim=1)
