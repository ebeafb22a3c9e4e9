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

    def apply(self, T: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        if self.name == "scalar":  # T [...]
            return T[..., None, None] * S
        if self.name == "diagonal":  # T [..., K]
            return T[..., None] * S
        return T @ S  # dense, T [..., K, K]

    def apply_t(self, T: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return T.transpose(-1, -2) @ S if self.name == "dense" else self.apply(T, S)


@dataclass(frozen=True)
class ShardChain:
    """Who holds which shard, and where documents break the chain. The same on every rank."""
    owners: tuple[int, ...]      # group rank holding shard p
    slots: tuple[int, ...]       # index of shard p among its owner's local shards
    continues: tuple[bool, ...]  # c_p: shard p's first token continues the previous document

    @property
    def n(self) -> int:
        return len(self.owners)


class StateScan:
    """One SP call's scan: forward gives S_in for this rank's shards, backward gives Y, the
    gradient reaching each local shard's S_out."""

    def __init__(self, method: str, family: Family, chain: ShardChain, positions, group, n_slices: int = 1):
        if method not in METHODS:
            raise ValueError(f"unknown SP method {method!r}; choose one of {METHODS}")
        self.method, self.family, self.chain, self.group = method, family, chain, group
        self.positions = tuple(positions)
        self.n_slices = 1 if method == "ring" else n_slices
        self.me = C.rank(group)
        self._T_all = None  # lasp2: every shard's transition, kept for the backward fold

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, T: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
        """T [n_local, *t], dS [n_local, *s] (local shard order) -> S_in [n_local, *s]; S_in(0) = 0
        (an initial state belongs to shard 0's own summary)."""
        if self.method == "lasp2":
            return self._lasp2_forward(T, dS)
        return self._chain_forward(T, dS)

    def backward(self, D: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """D [n_local, *s] -> Y [n_local, *s], the gradient reaching each local shard's S_out."""
        if self.method == "lasp2":
            return self._lasp2_backward(D)
        return self._chain_backward(D, T)

    def _global(self, gathered: torch.Tensor, p: int) -> torch.Tensor:
        return gathered[self.chain.owners[p], self.chain.slots[p]]

    def _lasp2_forward(self, T, dS):
        n_local, t_shape, s_shape = T.shape[0], T.shape[1:], dS.shape[1:]
        packed = torch.cat([T.reshape(n_local, -1).to(dS.dtype), dS.reshape(n_local, -1)], 1)
        gathered = C.all_gather(packed, self.group)  # [P, n_local, t + s]
        t_len = T[0].numel()
        T_all = [self._global(gathered, p)[:t_len].view(t_shape) for p in range(self.chain.n)]
        dS_all = [self._global(gathered, p)[t_len:].view(s_shape) for p in range(self.chain.n)]
        self._T_all = T_all
        S = dS.new_zeros(s_shape)
        S_in = {}
        for p in range(max(self.positions) + 1):
            S_in[p] = S
            S = self.family.apply(T_all[p], S) + dS_all[p]
            if p + 1 < self.chain.n and not self.chain.continues[p + 1]:
                S = torch.zeros_like(S)
        return torch.stack([S_in[p] for p in self.positions])

    def _lasp2_backward(self, D):
        gathered = C.all_gather(D, self.group)  # [P, n_local, *s]
        s_shape = D.shape[1:]
        Y_p = D.new_zeros(s_shape)
        Y = {}
        for p in range(self.chain.n - 1, min(self.positions) - 1, -1):
            Y[p] = Y_p
            X_p = self._global(gathered, p) + self.family.apply_t(self._T_all[p], Y_p)
            Y_p = X_p if self.chain.continues[p] else torch.zeros_like(X_p)
        return torch.stack([Y[p] for p in self.positions])

    # ---- chain (zeco, ring) ----------------------------------------------------------------------
    def _split(self, S: torch.Tensor):
        return [s.contiguous() for s in torch.tensor_split(S, self.n_slices, dim=-1)]

    def _recv_slices(self, like: torch.Tensor, src: int):
        bufs = self._split(torch.empty_like(like))
        return bufs, [C.irecv(b, src, self.group) for b in bufs]

    def _chain_forward(self, T, dS):
        owners, c = self.chain.owners, self.chain.continues
        order = sorted(range(len(self.positions)), key=lambda i: self.positions[i])
        S_in = [None] * len(self.positions)
        sends, carry = [], None
        for i in order:
            p = self.positions[i]
            dS_slices = torch.tensor_split(dS[i], self.n_slices, dim=-1)
            if p == 0:
                incoming, works = self._split(torch.zeros_like(dS[i])), [None] * self.n_slices
            elif owners[p - 1] == self.me:
                incoming, works = self._split(carry), [None] * self.n_slices
            else:
                incoming, works = self._recv_slices(dS[i], owners[p - 1])
            forward_to = owners[p + 1] if p + 1 < self.chain.n else None
            outs = []
            for j in range(self.n_slices):
                if works[j] is not None:
                    works[j].wait()
                if p > 0 and not c[p]:
                    incoming[j] = torch.zeros_like(incoming[j])
                out = (self.family.apply(T[i], incoming[j]) + dS_slices[j]).contiguous()
                if forward_to is not None and forward_to != self.me:
                    sends.append((C.isend(out, forward_to, self.group), out))
                outs.append(out)
            S_in[i] = torch.cat(incoming, -1)
            carry = torch.cat(outs, -1)
        for work, _ in sends:
            work.wait()
        return torch.stack(S_in)

    def _chain_backward(self, D, T):
        owners, c = self.chain.owners, self.chain.continues
        order = sorted(range(len(self.positions)), key=lambda i: -self.positions[i])
        Y = [None] * len(self.positions)
        sends, carry = [], None
        for i in order:
            p = self.positions[i]
            D_slices = torch.tensor_split(D[i], self.n_slices, dim=-1)
            if p == self.chain.n - 1:
                incoming, works = self._split(torch.zeros_like(D[i])), [None] * self.n_slices
            elif owners[p + 1] == self.me:
                incoming, works = self._split(carry), [None] * self.n_slices
            else:
                incoming, works = self._recv_slices(D[i], owners[p + 1])
            back_to = owners[p - 1] if p > 0 else None
            outs = []
            for j in range(self.n_slices):
                if works[j] is not None:
                    works[j].wait()
                X = self.family.apply_t(T[i], incoming[j]) + D_slices[j]
                if p > 0:  # what reaches S_out(p-1): masked where a document starts at shard p
                    X = (X if c[p] else torch.zeros_like(X)).contiguous()
                    if back_to != self.me:
                        sends.append((C.isend(X, back_to, self.group), X))
                outs.append(X)
            Y[i] = torch.cat(incoming, -1)
            carry = torch.cat(outs, -1)
        for work, _ in sends:
            work.wait()
        return torch.stack(Y)
