"""Triton chunkwise kernels of the delta-rule family: delta_rule (beta) and gated_delta_rule
(beta and a scalar log gate per token and head), driven through the explicit interface
(seqpar_kernels.explicit):

    forward(call, h0, h0_late=None)            -> (o, ht)
    backward(call, h0, do, dht, dht_late=None) -> Grads(dq, dk, dv, dg, dbeta, dh0)
    final_state(call, h0)                      -> ht   the WY preparation and the state chain alone
    state_grad(call, do, dht)                  -> dh0  the WY preparation and the reverse chain alone

h0_late / dht_late (see explicit.py) are resolved after the WY preparation, which does not depend
on them, so an exchange of states between ranks overlaps it.

The algorithm (delta_kernels.py) is the chunked WY form of chunk_torch._chunk_delta with chunks of
64 tokens. The only sequential work is the state chain over chunks; the backward runs the
recomputed forward chain and the reverse (gradient) chain in one launch, since neither needs the
other. States and chains are fp32; W, U, T, the per-chunk states and the intermediate gradients are
stored in the input dtype, as fla does. Documents packed with cu_seqlens are split into their own
chunks (no chunk straddles a boundary; the chunk table needs the boundaries on the host, one small
device-to-host copy per call, as in fla); B > 1 is handled as B documents of length T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..explicit import Call, Grads, hand_over, plus_late, reuse, take
from ..variants import InputError
from . import delta_kernels as kern
from ._plan import cdiv, dot_precision, next_power_of_2

CHUNK = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Launch settings. The defaults are the combination checked against float64 and timed on an H100
# with triton 3.6 (docs/performance.md, "Delta-rule kernels"); delta_tune.py checks and times
# alternatives. The chains are latency-bound (one program per V block, document and head walks
# every chunk), so they use narrow V blocks for more programs in flight. Long documents can be cut
# into segments: each segment's zero-start state and dense transition come from one parallel pass
# (pass 1), a short fp32 scan over segments gives every segment its start state (pass 2), and
# (forward / backward only) a second parallel pass recomputes the per-chunk states (pass 3). That
# triples the chain work, so alone it pays only where no per-chunk states are needed:
# final_state / state_grad (state_*). Under SP these summaries run first on the same Call, and the
# forward after them reuses their pass 1 (memo): it runs only the scan from the incoming state and
# pass 3, faster than the chain over the whole shard (0.57 against 0.97 ms at 64K), and the reverse
# summary takes the forward's transitions instead of recomputing them (1.13 -> 0.55 ms).
# keep_t: a forward under autograd leaves T (64 values per token and head in the input dtype, as fla
# keeps its A) and the cumulative gate for the backward, whose WY preparation is then wy_apply alone.
# Run 9 (H100): keep_t, bwd_wy at 64 x 64 tiles and 3 stages with dAkk's products in the input dtype
# (as fla's), the output pass as a pipelined loop over K slices and dk's bwd_dqk part in the input
# dtype: forward+backward at 64K from 12.10 to 10.76 ms. Run 10: the chains' gates on product results
# (the loaded K / Q tiles go to the products unchanged; 4.46 -> 2.90 ms for the two chain launches;
# at K > 128 that chain hit an illegal memory access, as the ungated one does, so it keeps the gated
# tiles there, and since run 11 delta_rule above 128 runs that gated path with a zero gate), bwd_wy reading dAkk^T back from a scratch tile at 4 warps (1.76 -> 1.04 ms; fla saw
# wrong gradients from its own 4-warp WY backward on Hopper, fla issue 984, which transposes a
# product: ours does not, and passes every check), the preparation as solve then apply in one
# program (1.26 -> 1.10 ms), the forward's chain in 16-wide V blocks and bwd_dqk's gate term summed
# as it goes (no spill): 10.76 -> 7.92 ms. Run 11: bwd_dqk forms dA^T by its own products (as fast
# as its scratch tile, and simpler) at 3 stages: 7.80 ms; one shard as SP runs it, summaries
# included, from 0.82 to 0.91 of the kernel alone (state segments of 256 chunks, 3 stages);
# delta_rule's launches with a reverse chain on the gated code with a zero gate: 7.48 -> 7.01 ms.
CONFIG = {
    "seg_chunks": 0,  # forward / backward: segments of this many chunks (0: whole documents)
    "chain_bv": 32,  # the backward's chains (forward and reverse side by side)
    "forward_chain_bv": 16,  # the forward pass's chain alone
    "chain_warps": 4,
    "chain_stages": 3,
    "chain_gate_results": True,  # gates scale the chains' product results, not loaded K / Q (K <= 128)
    "state_seg_chunks": 256,  # final_state / state_grad (and under SP the kernel after them)
    "state_bv": 64,
    "state_stages": 3,
    "state_warps": 4,
    "scan_bv": 32,
    "keep_t": True,
    "zero_gate_above": 128,  # delta_rule above this head dim: the gated kernels with a zero gate
    "prep_warps": 4,
    "apply_warps": 4,
    "apply_bk": 128,
    "out_bk": 64,
    "out_bv": 128,
    "out_warps": 8,
    "out_stages": 3,
    "dqk_bk": 128,
    "dqk_bv": 64,
    "dqk_warps": 8,
    "dqk_stages": 3,
    "dk_part_fp32": False,  # bwd_dqk's part of dk, read by bwd_wy: fp32, or the input dtype
    "wy_bk": 64,
    "wy_bv": 64,
    "wy_warps": 4,
    "wy_stages": 3,
    "wy_mid_in_input_dtype": True,  # dAkk = -T^T R T^T from R rounded to the input dtype (fp32 inputs: fp32)
}


WY_INVERSE, WY_GATE = "wy_inverse", "wy_gate"  # memo keys of what a forward keeps for the backward (keep_t)
# memo keys: pass 1 over the state segments (a summary's, for the forward after it) and the
# segments' transitions (the forward's, for the reverse summary)
SUMMARIES, TRANSITIONS = "segment_summaries", "segment_transitions"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(n))


@dataclass
class _Layout:
    """Flattened [B*T, H, D] views of a call and the chunk bookkeeping of its documents."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    g: torch.Tensor | None
    scale: float
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # documents (B without cu_seqlens)
    NT: int  # chunks per sequence (without cu_seqlens)
    n_chunks: int
    cu: torch.Tensor  # int32 [N + 1] token boundaries of the documents
    idx: torch.Tensor  # int32 [n_chunks, 2]: (document, chunk in document) (varlen)
    varlen: bool
    bounds: tuple  # the same boundaries on the host

    @property
    def rows(self) -> int:
        return self.B * self.T

    @property
    def BK(self) -> int:
        return _pow2(self.K)

    def new(self, *shape, dtype=None):
        return torch.empty(*shape, device=self.q.device, dtype=dtype or self.q.dtype)


