"""Sequence-parallel softmax attention (the softmax layers of hybrid models).

Each rank holds its queries, keys and values in the layout's order (seqpar.sp.shard) and attends
its queries to every key its mask lets it see, by blocks merged by log-sum-exp (blockwise.py).
What moves is K and V (only the KV heads under GQA) and, in backward, their gradients:

* allgather (LASP-2H): one all-gather of every rank's K/V, issued asynchronously while the local
  (diagonal) blocks are computed; backward re-gathers K/V the same way and reduce-scatters dK/dV.
* ring: P - 1 steps; at step d rank r receives from rank r - d the part of its K/V that r's
  queries can see, while the previous step's block is being computed; backward sends each step's
  dK/dV straight back to its owner. At most two remote blocks are held at a time.
* with a sliding window, both methods fetch exactly the keys inside the windows of their queries
  (allgather: in one batch of transfers; ring: one source rank per step) instead of all of K/V.

The mask is a rule on global positions (causal, window, documents), so which parts of which
ranks' K/V a rank needs is known on every rank without any communication (`ExchangePlan`): blocks
that the mask empties (in the future, outside the window, another document) are neither sent nor
computed. zigzag (rank r holds shards r and 2P-1-r) gives every rank the same causal work.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from seqpar.comm import collectives as C
from seqpar_kernels import InputError, wide_dtype

from .blockwise import (KeyBlock, Mask, Spec, as_list, blockwise_attention, check_inputs, key_hull,
                        resolve_impl)
from .layout import LAYOUTS, local_positions, split_error

METHODS = ("allgather", "ring")


def softmax_attention(q, k, v, *, group=None, method: str = "allgather", layout: str = "contiguous",
                      causal: bool = True, cu_seqlens=None, window: int | None = None, scale=None,
                      validate: bool = True) -> torch.Tensor:
    """Softmax attention over one sequence split across the ranks of `group` (None: WORLD).

    q [B, T_local, Hq, D], k and v [B, T_local, Hkv, D] (Hq a multiple of Hkv) are this rank's local
    parts in the layout's order; `cu_seqlens` are the global document boundaries (identical on
    every rank, B = 1); `window`: each query sees its `window` most recent keys, itself included;
    scale defaults to D ** -0.5. Returns this rank's output [B, T_local, Hq, D].
    validate: check on every rank, before any data moves, that all ranks passed the same arguments
    (one small host-side all-gather). World size 1 is plain attention with no communication.
    """
    P = C.size(group)
    cu = as_list(cu_seqlens)
    error = None
    try:
        _check(q, k, v, method, layout, causal, cu, window, scale, P)
    except ValueError as e:  # reported on every rank by agree(), so no rank is left in a collective
        error = str(e)
    if validate and P > 1:
        meta = dict(method=method, layout=layout, causal=causal, window=window, scale=scale, cu_seqlens=cu,
                    q_shape=tuple(q.shape), kv_shape=tuple(k.shape), dtype=str(q.dtype))
        C.agree(meta, error, group, what="seqpar.sp.softmax_attention")
    elif error:
        raise InputError(f"seqpar.sp.softmax_attention: {error}")
    mask = Mask(causal, window, tuple(cu) if cu else None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = resolve_impl("auto", q)
    if P == 1:
        whole = ((0, q.shape[1], 0),)
        return blockwise_attention(q, k, v, Spec(whole, whole, mask, scale, impl))
    me = C.rank(group)
    plan = exchange_plan(layout, P, q.shape[1] // len(local_positions(layout, me, P)), mask)
    if method == "allgather" and window is None:
        remote = _Gathered(plan, me, group)
    else:  # ring, or a window: only the keys in reach move
        steps = tuple((d,) for d in range(1, P)) if method == "ring" else (tuple(range(1, P)),)
        remote = _Direct(plan, me, group, steps)
    spans = plan.spans[me]
    return blockwise_attention(q, k, v, Spec(spans, spans, mask, scale, impl, remote=remote))


def _check(q, k, v, method, layout, causal, cu, window, scale, P) -> None:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {METHODS}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    T = q.shape[1] * P if q.dim() == 4 else 0
    check_inputs(q, k, v, causal=causal, window=window, scale=scale, cu=cu, total_len=T)
    err = split_error(T, layout, P)
    if err:
        raise InputError(f"global {err} (local length {q.shape[1]} on each rank)")


# ---- who needs which keys --------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A run of one rank's local K/V: local offset, global start, length."""
    offset: int
    start: int
    length: int


@dataclass(frozen=True)
class ExchangePlan:
    spans: tuple   # per rank: its local shards as (local offset, length, global start)
    need: tuple    # need[t][s]: the pieces of rank s's K/V that rank t's queries see (() for s == t)

    def size(self, pieces, per_token: int) -> int:
        return sum(p.length for p in pieces) * per_token


@functools.lru_cache(maxsize=256)
def exchange_plan(layout: str, P: int, L: int, mask: Mask) -> ExchangePlan:
    """The same on every rank: derived from the layout and the mask alone."""
    spans = tuple(tuple((i * L, L, p * L) for i, p in enumerate(local_positions(layout, r, P))) for r in range(P))
    need = []
    for t in range(P):
        row = []
        for s in range(P):
            pieces = []
            for off, n, k0 in (spans[s] if s != t else ()):
                hulls = [h for _, m, q0 in spans[t] if (h := key_hull(mask, q0, q0 + m, k0, k0 + n))]
                if hulls:
                    a, b = min(h[0] for h in hulls), max(h[1] for h in hulls)
                    pieces.append(Piece(off + a - k0, a, b - a))
            row.append(tuple(pieces))
        need.append(tuple(row))
    return ExchangePlan(spans, tuple(need))


