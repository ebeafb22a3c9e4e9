"""The parallel context: which process groups a model runs on and how the sequence is split.

One object, passed explicitly to every layer (no globals). It names

* the SP group (one sequence split over its ranks; in Megatron this is the context-parallel group),
  the layout of the sequence over it and the SP methods of the linear and softmax layers;
* the tensor-, pipeline- and data-parallel groups where the model uses them (the plain model has no
  TP/PP; the Megatron build takes them from megatron-core).

    par = ParallelContext.create(sp=2, layout="zigzag")        # on every rank, after init_process_group
    model = HybridLM(config, par)

A group of None means "no group": only valid when torch.distributed is not running (one process).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from seqpar.comm import collectives as C
from seqpar.sp import LAYOUTS, METHODS, SOFTMAX_METHODS


def _size(group) -> int:
    return C.size(group) if group is not None else 1  # None: no group (never WORLD)


def _rank(group) -> int:
    return C.rank(group) if group is not None else 0


@dataclass(frozen=True)
class ParallelContext:
    sp_group: object = None
    layout: str = "contiguous"
    linear_method: str = "lasp2"      # seqpar.sp.linear_attention: lasp2 | zeco | ring
    softmax_method: str = "allgather"  # seqpar.sp.softmax_attention: allgather | ring
    zeco_slices: int = 4
    backend: str = "auto"             # kernel backend of the linear layers
    validate: bool = True             # cross-rank argument checks before each SP call (one tiny exchange)
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown SP layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.linear_method not in METHODS:
            raise ValueError(f"unknown linear SP method {self.linear_method!r}; choose one of {METHODS}")
        if self.softmax_method not in SOFTMAX_METHODS:
            raise ValueError(f"unknown softmax SP method {self.softmax_method!r}; choose one of {SOFTMAX_METHODS}")
        if self.zeco_slices < 1:
            raise ValueError(f"zeco_slices must be >= 1, got {self.zeco_slices}")
        running = dist.is_available() and dist.is_initialized()
        if running and self.sp_group is None and dist.get_world_size() > 1:
            raise ValueError("ParallelContext.sp_group is None but torch.distributed runs "
                             f"{dist.get_world_size()} ranks; build the context with ParallelContext.create(sp=...) "
                             "(or seqpar.megatron.parallel_context() under Megatron) so that every group is explicit")

    sp_size = property(lambda self: _size(self.sp_group))
    sp_rank = property(lambda self: _rank(self.sp_group))
    tp_size = property(lambda self: _size(self.tp_group))
    tp_rank = property(lambda self: _rank(self.tp_group))
    dp_size = property(lambda self: _size(self.dp_group))

    def describe(self) -> str:
        return (f"SP={self.sp_size} ({self.layout}, linear {self.linear_method}, softmax {self.softmax_method}) "
                f"TP={self.tp_size} DP={self.dp_size}")

    @classmethod
    def create(cls, sp: int = 1, **options) -> "ParallelContext":
        """Split the running world into DP x SP (SP fastest: ranks d*sp .. d*sp+sp-1 share a sequence).
        Collective: call on every rank. Without torch.distributed running, sp must be 1."""
        if not (dist.is_available() and dist.is_initialized()):
            if sp != 1:
                raise ValueError(f"sp={sp} needs torch.distributed to be initialised (init_process_group) first")
            return cls(**options)
        world = dist.get_world_size()
        if sp < 1 or world % sp:
            raise ValueError(f"the world of {world} ranks cannot be split into SP groups of {sp}: "
                             f"SP x DP must equal the world size; choose sp dividing {world}")
        me = dist.get_rank()
        sp_group = dp_group = None
        for d in range(world // sp):  # every rank creates every group (new_group is collective)
            g = dist.new_group(list(range(d * sp, (d + 1) * sp)))
            if d == me // sp:
                sp_group = g
        for s in range(sp):
            g = dist.new_group(list(range(s, world, sp)))
            if s == me % sp:
                dp_group = g
        return cls(sp_group=sp_group, dp_group=dp_group, **options)
