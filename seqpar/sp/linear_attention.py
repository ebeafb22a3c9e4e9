"""Sequence-parallel linear attention: each rank runs the single-device kernel on its shard and
exchanges only fixed-size state summaries (see seqpar.comm.scan for the methods).

Forward, per local shard p:  (T_p, dS_p) -> scan -> S_in(p) -> outputs with S_in(p) as initial state.
* scalar / diagonal transitions (linear_attn, lightning, simple_gla, gla): one kernel call from a
  zero incoming state; S_in's contribution is added afterwards as a correction,
  o_t += scale * (q_t * exp(G_t)) S_in, where G is the cumulative log decay from the shard start.
  Backward likewise: one kernel backward, then corrections from S_in and from the gradient Y that
  the scan returns for the shard's outgoing state; the gate gradient follows from the identity
  dG_t = q_t.dq_t - k_t.dk_t (+ <S_final, dS_final> at the last token), reverse-accumulated.
* dense transitions (delta_rule, gated_delta_rule): a state pass gives (dS_p, M_p), the scan gives
  S_in, then the kernel runs with S_in as its initial state. Backward: the state gradient of the
  shard's own outputs first, the reverse scan, then the kernel backward.

Gradients of replicated inputs (initial_state) are this rank's share: summed over the SP group they
give the full gradient, as for any parameter under data/sequence parallelism. The gradient of the
returned final_state is summed over ranks (every rank's loss counts).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import seqpar_kernels
from seqpar.comm import Family, StateScan
from seqpar.comm import collectives as C
from seqpar_kernels import InputError, get_variant
from seqpar_kernels.backends import resolve
from seqpar_kernels.explicit import Call, ExplicitKernel, explicit_kernel
from seqpar_kernels.variants import check_cu_seqlens, normalize_inputs

from .layout import LAYOUTS, split_error
from .plan import Plan, Seq, make_plan

METHODS = ("lasp2", "zeco", "ring")


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
    spec = _Spec(
        plan=_plan(layout, C.rank(group), P, q.shape[0], q.shape[1], tuple(cu) if cu else None),
        kernel=explicit_kernel(backend_name),
        family=Family(get_variant(variant).transition),
        method=method, group=group, scale=scale, zeco_slices=zeco_slices,
        output_final_state=output_final_state, has_initial_state=initial_state is not None,
    )
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
        check_cu_seqlens(torch.tensor(cu), T, B, where="cu_seqlens (global document boundaries)")
        n_states = len(cu) - 1
    if initial_state is not None and initial_state.shape != (n_states, H, K, v.shape[-1]):
        raise InputError(f"initial_state must be [{n_states}, {H}, {K}, {v.shape[-1]}] (one state per "
                         f"{'document' if cu else 'batch row'}); got {tuple(initial_state.shape)}")
    return g, scale, resolve(backend, q.device)


@functools.lru_cache(maxsize=256)
def _plan(layout, rank, P, B, local_len, cu) -> Plan:
    return make_plan(layout, rank, P, B, local_len, list(cu) if cu else None)


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
    has_initial_state: bool

    def scan(self) -> StateScan:
        return StateScan(self.method, self.family, self.plan.chain, self.plan.positions, self.group,
                         self.zeco_slices)

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

    def call(self, q, k, v, g, beta) -> Call:
        cu = self.plan.local_cu
        cu_t = torch.tensor(cu, dtype=torch.int64, device=q.device) if cu is not None else None
        return Call(*(self.to_chain(x) for x in (q, k, v, g, beta)), self.scale, cu_t)

    def per_shard(self, per_seq: torch.Tensor, which) -> torch.Tensor:
        """[n_seqs, ...] -> [n_local, chain_rows, ...] picking each shard's first or last sequence."""
        return torch.stack([per_seq[list(idx)] for idx in which])

    def scatter(self, per_shard: torch.Tensor, which, n_seqs: int, mask=None) -> torch.Tensor:
        """Inverse of per_shard: a [n_seqs, ...] tensor, zero except at the shards' sequences."""
        out = per_shard.new_zeros((n_seqs,) + tuple(per_shard.shape[2:]))
        for i, idx in enumerate(which):
            if mask is None or mask[i]:
                out[list(idx)] += per_shard[i]
        return out

    def state_zeros(self, call: Call, dtype, cols: int | None = None):
        H, K, V = call.q.shape[2], call.q.shape[3], call.v.shape[3]
        return torch.zeros(len(self.plan.seqs), H, K, cols or V, dtype=dtype, device=call.q.device)

    def known_initial(self, call: Call, initial_state, dtype):
        """Initial state of every kernel sequence that starts a document (others zero)."""
        h0 = self.state_zeros(call, dtype)
        if initial_state is not None:
            for n, s in enumerate(self.plan.seqs):
                if s.start_doc is not None:
                    h0[n] = initial_state[s.start_doc]
        return h0

    def docs_final(self, fin):
        """Final states of the documents that end on this rank, summed over ranks: [n_docs, H, K, V]."""
        out = fin.new_zeros((self.plan.n_docs,) + tuple(fin.shape[1:]))
        for n, s in enumerate(self.plan.seqs):
            if s.end_doc is not None:
                out[s.end_doc] = fin[n]
        return C.all_reduce_sum(out, self.group)

    def known_final_grad(self, call, dfinal, dtype):
        """Gradient reaching each kernel sequence's final state from the returned final_state."""
        dht = self.state_zeros(call, dtype)
        if self.output_final_state and dfinal is not None:
            total = C.all_reduce_sum(dfinal.to(dtype), self.group)
            for n, s in enumerate(self.plan.seqs):
                if s.end_doc is not None:
                    dht[n] = total[s.end_doc]
        return dht

    def initial_grad(self, dh0_seq, X0, like):
        """This rank's share of d(initial_state)."""
        if not self.has_initial_state:
            return None
        if self.plan.local_cu is None:  # the initial state enters through the scan at shard 0
            return X0.to(like.dtype) if X0 is not None else torch.zeros_like(like)
        d = torch.zeros_like(like)
        for n, s in enumerate(self.plan.seqs):
            if s.start_doc is not None:
                d[s.start_doc] += dh0_seq[n].to(like.dtype)
        return d


