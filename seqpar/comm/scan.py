"""The prefix scan over shard states that every SP method evaluates.

A sequence is cut into shards at positions p = 0..n-1 (one or two per rank). Shard p maps its
incoming state to its outgoing one affinely, S_out(p) = T_p S_in(p) + dS_p, and
    S_in(p+1) = c_{p+1} S_out(p)        (c = 0 where a document starts exactly at the shard edge)
Backward, with X_p = dL/dS_in(p) and D_p the part of it from shard p's own outputs:
    Y_p = c_{p+1} X_{p+1}  (the gradient reaching S_out(p)),   X_p = D_p + T_p^T Y_p.

Methods (all exact, all in fp32 or wider):
* lasp2: one all-gather of every shard's (T, dS); each rank folds its own prefix. Backward: one
  all-gather of the D's, each rank folds its suffix.
* zeco:  the state travels shard to shard (rank to rank), cut into `n_slices` pieces along V; each
  piece is combined and forwarded as soon as it arrives (T acts on the K side only, so V-slices
  are independent, also for dense delta-rule transitions). Backward runs the reverse chain.
* ring:  the same chain in one piece: the sequential LASP-1 baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import collectives as C

METHODS = ("lasp2", "zeco", "ring")


@dataclass(frozen=True)
class Family:
    """How a transition acts on a state S [..., K, V]."""
    name: str

    def fold(self, T, S, dS, transpose: bool = False, out=None) -> torch.Tensor:
        """T S + dS (T^T S + dS with transpose), one op where the family allows; S None is zero.
        T is [...] (scalar), [..., K] (diagonal) or [..., K, K] (dense)."""
        if S is None:
            return dS if out is None else out.copy_(dS)
        if self.name == "dense":
            return torch.add(dS, T.transpose(-1, -2) @ S if transpose else T @ S, out=out)
        return torch.addcmul(dS, T[..., None, None] if self.name == "scalar" else T[..., None], S, out=out)


@dataclass(frozen=True)
class ShardChain:
    """Who holds which shard, and where documents break the chain. The same on every rank."""
    owners: tuple[int, ...]      # group rank holding shard p
    slots: tuple[int, ...]       # index of shard p among its owner's local shards
    continues: tuple[bool, ...]  # c_p: shard p's first token continues the previous document

    @property
    def n(self) -> int:
        return len(self.owners)

    @property
    def hops(self) -> int:
        """Messages a state makes along the chain (consecutive shards on different ranks)."""
        return sum(a != b for a, b in zip(self.owners, self.owners[1:]))

    def inner(self, p: int) -> bool:
        """Whether shard p's transition is ever used: the first shard's multiplies a zero incoming
        state (an initial state belongs to its own summary) and the last shard's outgoing state
        goes nowhere."""
        return 0 < p < self.n - 1


class StateScan:
    """One SP call's scan: forward gives S_in for this rank's shards, backward gives Y, the
    gradient reaching each local shard's S_out. Both return None where every local result is
    zero (a rank holding only the chain's first shard, or only its last), so that the caller can
    skip adding it. T may be None where no local shard is inner (ShardChain.inner): it is never
    read then."""

    def __init__(self, method: str, family: Family, chain: ShardChain, positions, group, n_slices: int = 1):
        if method not in METHODS:
            raise ValueError(f"unknown SP method {method!r}; choose one of {METHODS}")
        self.method, self.family, self.chain, self.group = method, family, chain, group
        self.positions = tuple(positions)
        # slices pipeline a state through intermediate ranks; over one hop they only add messages
        # (the cost model's optimum is then one slice)
        self.n_slices = 1 if method == "ring" or chain.hops < 2 else n_slices
        self.me = C.rank(group)
        self._T_all = None  # lasp2: every shard's transition, kept for the backward fold

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, T: torch.Tensor | None, dS: torch.Tensor) -> torch.Tensor | None:
        """T [n_local, *t], dS [n_local, *s] (local shard order) -> S_in [n_local, *s]; S_in(0) = 0
        (an initial state belongs to shard 0's own summary)."""
        if self.method == "lasp2":
            return self._lasp2_forward(T, dS)
        return self._chain_forward(T, dS)

    def backward(self, D: torch.Tensor, T: torch.Tensor | None) -> torch.Tensor | None:
        """D [n_local, *s] -> Y [n_local, *s], the gradient reaching each local shard's S_out."""
        if self.method == "lasp2":
            return self._lasp2_backward(D)
        return self._chain_backward(D, T)

    def _stacked(self, per_shard: list, like: torch.Tensor):
        """[n_local, *s] from one result per local shard (None: zero); None if all are zero."""
        if all(x is None for x in per_shard):
            return None
        if len(per_shard) == 1:
            return per_shard[0].unsqueeze(0)
        return torch.stack([torch.zeros_like(like) if x is None else x for x in per_shard])

    def _by_position(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """[P, n_local, ...] from the all-gather -> every shard's entry, in chain order (views)."""
        rows = gathered.flatten(0, 1).unbind(0)
        n_local = gathered.shape[1]
        return [rows[o * n_local + s] for o, s in zip(self.chain.owners, self.chain.slots)]

    def _lasp2_forward(self, T, dS):
        n_local, s_shape = dS.shape[0], dS.shape[1:]
        last = max(self.positions)  # this rank folds the prefix up to its last shard
        if self.chain.n > 2:  # some shard is inner: the transitions travel with the states
            t_shape = self._transition_shape(T, dS)
            T = T if T is not None else dS.new_empty(n_local, *t_shape)  # no local one is read
            packed = torch.cat([T.reshape(n_local, -1).to(dS.dtype), dS.reshape(n_local, -1)], 1)
            gathered = C.all_gather(packed, self.group)  # [P, n_local, t + s]
            t_len = packed.shape[1] - dS[0].numel()
            T_all = self._by_position(gathered[..., :t_len].unflatten(-1, t_shape))
            dS_all = self._by_position(gathered[..., t_len:].unflatten(-1, s_shape))
            self._T_all = {p: T_all[p] for p in range(self.chain.n) if self.chain.inner(p)}
        else:
            self._T_all = {}
            dS_all = self._by_position(C.all_gather(dS, self.group))  # [P, n_local, *s]
        S, S_in = None, {}  # None: a zero state
        for p in range(last + 1):
            S_in[p] = S if p == 0 or self.chain.continues[p] else None
            if p < last:
                S = self.family.fold(self._T_all.get(p), S_in[p], dS_all[p])
        return self._stacked([S_in[p] for p in self.positions], dS[0])

    def _transition_shape(self, T, dS) -> tuple[int, ...]:
        if T is not None:
            return tuple(T.shape[1:])
        B, H, K = dS.shape[1:4]
        return {"scalar": (B, H), "diagonal": (B, H, K), "dense": (B, H, K, K)}[self.family.name]

    def _lasp2_backward(self, D):
        D_all = self._by_position(C.all_gather(D, self.group))  # [P, n_local, *s]
        first = min(self.positions)  # this rank folds the suffix down to its first shard
        Y_p, Y = None, {}  # None: a zero gradient
        for p in range(self.chain.n - 1, first - 1, -1):
            Y[p] = Y_p
            if p > first:
                X_p = self.family.fold(self._T_all.get(p), Y_p, D_all[p], transpose=True)
                Y_p = X_p if self.chain.continues[p] else None
        return self._stacked([Y[p] for p in self.positions], D[0])

    # ---- chain (zeco, ring) ----------------------------------------------------------------------
    # A state travels in n_slices column blocks of V, kept slice-major, [n_slices, ..., K, V / n_slices],
    # so that every slice is a contiguous buffer that is sent as it is.
    def slices_for(self, V: int) -> int:
        """Slices of equal width: the most, up to n_slices, that divide V (the same on every rank)."""
        return max(d for d in range(1, self.n_slices + 1) if V % d == 0)

    @staticmethod
    def _slice_major(x: torch.Tensor, n: int) -> torch.Tensor:
        if n == 1:
            return x.contiguous().unsqueeze(0)
        return x.unflatten(-1, (n, -1)).movedim(-2, 0).contiguous()

    @staticmethod
    def _state(slices: torch.Tensor) -> torch.Tensor:
        """The inverse of _slice_major: [..., K, V]."""
        return slices[0] if slices.shape[0] == 1 else slices.movedim(0, -2).flatten(-2)

    def _chain(self, T, X, order, prev, nxt, linked, transpose: bool):
        """The chain over the local shards in `order`: shard p's incoming value comes from shard
        prev(p) (None: the chain starts at p) and counts where linked(p) (else a document starts
        between them); its outgoing value T_p in + X_p (T_p^T with transpose) goes to shard nxt(p).
        Returns each local shard's incoming value, stacked (None where all are zero)."""
        owners, n = self.chain.owners, self.slices_for(X.shape[-1])
        results = [None] * len(self.positions)
        sends, carry = [], None
        for i in order:
            p, q, q_next = self.positions[i], prev(self.positions[i]), nxt(self.positions[i])
            Xs = self._slice_major(X[i], n)
            works = []
            if q is None:
                incoming = None
            elif owners[q] == self.me:
                incoming = carry
            else:
                incoming = torch.empty_like(Xs)
                works = [C.irecv(incoming[j], owners[q], self.group) for j in range(n)]
            use = incoming if incoming is not None and linked(p) else None
            if q_next is not None:
                remote = owners[q_next] != self.me
                out = Xs if use is None else torch.empty_like(Xs)  # nothing arrives: X goes on as it is
                for j in range(n):  # each slice goes on as soon as it has arrived
                    if works:
                        works[j].wait()
                    if use is not None:
                        self.family.fold(T[i], use[j], Xs[j], transpose=transpose, out=out[j])
                    if remote:  # the buffer is kept until its send completes
                        sends.append((C.isend(out[j], owners[q_next], self.group), out[j]))
                carry = out
            else:
                for work in works:
                    work.wait()
            results[i] = self._state(use) if use is not None else None
        for work, _ in sends:
            work.wait()
        return self._stacked(results, X[0])

    def _chain_forward(self, T, dS):
        c, n = self.chain.continues, self.chain.n
        order = sorted(range(len(self.positions)), key=lambda i: self.positions[i])
        return self._chain(T, dS, order, prev=lambda p: p - 1 if p > 0 else None,
                           nxt=lambda p: p + 1 if p + 1 < n else None, linked=lambda p: c[p], transpose=False)

    def _chain_backward(self, D, T):
        c, n = self.chain.continues, self.chain.n
        order = sorted(range(len(self.positions)), key=lambda i: -self.positions[i])
        # X_p = D_p + T_p^T Y_p travels to shard p-1, where Y_{p-1} = c_p X_p
        return self._chain(T, D, order, prev=lambda p: p + 1 if p + 1 < n else None,
                           nxt=lambda p: p - 1 if p > 0 else None, linked=lambda p: c[p + 1], transpose=True)
