"""What this rank's local tokens are in global terms: a plan made once per call from the shapes,
the layout, the rank and the global document boundaries.

The local kernel runs over "kernel sequences": rows of a chain view of the local tensors.
* Without cu_seqlens, the local [B, n_local * L] tensor is viewed as [B * n_local, L]: one kernel
  sequence per (batch row, local shard), row index b * n_local + i.
* With cu_seqlens (B = 1), the local tokens are one row cut into segments at every document
  boundary and every shard edge; each segment is one kernel sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqpar.comm import ShardChain

from .layout import local_positions, num_shards, owners_and_slots


@dataclass(frozen=True)
class Seq:
    row: int
    start: int
    end: int
    start_doc: int | None = None  # begins document start_doc: takes initial_state[start_doc]
    end_doc: int | None = None    # ends document end_doc: its final state is final_state[end_doc]


@dataclass(frozen=True)
class Plan:
    chain: ShardChain
    positions: tuple[int, ...]       # global shard index of each local shard
    n_local: int
    B: int                           # batch size of the caller's tensors
    L: int                           # tokens per shard
    seqs: tuple[Seq, ...]
    first: tuple[tuple[int, ...], ...]  # per local shard: its first kernel sequence, per chain row
    last: tuple[tuple[int, ...], ...]
    whole: tuple[bool, ...]          # per local shard: one sequence spans it (so T_p is its transition)
    n_docs: int                      # number of initial / final states
    local_cu: tuple[int, ...] | None  # boundaries of the kernel sequences (varlen), else None

    @property
    def needs_transitions(self) -> bool:
        """Whether any local shard's transition enters the scan (ShardChain.inner)."""
        return any(self.chain.inner(p) for p in self.positions)


def make_plan(layout: str, rank: int, P: int, B: int, local_len: int, cu: list[int] | None) -> Plan:
    n_local = len(local_positions(layout, rank, P))
    L = local_len // n_local
    n = num_shards(layout, P)
    owners, slots = owners_and_slots(layout, P)
    positions = local_positions(layout, rank, P)
    if cu is None:  # every batch row is one document running through all shards
        seqs = tuple(Seq(b * n_local + i, 0, L, start_doc=b if p == 0 else None, end_doc=b if p == n - 1 else None)
                     for b in range(B) for i, p in enumerate(positions))
        idx = tuple(tuple(b * n_local + i for b in range(B)) for i in range(n_local))
        chain = ShardChain(owners, slots, continues=(False,) + (True,) * (n - 1))
        return Plan(chain, positions, n_local, B, L, seqs, idx, idx, (True,) * n_local, n_docs=B, local_cu=None)

    starts = set(cu[:-1])
    doc_of_start = {s: d for d, s in enumerate(cu[:-1])}
    doc_of_end = {e: d for d, e in enumerate(cu[1:])}
    continues_global = tuple(p * L not in starts for p in range(n))
    seqs, first, last, whole = [], [], [], []
    for i, p in enumerate(positions):
        s, e = p * L, (p + 1) * L
        cuts = [s] + [b for b in cu if s < b < e] + [e]
        first.append((len(seqs),))
        for a, b in zip(cuts, cuts[1:]):
            off = i * L - s  # global -> local position
            seqs.append(Seq(0, a + off, b + off, start_doc=doc_of_start.get(a), end_doc=doc_of_end.get(b)))
        last.append((len(seqs) - 1,))
        whole.append(len(cuts) == 2)
    local_cu = tuple([0] + [q.end for q in seqs])
    chain = ShardChain(owners, slots, continues_global)
    return Plan(chain, positions, n_local, B, L, tuple(seqs), tuple(first), tuple(last), tuple(whole),
                n_docs=len(cu) - 1, local_cu=local_cu)
