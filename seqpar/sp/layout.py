"""How one sequence is laid out over the ranks of an SP group.

* contiguous: the sequence is cut into P shards; rank r holds shard r.
* zigzag: cut into 2P shards; rank r holds shards r and 2P-1-r, in that order. This is Megatron's
  `get_batch_on_this_cp_rank` order; it balances causal softmax attention. Linear and softmax
  layers share it, so a hybrid model never reshuffles between layers.
"""
from __future__ import annotations

import torch

from seqpar.comm import collectives as C
from seqpar.comm import differentiable

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def num_shards(layout: str, P: int) -> int:
    check_layout(layout)
    return P if layout == "contiguous" else 2 * P


def local_positions(layout: str, rank: int, P: int) -> tuple[int, ...]:
    """Global shard indices held by `rank`, in the order they sit in its local tensor."""
    check_layout(layout)
    return (rank,) if layout == "contiguous" else (rank, 2 * P - 1 - rank)


def owners_and_slots(layout: str, P: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For every shard position: the rank holding it and its index among that rank's shards."""
    n = num_shards(layout, P)
    owners, slots = [0] * n, [0] * n
    for r in range(P):
        for i, p in enumerate(local_positions(layout, r, P)):
            owners[p], slots[p] = r, i
    return tuple(owners), tuple(slots)


def split_error(total_len: int, layout: str, P: int) -> str | None:
    n = num_shards(layout, P)
    if total_len % n:
        hint = f"2 x SP size = {n}" if layout == "zigzag" else f"the SP size {n}"
        return (f"sequence length {total_len} cannot be split into {n} equal shards for the {layout} layout "
                f"over {P} ranks; pad or choose a length divisible by {hint}")
    return None


def shard_bounds(layout: str, rank: int, P: int, total_len: int) -> list[tuple[int, int]]:
    """Global token range [start, end) of each local shard, in local order."""
    L = total_len // num_shards(layout, P)
    return [(p * L, (p + 1) * L) for p in local_positions(layout, rank, P)]


def shard(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (differentiable)."""
    P, r = C.size(group), C.rank(group)
    err = split_error(x.shape[dim], layout, P)
    if err:
        raise ValueError(err)
    parts = [x.narrow(dim, s, e - s) for s, e in shard_bounds(layout, r, P, x.shape[dim])]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The full sequence gathered from every rank's part, in global order (differentiable: the
    gradient is reduce-scattered back, summing every rank's contribution)."""
    P = C.size(group)
    if P == 1:
        return x
    n_local = len(local_positions(layout, 0, P))
    if x.shape[dim] % n_local:
        raise ValueError(f"local length {x.shape[dim]} is not a whole number of {layout} shards")
    gathered = differentiable.all_gather(x, group)  # [P, *x.shape]
    L = x.shape[dim] // n_local
    owners, slots = owners_and_slots(layout, P)
    pieces = [gathered[o].narrow(dim, s * L, L) for o, s in zip(owners, slots)]
    return torch.cat(pieces, dim)