def _piece(x: torch.Tensor, p: Piece) -> torch.Tensor:
    """The piece's tokens of x [2, B, T_local, Hkv, D]."""
    return x[:, :, p.offset:p.offset + p.length]


# ---- the two ways K/V travel ---------------------------------------------------------------------------
class _Gathered:
    """allgather: one all-gather of every rank's K/V; backward: one reduce-scatter of dK/dV."""

    def __init__(self, plan: ExchangePlan, me: int, group):
        self.plan, self.me, self.group = plan, me, group

    def start(self, kv: torch.Tensor) -> None:
        self.kv_all, self.work = C.all_gather(kv, self.group, async_op=True)  # [P, 2, B, T_local, Hkv, D]

    def blocks(self, backward: bool):
        self.work.wait()
        shape = self.kv_all.shape
        self.grads = torch.zeros(shape, dtype=wide_dtype(self.kv_all.dtype), device=self.kv_all.device) \
            if backward else None
        for s, pieces in enumerate(self.plan.need[self.me]):
            for p in pieces:
                kv = _piece(self.kv_all[s], p)
                yield KeyBlock(p.start, kv[0], kv[1], _piece(self.grads[s], p) if backward else None)
        self.kv_all = None

    def finish(self) -> torch.Tensor:
        grads, self.grads = self.grads, None
        return C.reduce_scatter_sum(grads, self.group)


class _Direct:
    """Each rank sends every other rank exactly the pieces of its K/V that rank needs, in steps:
    at step d (a distance), rank r receives from r - d and sends to r + d. ring: one distance per
    step, the next step in flight while the current one is computed; allgather with a window: all
    distances in one step. Backward: each step's dK/dV go back to their owners the same way."""

    def __init__(self, plan: ExchangePlan, me: int, group, steps: tuple[tuple[int, ...], ...]):
        self.plan, self.me, self.group, self.steps = plan, me, group, steps
        self.P = len(plan.spans)

    def _peers(self, d: int) -> tuple[int, int]:
        return (self.me + d) % self.P, (self.me - d) % self.P  # (sends to, receives from)

    def _views(self, flat: torch.Tensor, pieces):
        out, pos = [], 0
        for p in pieces:
            n = p.length * self.per_token
            out.append(flat[pos:pos + n].view(2, self.B, p.length, *self.head))
            pos += n
        return out

    def _send_kv(self, dists):
        need, me = self.plan.need, self.me
        sends, recvs = [], []
        for d in dists:
            dst, src = self._peers(d)
            if need[dst][me]:
                sends.append((torch.cat([_piece(self.kv, p).reshape(-1) for p in need[dst][me]]), dst))
            if need[me][src]:
                recvs.append((self.kv.new_empty(self.plan.size(need[me][src], self.per_token)), src))
        return C.exchange(sends, recvs, self.group), sends, recvs

    def start(self, kv: torch.Tensor) -> None:
        self.kv, self.B, self.head = kv, kv.shape[1], tuple(kv.shape[3:])
        self.grad_shape, self.grad_opts = kv.shape, dict(dtype=wide_dtype(kv.dtype), device=kv.device)
        self.per_token = 2 * self.B * kv.shape[3] * kv.shape[4]
        self.total, self.grads_in_flight = None, None
        self.pending = self._send_kv(self.steps[0])

    def blocks(self, backward: bool):
        need, me = self.plan.need, self.me
        if backward:
            self.total = torch.zeros(self.grad_shape, **self.grad_opts)  # dK/dV of my keys from the others
        for i, dists in enumerate(self.steps):
            works, _, recvs = self.pending
            for w in works:
                w.wait()
            if i + 1 < len(self.steps):
                self.pending = self._send_kv(self.steps[i + 1])
            grads_out = []
            for buf, src in recvs:
                pieces = need[me][src]
                g = torch.zeros(buf.shape, **self.grad_opts) if backward else None
                gviews = self._views(g, pieces) if backward else [None] * len(pieces)
                for p, kv, gv in zip(pieces, self._views(buf, pieces), gviews):
                    yield KeyBlock(p.start, kv[0], kv[1], gv)
                grads_out.append((g, src))
            if backward:  # this step's blocks are done: their gradients go home
                grads_in = []
                for d in dists:
                    dst, _ = self._peers(d)
                    if need[dst][me]:
                        grads_in.append((torch.empty(self.plan.size(need[dst][me], self.per_token), **self.grad_opts),
                                         dst))
                works = C.exchange(grads_out, grads_in, self.group)
                self._land_grads()  # the previous step's, which had a whole step to arrive
                self.grads_in_flight = (works, grads_out, grads_in)
        self.pending = self.kv = None  # every send of K/V has completed (each step's works were waited on)

    def _land_grads(self) -> None:
        """Wait for the gradient transfers in flight and add what arrived; at most one step's
        gradient buffers are alive besides the current one."""
        if self.grads_in_flight is None:
            return
        works, _, grads_in = self.grads_in_flight
        for w in works:
            w.wait()
        for buf, peer in grads_in:
            for p, g in zip(self.plan.need[peer][self.me], self._views(buf, self.plan.need[peer][self.me])):
                _piece(self.total, p).add_(g)
        self.grads_in_flight = None

    def finish(self) -> torch.Tensor:
        self._land_grads()
        total, self.total = self.total, None
        return total
