"""Collectives over an explicit process group, counting what this rank puts on the wire.

All ranks are group ranks (0..P-1 inside `group`); translation to global ranks happens here.
The counters are real measurements of the calls made, used by tests ("LASP-2 makes one
all-gather") and by the training metrics (bytes and calls per step).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)

    def record(self, op: str, nbytes: int) -> None:
        self.calls[op] += 1
        self.bytes_sent[op] += nbytes


STATS = CommStats()


@contextmanager
def counting():
    """Collect the calls made inside the block: `with counting() as s: ...; s.calls["all_gather"]`."""
    global STATS
    saved, STATS = STATS, CommStats()
    try:
        yield STATS
    finally:
        mine, STATS = STATS, saved
        for op, n in mine.calls.items():  # the enclosing counter sees them too
            saved.calls[op] += n
            saved.bytes_sent[op] += mine.bytes_sent[op]


# torch >= 2.13 renamed the flat all-gather / reduce-scatter; the GPU image's 2.11 has the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def global_rank(group, group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_gather(x: torch.Tensor, group=None, async_op: bool = False):
    """Every rank's x stacked: [P, *x.shape]. With async_op, returns (result, work)."""
    x = x.contiguous()
    out = x.new_empty((size(group),) + tuple(x.shape))
    STATS.record("all_gather", _nbytes(x))
    # gloo and NCCL both take a flat output (a stacked one is rejected by gloo)
    work = _all_gather_flat(out.view(-1), x.view(-1), group=group, async_op=async_op)
    return (out, work) if async_op else out


def reduce_scatter_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """x: [P, *shape] on every rank -> the sum over ranks of x[my rank], of shape [*shape]."""
    x = x.contiguous()
    out = x.new_empty(x.shape[1:])
    STATS.record("reduce_scatter", _nbytes(x))
    _reduce_scatter_flat(out.view(-1), x.view(-1), group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    out = x.clone()
    STATS.record("all_reduce", _nbytes(x))
    dist.all_reduce(out, group=group)
    return out


def isend(x: torch.Tensor, dst: int, group=None):
    """Non-blocking send to group rank dst; x must stay alive until the returned work completes."""
    assert x.is_contiguous(), "isend needs a contiguous buffer that outlives the send"
    STATS.record("send", _nbytes(x))
    return dist.isend(x, global_rank(group, dst), group=group)


def irecv(buf: torch.Tensor, src: int, group=None):
    STATS.record("recv", 0)
    return dist.irecv(buf, global_rank(group, src), group=group)


def exchange(sends, recvs, group=None) -> list:
    """Point-to-point sends [(tensor, dst)] and receives [(buffer, src)] issued as one batch (one
    NCCL group), so ranks that send to each other in a cycle cannot deadlock; every rank issues its
    batches in the same order. Buffers must stay alive until the returned works complete."""
    ops = []
    for x, dst in sends:
        assert x.is_contiguous(), "exchange needs contiguous send buffers"
        STATS.record("send", _nbytes(x))
        ops.append(dist.P2POp(dist.isend, x, global_rank(group, dst), group))
    for buf, src in recvs:
        STATS.record("recv", 0)
        ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, src), group))
    return dist.batch_isend_irecv(ops) if ops else []


_CPU_GROUPS: dict[tuple[int, ...], object] = {}


def cpu_group(group=None):
    """A gloo group over the same ranks as `group`, for small host-side exchanges (argument checks)
    that must not wait on a GPU stream. `group` itself when it already runs on gloo."""
    if dist.get_backend(group) == dist.Backend.GLOO:
        return group
    ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
    if ranks not in _CPU_GROUPS:
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _CPU_GROUPS[ranks]


def agree(meta: dict, error: str | None, group=None, what: str = "") -> None:
    """Check on every rank, before any data moves, that no rank found an error in its arguments and
    that `meta` is the same everywhere; raise the same clear error on every rank otherwise, so that no
    rank is left waiting in a collective."""
    from seqpar_kernels import InputError

    STATS.record("agree", 0)
    # the common case in one small fixed-size all-gather: a fingerprint of (error, meta) per rank;
    # every rank sees the same fingerprints, so all take the full exchange below or none does
    cpu = cpu_group(group)
    digest = hashlib.blake2b(repr((error, sorted(meta.items()))).encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True), error is not None], dtype=torch.int64)
    prints = mine.new_empty(size(group), 2)
    _all_gather_flat(prints.view(-1), mine, group=cpu)
    if not prints[:, 1].any() and bool((prints[:, 0] == prints[0, 0]).all()):
        return
    seen = [None] * size(group)
    dist.all_gather_object(seen, (error, meta), group=cpu)
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(seen) if e]
    if errors:
        raise InputError(f"{what}: " + "; ".join(errors))
    for key in meta:
        values = [m[key] for _, m in seen]
        if any(v != values[0] for v in values):
            raise InputError(f"{what}: {key} differs across the ranks of the SP group ({values}); every rank must "
                             f"pass the same {key}")