def _seq(x, s: Seq):
    return x[s.row, s.start:s.end]


def _log_decays(call: Call, s: Seq, dtype, K: int):
    """Cumulative log decay G along sequence s, as [len, H, K] (zeros if the variant has no gate).
    Decay ratios are formed as exp(G_i - G_j) with G_i >= G_j, never by dividing exponentials."""
    if call.g is None:
        G = torch.zeros(s.end - s.start, call.q.shape[2], dtype=dtype, device=call.q.device)
    else:
        G = _seq(call.g, s).to(dtype).cumsum(0)
    return G[..., None].expand(*G.shape, K) if G.dim() == 2 else G


def _transitions(spec: _Spec, call: Call, dtype):
    """T of every local shard: [n_local, rows, H] (scalar), [.., H, K] (diagonal), [.., H, K, K] (dense);
    zero for shards cut by a document boundary (their outgoing state ignores the incoming one)."""
    plan = spec.plan
    if spec.family.name == "dense":
        per_seq = spec.kernel.transition(call).to(dtype)
    else:
        K = call.q.shape[3]
        per_seq = torch.stack([_log_decays(call, s, dtype, K)[-1].exp() for s in plan.seqs])
        if spec.family.name == "scalar":
            per_seq = per_seq[..., 0]
    T = spec.per_shard(per_seq, plan.first)
    whole = torch.tensor(plan.whole, device=T.device).view(-1, *([1] * (T.dim() - 1)))
    return torch.where(whole, T, torch.zeros_like(T))


class _LinearAttentionSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, spec: _Spec):
        plan, kernel = spec.plan, spec.kernel
        call = spec.call(q, k, v, g, beta)
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        h0_known = spec.known_initial(call, initial_state, sdt)
        scan = spec.scan()
        T = _transitions(spec, call, sdt)
        x0 = initial_state.to(sdt) if (initial_state is not None and plan.local_cu is None) else None
        if spec.family.name == "dense":
            fin = kernel.final_state(call, h0_known)
            S_in = scan.forward(T, spec.per_shard(fin.to(sdt), plan.last), x0)
            h0 = h0_known + spec.scatter(S_in, plan.first, len(plan.seqs), plan.continues)
            o, fin = kernel.forward(call, h0)
        else:
            o, fin = kernel.forward(call, h0_known)
            fin = fin.to(sdt)
            S_in = scan.forward(T, spec.per_shard(fin, plan.last), x0)
            h0 = h0_known
            o, fin = _add_incoming(spec, call, o, fin, S_in)
        final = spec.docs_final(fin) if spec.output_final_state else o.new_zeros(0)
        ctx.spec, ctx.scan = spec, scan
        ctx.save_for_backward(q, k, v, g, beta, initial_state, h0, S_in, fin, T)
        return spec.from_chain(o), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state, h0, S_in, fin, T = ctx.saved_tensors
        spec, scan, plan, kernel = ctx.spec, ctx.scan, ctx.spec.plan, ctx.spec.kernel
        call = spec.call(q, k, v, g, beta)
        do = spec.to_chain(do.contiguous())
        sdt = S_in.dtype
        dht = spec.known_final_grad(call, dfinal, sdt)
        n_seqs = len(plan.seqs)
        keep = torch.tensor(plan.continues, device=S_in.device).view(-1, *([1] * (S_in.dim() - 1)))
        if spec.family.name == "dense":
            D = spec.per_shard(kernel.state_grad(call, do, dht).to(sdt), plan.first)
            Y, X0 = scan.backward(torch.where(keep, D, torch.zeros_like(D)), T)
            dht = dht + spec.scatter(Y, plan.last, n_seqs)
            gr = kernel.backward(call, h0, do, dht)
            dq, dk, dv, dg, dbeta, dh0 = gr.dq, gr.dk, gr.dv, gr.dg, gr.dbeta, gr.dh0
        else:
            gr = kernel.backward(call, h0, do, dht)
            D = spec.per_shard(gr.dh0.to(sdt), plan.first)
            Y, X0 = scan.backward(torch.where(keep, D, torch.zeros_like(D)), T)
            dq, dk, dv, dh0, dht = _add_incoming_grads(spec, call, do, gr, S_in, Y, dht)
            dg = _gate_grad(spec, call, dq, dk, fin, dht) if ctx.needs_input_grad[3] else None
            dbeta = None
        d_init = spec.initial_grad(dh0, X0, initial_state) if initial_state is not None else None
        return (spec.from_chain(dq), spec.from_chain(dk), spec.from_chain(dv), spec.from_chain(dg),
                spec.from_chain(dbeta), d_init, None)