_PLANS: dict[tuple, tuple] = {}


def _cached(key, build):
    if key not in _PLANS:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = build()
    return _PLANS[key]


def _chunk_plan(bounds, device):
    """(document, chunk in document) of every chunk, as an int32 [n_chunks, 2] tensor."""
    def build():
        idx = [(d, i) for d, (s, e) in enumerate(zip(bounds, bounds[1:])) for i in range(-(-(e - s) // CHUNK))]
        return (torch.tensor(bounds, dtype=torch.int32, device=device),
                torch.tensor(idx, dtype=torch.int32, device=device).view(-1, 2), len(idx))
    return _cached(("chunks", bounds, device), build)


@dataclass(frozen=True)
class _Segments:
    """The documents cut into segments of at most seg_chunks chunks (0: whole documents)."""
    table: torch.Tensor  # int32 [n, 4]: (document, first token, number of chunks, global first chunk)
    first: torch.Tensor  # int32 [N + 1]: each document's first segment
    n: int
    cut: bool  # some document has more than one


def _segments(L: _Layout, seg_chunks: int) -> _Segments:
    def build():
        rows, first, goff, cut = [], [0], 0, False
        for d, (s, e) in enumerate(zip(L.bounds, L.bounds[1:])):
            nt = -(-(e - s) // CHUNK)
            step = seg_chunks if seg_chunks > 0 else nt
            rows += [(d, s + c * CHUNK, min(step, nt - c), goff + c) for c in range(0, nt, step)]
            cut = cut or nt > step
            goff += nt
            first.append(len(rows))
        dev = L.q.device
        return _Segments(torch.tensor(rows, dtype=torch.int32, device=dev).view(-1, 4),
                         torch.tensor(first, dtype=torch.int32, device=dev), len(rows), cut)
    return _cached(("segments", L.bounds, seg_chunks, L.q.device), build)


def _layout(call: Call) -> _Layout:
    q, k, v = call.q, call.k, call.v
    if call.beta is None:
        raise InputError("the Triton delta-rule kernels need beta (delta_rule / gated_delta_rule)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"the Triton delta-rule kernels take float16, bfloat16 or float32 inputs, got {q.dtype}; "
                         "use backend='torch' for float64")
    if call.g is not None and call.g.dim() != 3:
        raise InputError(f"the delta-rule kernels take a scalar gate per token and head, g [B, T, H]; "
                         f"got shape {tuple(call.g.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise InputError(f"the Triton delta-rule kernels support head dims up to {MAX_HEAD_DIM}, got K={K}, V={V}")
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
    g = flat(call.g) if call.g is not None else None
    if g is None and max(K, V) > CONFIG["zero_gate_above"]:
        # the ungated chains above 128 hit an illegal memory access on an H100 (Triton 3.6), the gated
        # ones pass: delta_rule runs as gated_delta_rule with a zero gate (its gradient dropped)
        g = _zeros(B * T, H, q.device)
    bounds = call.boundaries()
    cu, idx, n_chunks = _chunk_plan(bounds, q.device)
    varlen = call.cu_seqlens is not None
    NT = 0 if varlen else -(-T // CHUNK)
    return _Layout(flat(q), flat(k), flat(v), flat(call.beta), g,
                   call.scale, B, T, H, K, V, len(bounds) - 1, NT, n_chunks, cu, idx, varlen, bounds)


@dataclass
class _WY:
    gc: torch.Tensor | None  # cumulative in-chunk gate, fp32 [rows, H]
    w: torch.Tensor  # [rows, H, K]
    u: torch.Tensor | None  # [rows, H, V]
    t: torch.Tensor | None  # (I + Akk)^-1, [rows, H, 64]
    dvl: torch.Tensor | None  # local part of dVn, [rows, H, V]


def _prep(L: _Layout, *, store_u: bool, do: torch.Tensor | None = None, kept=None) -> _WY:
    """The WY preparation: wy_solve_apply, or wy_apply alone from `kept`, the forward's
    (T, cumulative gate)."""
    w = L.new(L.rows, L.H, L.K)
    u = L.new(L.rows, L.H, L.V) if store_u else None
    dvl = L.new(L.rows, L.H, L.V) if do is not None else None
    use_g = L.g is not None
    any_ = w
    pick = lambda x: x if x is not None else any_  # noqa: E731
    opts = dict(BK=min(L.BK, CONFIG["apply_bk"]), BV=min(_pow2(L.V), 128), IS_VARLEN=L.varlen, USE_G=use_g,
                STORE_U=store_u, DO_DVL=do is not None)
    if kept is not None:
        t, gc = kept
        kern.wy_apply[(L.n_chunks, L.H)](
            L.k, L.v, L.beta, pick(gc), t, L.q, pick(do), w, pick(u), pick(dvl), L.scale,
            L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V, **opts, **_launch(L, CONFIG["apply_warps"]))
    else:
        gc = L.new(L.rows, L.H, dtype=torch.float32) if use_g else None
        t = L.new(L.rows, L.H, CHUNK)
        kern.wy_solve_apply[(L.n_chunks, L.H)](
            L.k, L.v, L.beta, pick(L.g), L.q, pick(do), pick(gc), t, w, pick(u), pick(dvl), L.scale,
            L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V, **opts, **_launch(L, CONFIG["prep_warps"]))
    return _WY(gc, w, u, t, dvl)


# The WY preparation does not depend on the start state, so a state pass (keep=True) and the kernel
# after it on the same Call compute it once, shared through call.memo.

def _forward_wy(call: Call, L: _Layout, *, keep: bool) -> _WY:
    """The forward's WY preparation (final_state's, kept for the forward after it)."""
    return reuse(call.memo, "forward", None, keep, lambda: _prep(L, store_u=True))


def _backward_wy(call: Call, L: _Layout, do_in, do, *, keep: bool, store: bool) -> _WY:
    """The backward's WY preparation for the gradient `do_in` (state_grad's, kept for the backward
    after it), from the T the forward kept where it did; store: U too (the full backward)."""
    def build():
        t, gc = take(call.memo, WY_INVERSE), take(call.memo, WY_GATE)
        return _prep(L, store_u=store, do=do, kept=(t, gc) if t is not None else None)
    return reuse(call.memo, "backward", do_in, keep, build)


@dataclass
class _States:
    h: torch.Tensor | None = None  # state at every chunk start [n_chunks, H, K, V]
    vn: torch.Tensor | None = None  # U - W S  [rows, H, V]
    ht: torch.Tensor | None = None  # final state, fp32 [N, H, K, V]
    dh: torch.Tensor | None = None  # gradient of every chunk's end state [n_chunks, H, K, V]
    dvn: torch.Tensor | None = None  # gradient of Vn [rows, H, V]
    dh0: torch.Tensor | None = None  # gradient of the initial state, fp32 [N, H, K, V]
    m: torch.Tensor | None = None  # the segments' transitions, where the chains ran over segments


def _pass(L: _Layout, wy: _WY, sg: _Segments, *, forward=False, reverse=False, fwd_v=True, with_m=False,
          finit=None, rinit=None, fout=None, m=None, rout=None, r: _States | None = None, do=None,
          bv=32, stages=2, warps=4):
    """One launch of state_pass over the segments `sg`; r receives the per-chunk tensors (STORE)."""
    bv = min(_pow2(L.V), bv)
    nvb = cdiv(L.V, bv)
    cols = max(nvb * int(forward and fwd_v) + cdiv(L.K, bv) * int(forward and with_m), nvb * int(reverse))
    any_ = wy.w
    pick = lambda x: x if x is not None else any_  # noqa: E731
    store = r is not None
    # the reverse chain always carries a gate (delta_kernels._reverse_chain): zero for delta_rule;
    # a forward chain alone runs faster ungated
    gc = _zeros(L.rows, L.H, L.q.device) if wy.gc is None and reverse else wy.gc
    kern.state_pass[(cols, sg.n * L.H, int(forward) + int(reverse))](
        L.q, L.k, pick(gc), wy.w, pick(wy.u), pick(do), pick(wy.dvl),
        pick(finit), pick(r.h if store else None), pick(r.vn if store else None), pick(fout), pick(m),
        pick(rinit), pick(r.dh if store else None), pick(r.dvn if store else None), pick(rout),
        L.scale, sg.table, L.cu, L.T, L.H, L.K, L.V, nvb,
        BK=L.BK, BV=bv, IS_VARLEN=L.varlen, USE_G=gc is not None, FORWARD=forward, REVERSE=reverse,
        FWD_V=fwd_v, WITH_M=with_m, FINIT=int(finit is not None), RINIT=int(rinit is not None),
        STORE=store, WRITE_FINAL=fout is not None or m is not None or rout is not None,
        GATE_RESULTS=CONFIG["chain_gate_results"] and L.K <= 128,
        **_launch(L, warps, stages))


def _zeros(rows: int, H: int, device) -> torch.Tensor:
    """A zero gate (fp32 [rows, H]; zero cumulated too), made once per shape and never written."""
    return _cached(("zeros", rows, H, device), lambda: torch.zeros(rows, H, dtype=torch.float32, device=device))


def _eye(L: _Layout) -> torch.Tensor:
    """Identity start states (fp32 [N, H, K, K]), made once per shape and never written."""
    return _cached(("eye", L.N, L.H, L.K, L.q.device), lambda: torch.eye(
        L.K, dtype=torch.float32, device=L.q.device).expand(L.N, L.H, L.K, L.K).contiguous())


def _launch(L: _Layout, warps: int, stages: int | None = None) -> dict:
    """Launch options: warps, pipeline depth, and the precision of the matrix products (DOT)."""
    opts = dict(num_warps=warps, DOT=dot_precision(L.q.dtype))
    if stages is not None:
        opts["num_stages"] = _stages(L, stages)
    return opts


def _stages(L: _Layout, stages: int) -> int:
    """Software-pipeline depth for 16-bit inputs at K <= 128; else 1: pipelined stages of fp32 tiles
    (or K = 256) overflow Hopper's 227 KB of shared memory (the H100 check measured 337 KB for the
    chains at 3 stages and 288 KB for bwd_dqk and bwd_wy at 2)."""
    return stages if L.K <= 128 and L.q.element_size() <= 2 else 1


def _chains(L: _Layout, wy: _WY, *, forward: bool, reverse: bool, store: bool,
            h0=None, do=None, dht=None, first=None) -> _States:
    """The forward state chain, the reverse gradient chain or both (side by side), with the
    per-chunk states and Vn / dVn when `store`. first: pass 1 of the state segments, (fsum, m),
    computed by a summary pass on the same Call (under SP): the chains are then the scan over
    segments and pass 3, whose parallel segments are faster than one chain over the document."""
    f32 = torch.float32
    r = _States()
    if store:
        if forward:
            r.h, r.vn = L.new(L.n_chunks, L.H, L.K, L.V), L.new(L.rows, L.H, L.V)
        if reverse:
            r.dh, r.dvn = L.new(L.n_chunks, L.H, L.K, L.V), L.new(L.rows, L.H, L.V)
    h0 = h0.to(f32).contiguous() if h0 is not None else None
    dht = dht.to(f32).contiguous() if dht is not None else None
    if store and first is None:  # the forward's chain alone runs best in narrower V blocks than the pair
        sg = _segments(L, CONFIG["seg_chunks"])
        launch = dict(bv=CONFIG["chain_bv"] if reverse else CONFIG["forward_chain_bv"],
                      stages=CONFIG["chain_stages"], warps=CONFIG["chain_warps"])
    else:
        sg, launch = _state_segments(L), _state_launch()
    if not sg.cut:  # one segment per document: the chains start from h0 / dht and end at ht / dh0
        r.ht = L.new(L.N, L.H, L.K, L.V, dtype=f32) if forward else None
        r.dh0 = L.new(L.N, L.H, L.K, L.V, dtype=f32) if reverse else None
        _pass(L, wy, sg, forward=forward, reverse=reverse, finit=h0, rinit=dht,
              fout=r.ht, rout=r.dh0, r=r if store else None, do=do, **launch)
        return r
    fsum, m, rsum = (*first, None) if first is not None else _summaries(L, wy, sg, forward=forward,
                                                                        reverse=reverse, do=do, **launch)
    start, r.ht, grad, r.dh0 = _scan(L, sg, m, fsum=fsum, h0=h0, rsum=rsum, dht=dht)
    r.m = m
    if store:  # 3. the per-chunk states, every segment from its true start
        _pass(L, wy, sg, forward=forward, reverse=reverse, finit=start, rinit=grad, r=r, do=do, **launch)
    return r


def _state_segments(L: _Layout) -> _Segments:
    """The segments of the summaries (final_state / state_grad) and, under SP, of the kernel after them."""
    return _segments(L, CONFIG["state_seg_chunks"])


def _state_launch() -> dict:
    return dict(bv=CONFIG["state_bv"], stages=CONFIG["state_stages"], warps=CONFIG["state_warps"])


def _summaries(L: _Layout, wy: _WY, sg: _Segments, *, forward: bool, reverse: bool, m=None, do=None, **launch):
    """Pass 1 of the segmented chains: every segment from zero, its final state fsum (forward) and
    the gradient reaching its start rsum (reverse), and its dense transition m unless given (the
    forward's, kept for the reverse scan): (fsum, m, rsum), fp32."""
    f32 = torch.float32
    fsum = L.new(sg.n, L.H, L.K, L.V, dtype=f32) if forward else None
    rsum = L.new(sg.n, L.H, L.K, L.V, dtype=f32) if reverse else None
    with_m = m is None
    if with_m:
        m = L.new(sg.n, L.H, L.K, L.K, dtype=f32)
    _pass(L, wy, sg, forward=forward or with_m, reverse=reverse, fwd_v=forward, with_m=with_m,
          fout=fsum, m=m if with_m else None, rout=rsum, do=do, **(launch or _state_launch()))
    return fsum, m, rsum


def _scan(L: _Layout, sg: _Segments, m, *, fsum=None, h0=None, rsum=None, dht=None, transitions=False):
    """Pass 2, the scan over segments in fp32: every segment's start state and the documents' final
    states (from fsum and h0), every segment's end-state gradient and the documents' initial-state
    gradients (from rsum and dht): (start, ht, grad, dh0), None for a direction not asked for.
    transitions: ht is each document's transition instead (from the identity, no sums)."""
    f32 = torch.float32
    forward, reverse = fsum is not None or transitions, rsum is not None
    V = L.K if transitions else L.V
    if transitions:
        h0 = _eye(L)
    start, grad = (L.new(sg.n, L.H, L.K, V, dtype=f32) if x else None for x in (forward, reverse))
    ht, dh0 = (L.new(L.N, L.H, L.K, V, dtype=f32) if x else None for x in (forward, reverse))
    scan_bv = min(_pow2(V), CONFIG["scan_bv"])
    h0, dht = (x.to(f32).contiguous() if x is not None else None for x in (h0, dht))
    pick = lambda x: x if x is not None else m  # noqa: E731
    kern.segment_scan[(cdiv(V, scan_bv), L.N * L.H, int(forward) + int(reverse))](
        m, pick(fsum), pick(rsum), pick(h0), pick(start), pick(ht), pick(dht), pick(grad), pick(dh0),
        sg.first, L.H, L.K, V, BK=L.BK, BV=scan_bv, KB=min(L.BK, 32), FORWARD=forward, REVERSE=reverse,
        USE_H0=h0 is not None, USE_DHT=dht is not None, USE_SUMS=not transitions, num_warps=4)
    return start, ht, grad, dh0


def _unflat(L: _Layout, x: torch.Tensor) -> torch.Tensor:
    return x.view(L.B, L.T, *x.shape[1:])


def forward(call: Call, h0, h0_late=None):
    L = _layout(call)
    wy = _forward_wy(call, L, keep=False)
    if CONFIG["keep_t"] and call.memo is not None:  # under autograd: T and the gate go to the backward
        hand_over(call.memo, WY_INVERSE, wy.t)
        if wy.gc is not None:
            hand_over(call.memo, WY_GATE, wy.gc)
    first = take(call.memo, SUMMARIES)  # a summary ran on this Call (SP): pass 1 is done
    st = _chains(L, wy, forward=True, reverse=False, store=True, h0=plus_late(h0, h0_late), first=first)
    if first is not None and st.m is not None:  # the reverse summary's scan needs the transitions
        hand_over(call.memo, TRANSITIONS, st.m)
    o = L.new(L.rows, L.H, L.V, dtype=call.v.dtype)
    bv = min(_pow2(L.V), CONFIG["out_bv"])
    kern.output[(L.n_chunks, L.H, cdiv(L.V, bv))](
        L.q, L.k, wy.gc if wy.gc is not None else wy.w, st.h, st.vn, o, L.scale,
        L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V,
        BK=min(L.BK, CONFIG["out_bk"]), BV=bv, IS_VARLEN=L.varlen, USE_G=L.g is not None,
        **_launch(L, CONFIG["out_warps"], CONFIG["out_stages"]))
    return _unflat(L, o), st.ht


def _forward_summaries(call: Call, L: _Layout, wy: _WY, sg: _Segments):
    """Pass 1 of the forward chain over the state segments, (fsum, m), kept in the memo: a forward
    on the same Call (under SP, after this summary) then runs only the scan and pass 3."""
    return reuse(call.memo, SUMMARIES, None, True, lambda: _summaries(L, wy, sg, forward=True, reverse=False)[:2])


def final_state(call: Call, h0):
    L = _layout(call)
    wy = _forward_wy(call, L, keep=True)
    sg = _state_segments(L)
    if not sg.cut:
        return _chains(L, wy, forward=True, reverse=False, store=False, h0=h0).ht
    fsum, m = _forward_summaries(call, L, wy, sg)
    return _scan(L, sg, m, fsum=fsum, h0=h0)[1]


def final_state_and_transition(call: Call, h0):
    """(ht, M) of every sequence from one pass over the segments (each from zero, with its dense
    K x K transition: what final_state computes anyway), then two scans over segments: the states
    from h0 (S <- M_s S + F_s) and the transitions from the identity (M <- M_s M)."""
    L = _layout(call)
    wy = _forward_wy(call, L, keep=True)
    sg = _state_segments(L)
    fsum, m = _forward_summaries(call, L, wy, sg)
    return _scan(L, sg, m, fsum=fsum, h0=h0)[1], _scan(L, sg, m, transitions=True)[1]


def state_grad(call: Call, do, dht):
    L = _layout(call)
    do_in, do = do, do.reshape(L.rows, L.H, L.V).to(L.q.dtype).contiguous()
    full = call.memo is not None  # then the preparation is the backward's, kept for it
    wy = _backward_wy(call, L, do_in, do, keep=True, store=full)
    sg = _state_segments(L)
    m = take(call.memo, TRANSITIONS)  # the forward's, where it ran over these segments
    if not sg.cut:
        return _chains(L, wy, forward=False, reverse=True, store=False, do=do, dht=dht).dh0
    _, m, rsum = _summaries(L, wy, sg, forward=False, reverse=True, m=m, do=do)
    return _scan(L, sg, m, rsum=rsum, dht=dht)[3]


def backward(call: Call, h0, do, dht, dht_late=None) -> Grads:
    L = _layout(call)
    do_in, do = do, do.reshape(L.rows, L.H, L.V).to(L.q.dtype).contiguous()
    wy = _backward_wy(call, L, do_in, do, keep=False, store=True)
    st = _chains(L, wy, forward=True, reverse=True, store=True, h0=h0, do=do, dht=plus_late(dht, dht_late))
    h, vn, dh, dvn = st.h, st.vn, st.dh, st.dvn
    use_g = L.g is not None
    gc = wy.gc if use_g else wy.w
    f32 = torch.float32
    bk = min(L.BK, CONFIG["dqk_bk"])
    nk = cdiv(L.K, bk)
    dq = L.new(L.rows, L.H, L.K)
    dk_part = L.new(L.rows, L.H, L.K, dtype=f32 if CONFIG["dk_part_fp32"] else None)
    dw = L.new(L.rows, L.H, L.K)
    dg_part = L.new(nk, L.rows, L.H, dtype=f32) if use_g else dw
    kern.bwd_dqk[(L.n_chunks, L.H, nk)](
        L.q, L.k, gc, h, vn, do, dh, dvn, dq, dk_part, dw, dg_part, L.scale,
        L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V, L.rows,
        BK=bk, BV=min(_pow2(L.V), CONFIG["dqk_bv"]), IS_VARLEN=L.varlen, USE_G=use_g,
        **_launch(L, CONFIG["dqk_warps"], CONFIG["dqk_stages"]))
    dk = L.new(L.rows, L.H, L.K)
    dv = L.new(L.rows, L.H, L.V, dtype=call.v.dtype)
    dbeta = L.new(L.rows, L.H, dtype=call.beta.dtype)
    dg = L.new(L.rows, L.H, dtype=L.g.dtype) if use_g else None
    scratch = L.new(L.rows, L.H, CHUNK)  # a 64 x 64 tile per chunk and head: dAkk, read back transposed
    kern.bwd_wy[(L.n_chunks, L.H)](
        L.k, L.v, L.beta, gc, wy.t, dw, dvn, dk_part, dg_part, scratch, dk, dv, dbeta, dg if use_g else dw,
        L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V, L.rows,
        BK=min(L.BK, CONFIG["wy_bk"]), BV=min(_pow2(L.V), CONFIG["wy_bv"]), NK=nk,
        IS_VARLEN=L.varlen, USE_G=use_g, MID_IN_INPUT_DTYPE=CONFIG["wy_mid_in_input_dtype"],
        **_launch(L, CONFIG["wy_warps"], CONFIG["wy_stages"]))
    return Grads(_unflat(L, dq).to(call.q.dtype), _unflat(L, dk).to(call.k.dtype), _unflat(L, dv),
                 _unflat(L, dg) if call.g is not None else None, _unflat(L, dbeta), st.dh0)
