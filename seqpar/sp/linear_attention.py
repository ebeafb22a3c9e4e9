"""Sequence-parallel linear attention: each rank runs the single-device kernel on its shard and
exchanges only fixed-size state summaries (see seqpar.comm.scan for the methods).

Forward, per local shard p:
  1. summary: dS_p (the shard's final state from a zero incoming state: the kernel's final_state,
     a state pass whose start-independent work the kernel in step 3 reuses through Call.memo) and
     T_p (its transition);
  2. the scan (LASP-2 / ZeCO / ring) starts on a side stream and yields S_in(p);
  3. the kernel runs on the shard with S_in(p) as a *late* initial state: it does the work that does
     not depend on S_in first, so the exchange overlaps it (seqpar_kernels.explicit).
Backward mirrors it: D_p (the gradient of S_in(p) from the shard's own outputs) -> reverse scan on
the side stream -> Y_p (the gradient reaching the shard's outgoing state) -> the kernel backward with
Y_p as a late final-state gradient.

Gradients of replicated inputs (initial_state, lightning's per-head decay) are this rank's share:
summed over the SP group they give the full gradient, as for any parameter under data/sequence
parallelism. The gradient of the returned final_state is summed over ranks (every rank's loss counts).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import seqpar_kernels
from seqpar.comm import METHODS, Family, StateScan
from seqpar.comm import collectives as C
from seqpar_kernels import InputError, get_variant, wide_dtype
from seqpar_kernels.backends import resolve
from seqpar_kernels.explicit import Call, ExplicitKernel, explicit_kernel, plus_late, save_with_memo, saved_with_memo
from seqpar_kernels.variants import check_cu_seqlens, normalize_inputs

from .layout import LAYOUTS, split_error
from .plan import Plan, make_plan


def linear_attention(q, k, v, *, variant: str, g=None, beta=None, scale=None, group=None,
                     method: str = "lasp2", layout: str = "contiguous", cu_seqlens=None, initial_state=None,
                     output_final_state: bool = False, backend: str = "auto", zeco_slices: int = 4,
                     validate: bool = True):
    """Linear attention over one sequence split across the ranks of `group` (None: WORLD).

    q, k, v, g, beta are this rank's local parts in the layout's order (seqpar.sp.shard cuts them);
    `cu_seqlens` are the *global* document boundaries, identical on every rank; `initial_state` is
    [B or N_docs, H, K, V], identical on every rank. Returns (o_local, final_state) where final_state
    (if requested) is the state at the end of the whole sequence (per document), on every rank.

    method: "lasp2" (one all-gather), "zeco" (pipelined all-scan in `zeco_slices` V-pieces) or
    "ring" (sequential chain). validate: check on every rank, before any data moves, that all ranks
    passed consistent arguments (one small host-side all-gather); turn off only once a configuration
    is known to be good.
    """
    P = C.size(group)
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else (list(cu_seqlens) if cu_seqlens else None)
    error, normalized = None, None
    try:
        normalized = _check(variant, q, k, v, g, beta, scale, method, layout, cu, initial_state, backend, P,
                            zeco_slices)
    except (ValueError, RuntimeError) as e:  # reported on every rank by agree(), so no rank hangs
        error = str(e)
    if validate and P > 1:
        meta = dict(variant=variant, method=method, layout=layout, local_length=q.shape[1], batch=q.shape[0],
                    heads=q.shape[2], head_dims=(q.shape[-1], v.shape[-1]), dtype=str(q.dtype), cu_seqlens=cu,
                    initial_state=initial_state is not None, output_final_state=output_final_state,
                    zeco_slices=zeco_slices)
        C.agree(meta, error, group, what="seqpar.sp.linear_attention")
    elif error:
        raise InputError(error)
    if P == 1:  # the plain kernel, no communication
        cu_t = torch.tensor(cu, dtype=torch.int64, device=q.device) if cu else None
        return seqpar_kernels.chunk(variant, q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_t, backend=backend)
    g, scale, backend_name = normalized
    spec = _spec(layout, C.rank(group), P, q.shape[0], q.shape[1], tuple(cu) if cu else None, backend_name,
                 get_variant(variant).transition, method, group, scale, zeco_slices, output_final_state)
    o, final = _LinearAttentionSP.apply(q, k, v, g, beta, initial_state, spec)
    return o, (final if output_final_state else None)


def _check(variant, q, k, v, g, beta, scale, method, layout, cu, initial_state, backend, P, zeco_slices):
    var = get_variant(variant)
    if method not in METHODS:
        raise ValueError(f"unknown SP method {method!r}; choose one of {METHODS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if zeco_slices < 1:
        raise ValueError(f"zeco_slices must be >= 1, got {zeco_slices}")
    g, scale = normalize_inputs(var, q, k, v, g, beta, scale, None, None)
    B, T_local, H, K = q.shape
    T = T_local * P
    err = split_error(T, layout, P)
    if err:
        raise InputError(f"global {err} (local length {T_local} on each rank)")
    n_states = B
    if cu is not None:
        _check_cu(tuple(cu), T, B)
        n_states = len(cu) - 1
    if initial_state is not None and initial_state.shape != (n_states, H, K, v.shape[-1]):
        raise InputError(f"initial_state must be [{n_states}, {H}, {K}, {v.shape[-1]}] (one state per "
                         f"{'document' if cu else 'batch row'}); got {tuple(initial_state.shape)}")
    return g, scale, resolve(backend, q.device)


@functools.lru_cache(maxsize=256)
def _spec(layout, rank, P, B, local_len, cu, backend_name, transition, method, group, scale, zeco_slices,
          output_final_state) -> _Spec:
    """What the arguments fix, made once per configuration: the host's work per call is then what
    it issues to the device."""
    return _Spec(plan=make_plan(layout, rank, P, B, local_len, list(cu) if cu else None),
                 kernel=explicit_kernel(backend_name), family=Family(transition), method=method, group=group,
                 scale=scale, zeco_slices=zeco_slices, output_final_state=output_final_state)


@functools.lru_cache(maxsize=256)
def _check_cu(cu: tuple, T: int, B: int) -> None:
    check_cu_seqlens(torch.tensor(cu), T, B, where="cu_seqlens (global document boundaries)")


@dataclass(frozen=True)
class _Indices:
    """The plan as device tensors, made once per (plan, device): the hot path then never copies a
    host list to the GPU (each such copy would stall the host until the stream drains)."""
    first: torch.Tensor      # [n_local, rows]: each shard's first kernel sequence
    last: torch.Tensor       # [n_local, rows]
    whole: torch.Tensor      # [n_local] bool
    starts: torch.Tensor     # kernel sequences that start a document ...
    start_docs: torch.Tensor  # ... and which document
    ends: torch.Tensor       # kernel sequences that end a document ...
    end_docs: torch.Tensor   # ... and which document
    local_cu: torch.Tensor | None


@functools.lru_cache(maxsize=256)
def _indices(plan: Plan, device: torch.device) -> _Indices:
    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=device)

    starts = [(n, s.start_doc) for n, s in enumerate(plan.seqs) if s.start_doc is not None]
    ends = [(n, s.end_doc) for n, s in enumerate(plan.seqs) if s.end_doc is not None]
    return _Indices(t(plan.first), t(plan.last), t(plan.whole, torch.bool),
                    t([n for n, _ in starts]), t([d for _, d in starts]), t([n for n, _ in ends]),
                    t([d for _, d in ends]), t(plan.local_cu) if plan.local_cu is not None else None)


def _rows_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


@functools.lru_cache(maxsize=64)
def _ones(n: int, H: int, dtype, device) -> torch.Tensor:
    """The transitions of ungated shards (never written: every use reads it)."""
    return torch.ones(n, H, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Spec:
    plan: Plan
    kernel: ExplicitKernel
    family: Family
    method: str
    group: object
    scale: float
    zeco_slices: int
    output_final_state: bool

    def scan(self) -> StateScan:
        return StateScan(self.method, self.family, self.plan.chain, self.plan.positions, self.group,
                         self.zeco_slices)

    def indices(self, device) -> _Indices:
        return _indices(self.plan, device)

    # the chain view: one row per kernel sequence (see plan.py) -------------------------------------
    def to_chain(self, x):
        if x is None or self.plan.local_cu is not None:
            return x
        p = self.plan
        return x.reshape(p.B * p.n_local, p.L, *x.shape[2:])

    def from_chain(self, x):
        if x is None or self.plan.local_cu is not None:
            return x
        p = self.plan
        return x.reshape(p.B, p.n_local * p.L, *x.shape[2:])

    def call(self, q, k, v, g, beta, memo: dict) -> Call:
        # memo: the state pass and the kernel run on this one Call share their start-independent work,
        # and the backward gets what the forward kept for it (gla: the intra-chunk matrix)
        # contiguous once here rather than in every entry point (lightning's g is an expanded [H])
        x = (self.to_chain(t).contiguous() if t is not None else None for t in (q, k, v, g, beta))
        return Call(*x, self.scale, self.indices(q.device).local_cu, memo=memo, cu_host=self.plan.local_cu)

    # Between kernel sequences [n_seqs, ...] and local shards [n_local, rows, ...]. Without packed
    # documents, sequence b * n_local + i is row b of shard i: both directions are views.
    def per_shard(self, per_seq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[n_seqs, ...] -> [n_local, rows, ...]: each shard's first or last sequences (idx)."""
        p = self.plan
        if p.local_cu is None:
            return per_seq.view(p.B, p.n_local, *per_seq.shape[1:]).transpose(0, 1)
        return per_seq[idx]

    def scatter(self, per_shard: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        """Inverse of per_shard: [n_seqs, ...], zero except at the shards' sequences (idx)."""
        p = self.plan
        if per_shard is None:
            return None
        if p.local_cu is None:
            return per_shard.transpose(0, 1).reshape(p.B * p.n_local, *per_shard.shape[2:])
        out = per_shard.new_zeros((len(p.seqs),) + tuple(per_shard.shape[2:]))
        return out.index_copy_(0, idx.flatten(), per_shard.flatten(0, 1))

    def known_initial(self, call: Call, initial_state, dtype):
        """Initial state of every kernel sequence that starts a document (others zero); None if
        there is no initial state."""
        if initial_state is None:
            return None
        H, K, V = call.q.shape[2], call.q.shape[3], call.v.shape[3]
        h0 = torch.zeros(len(self.plan.seqs), H, K, V, dtype=dtype, device=call.q.device)
        ix = self.indices(h0.device)
        return h0.index_copy_(0, ix.starts, initial_state[ix.start_docs].to(dtype))

    def docs_final(self, fin):
        """Final states of the documents that end on this rank, summed over ranks: [n_docs, H, K, V]."""
        ix = self.indices(fin.device)
        out = fin.new_zeros((self.plan.n_docs,) + tuple(fin.shape[1:]))
        out.index_copy_(0, ix.end_docs, fin[ix.ends])
        return C.all_reduce_sum(out, self.group)

    def known_final_grad(self, call, dfinal, dtype):
        """Gradient reaching each kernel sequence's final state from the returned final_state (None:
        none does)."""
        if not self.output_final_state:
            return None
        H, K, V = call.q.shape[2], call.q.shape[3], call.v.shape[3]
        if dfinal is None:  # this rank's loss ignores final_state; another rank's may not: all-reduce
            dfinal = torch.zeros(self.plan.n_docs, H, K, V, dtype=dtype, device=call.q.device)
        dht = torch.zeros(len(self.plan.seqs), H, K, V, dtype=dtype, device=call.q.device)
        total = C.all_reduce_sum(dfinal.to(dtype), self.group)
        ix = self.indices(dht.device)
        return dht.index_copy_(0, ix.ends, total[ix.end_docs])

    def initial_grad(self, dh0_seq, like):
        """This rank's share of d(initial_state): the gradients of the sequences that start a document."""
        if like is None:
            return None
        ix = self.indices(like.device)
        return torch.zeros_like(like).index_add_(0, ix.start_docs, dh0_seq[ix.starts].to(like.dtype))

    def transitions(self, call: Call, dense_per_seq, dtype):
        """T of every local shard: [n_local, rows, H] (scalar), [.., H, K] (diagonal), [.., H, K, K]
        (dense, from the state pass); zero for shards cut by a document boundary (their outgoing
        state ignores the incoming one). None where no local shard's T is read (ShardChain.inner)."""
        if not self.plan.needs_transitions:
            return None
        if self.family.name == "dense":
            per_seq = dense_per_seq.to(dtype)
        elif call.g is None:
            per_seq = _ones(len(self.plan.seqs), call.q.shape[2], dtype, call.q.device)
        elif self.plan.local_cu is None:  # one kernel sequence per row: the decay of the whole row
            per_seq = call.g.sum(1, dtype=torch.float64).exp_().to(dtype)
        else:
            per_seq = torch.stack([call.g[s.row, s.start:s.end].to(torch.float64).sum(0).exp().to(dtype)
                                   for s in self.plan.seqs])
        ix = self.indices(per_seq.device)
        T = self.per_shard(per_seq, ix.first)
        if all(self.plan.whole):
            return T
        return torch.where(_rows_mask(ix.whole, T), T, torch.zeros_like(T))


def _on_side_stream(fn, device):
    """Start fn() (a collective and its small folds) on a side CUDA stream and return a function
    that makes the current stream wait for it and returns its result; on the CPU fn runs now."""
    if device.type != "cuda":
        result = fn()
        return lambda: result
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        result = fn()

    def wait():
        main.wait_stream(side)  # also orders the main stream's reuse of what the side stream read
        if result is not None:  # None: a zero state, nothing to hand over
            result.record_stream(main)
        return result

    return wait


_SIDE_STREAMS: dict = {}


def _side_stream(device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _LinearAttentionSP(torch.autograd.Function):
    # The scan applies c_p (a document starting at a shard edge cuts the chain) to what it returns,
    # so S_in and Y need no masking here; None from the scan or a spec method is a zero state.
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, spec: _Spec):
        kernel = spec.kernel
        call = spec.call(q, k, v, g, beta, memo={})
        ix = spec.indices(q.device)
        sdt = wide_dtype(q.dtype)  # the states exchanged between ranks
        h0_known = spec.known_initial(call, initial_state, sdt)
        # a rank holding no shard inside the chain skips the delta rules' K x K transition pass (on
        # two ranks with the contiguous layout, every rank)
        if spec.family.name == "dense" and spec.plan.needs_transitions:
            fin, M = kernel.final_state_and_transition(call, h0_known)
        else:
            fin, M = kernel.final_state(call, h0_known), None
        T = spec.transitions(call, M, sdt)
        dS = spec.per_shard(fin.to(sdt), ix.last)
        scan = spec.scan()
        S_in = _on_side_stream(lambda: scan.forward(T, dS), q.device)
        incoming = {}

        def h0_late():
            incoming["h0"] = spec.scatter(S_in(), ix.first)
            return incoming["h0"]

        o, fin = kernel.forward(call, h0_known, h0_late)
        final = spec.docs_final(fin.to(sdt)) if spec.output_final_state else o.new_empty(0)
        ctx.set_materialize_grads(False)  # no zero fills for gradients that do not arrive
        ctx.spec, ctx.scan = spec, scan
        save_with_memo(ctx, call.memo, q, k, v, g, beta, initial_state, plus_late(h0_known, lambda: incoming["h0"]), T)
        return spec.from_chain(o), final

    @staticmethod
    def backward(ctx, do, dfinal):
        (q, k, v, g, beta, initial_state, h0, T), memo = saved_with_memo(ctx)
        spec, scan, kernel = ctx.spec, ctx.scan, ctx.spec.kernel
        call = spec.call(q, k, v, g, beta, memo=memo)
        ix = spec.indices(q.device)
        do = spec.to_chain(do.contiguous() if do is not None else torch.zeros_like(v))
        sdt = wide_dtype(q.dtype)  # the states exchanged between ranks
        dht = spec.known_final_grad(call, dfinal, sdt)
        D = spec.per_shard(kernel.state_grad(call, do, dht).to(sdt), ix.first)
        Y = _on_side_stream(lambda: scan.backward(D, T), q.device)
        gr = kernel.backward(call, h0, do, dht, lambda: spec.scatter(Y(), ix.last))
        d_init = spec.initial_grad(gr.dh0, initial_state)
        return (spec.from_chain(gr.dq), spec.from_chain(gr.dk), spec.from_chain(gr.dv), spec.from_chain(gr.dg),
                spec.from_chain(gr.dbeta), d_init, None)