def _add_incoming(spec: _Spec, call: Call, o, fin, S_in):
    """Scalar/diagonal transitions: add S_in's contribution to the outputs and final states of the
    first sequence of every shard that continues its predecessor."""
    plan, K, sdt = spec.plan, call.q.shape[3], S_in.dtype
    o = o.clone()
    fin = fin.clone()
    for i, idx in enumerate(plan.first):
        if not plan.continues[i]:
            continue
        for r, n in enumerate(idx):
            s, S = plan.seqs[n], S_in[i, r]
            decay = _log_decays(call, s, sdt, K).exp()  # [len, H, K]
            qd = _seq(call.q, s).to(sdt) * decay
            o[s.row, s.start:s.end] += (spec.scale * torch.einsum("thk,hkv->thv", qd, S)).to(o.dtype)
            fin[n] += decay[-1][..., None] * S
    return o, fin


def _add_incoming_grads(spec: _Spec, call: Call, do, gr, S_in, Y, dht):
    """Corrections of the zero-incoming-state backward: dq from S_in, dk and dv from Y (the gradient
    reaching each shard's outgoing state), and the initial-state gradient of document starts."""
    plan, K = spec.plan, call.q.shape[3]
    sdt = S_in.dtype
    dq, dk, dv, dh0 = gr.dq.to(sdt), gr.dk.to(sdt), gr.dv.to(sdt), gr.dh0.to(sdt)
    for i, idx in enumerate(plan.first):
        if not plan.continues[i]:
            continue
        for r, n in enumerate(idx):
            s = plan.seqs[n]
            decay = _log_decays(call, s, sdt, K).exp()
            dq[s.row, s.start:s.end] += spec.scale * decay * torch.einsum("thv,hkv->thk", _seq(do, s).to(sdt), S_in[i, r])
    for i, idx in enumerate(plan.last):
        for r, n in enumerate(idx):
            s, Yr = plan.seqs[n], Y[i, r]
            G = _log_decays(call, s, sdt, K)
            to_end = (G[-1] - G).exp()
            dk[s.row, s.start:s.end] += to_end * torch.einsum("thv,hkv->thk", _seq(call.v, s).to(sdt), Yr)
            dv[s.row, s.start:s.end] += torch.einsum("thk,hkv->thv", _seq(call.k, s).to(sdt) * to_end, Yr)
            dh0[n] += G[-1].exp()[..., None] * Yr
            dht[n] += Yr
    return dq.to(call.q.dtype), dk.to(call.k.dtype), dv.to(call.v.dtype), dh0, dht


def _gate_grad(spec: _Spec, call: Call, dq, dk, fin, dht):
    """dG_t = q_t.dq_t - k_t.dk_t (per key channel for gla), plus <S_final, dS_final> at each
    sequence's last token; dg is its reverse cumulative sum within each sequence."""
    sdt = fin.dtype
    dG = call.q.to(sdt) * dq.to(sdt) - call.k.to(sdt) * dk.to(sdt)  # [.., T, H, K]
    scalar = call.g.dim() == 3
    if scalar:
        dG = dG.sum(-1)
    dg = torch.empty_like(dG)
    for n, s in enumerate(spec.plan.seqs):
        part = _seq(dG, s).clone()
        end = (fin[n] * dht[n]).sum(-1)  # [H, K]
        part[-1] += end.sum(-1) if scalar else end
        dg[s.row, s.start:s.end] = part.flip(0).cumsum(0).flip(0)
    return dg.to(call.g.dtype)
