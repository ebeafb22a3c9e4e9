"""Triton chunkwise kernels of the delta-rule family: delta_rule (beta) and gated_delta_rule
(beta and a scalar log gate per token and head), driven through the explicit interface
(seqpar_kernels.explicit):

    forward(call, h0)             -> (o, ht)
    backward(call, h0, do, dht)   -> Grads(dq, dk, dv, dg, dbeta, dh0)
    final_state(call, h0)         -> ht      the WY preparation and the state chain, nothing else
    state_grad(call, do, dht)     -> dh0     the WY preparation and the reverse chain, nothing else

The algorithm (delta_kernels.py) is the chunked WY form of chunk_torch._chunk_delta with chunks of
64 tokens. The only sequential work is the state chain over chunks; the backward runs the
recomputed forward chain and the reverse (gradient) chain in one launch, since neither needs the
other. States and chains are fp32; W, U, T, the per-chunk states and the intermediate gradients are
stored in the input dtype, as fla does. Documents packed with cu_seqlens are split into their own
chunks (no chunk straddles a boundary); B > 1 is handled as B documents of length T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..explicit import Call, Grads
from . import delta_kernels as kern

CHUNK = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Launch settings. The chains are latency-bound (one program per V block, document and head walks
# every chunk), so they use narrow V blocks for more programs in flight; the parallel kernels use
# 8 warps for their 64 x 128 fp32 accumulators. bwd_wy stays at 8 warps: fla saw wrong dk/dbeta
# from a 64-token WY backward with 4 warps on Hopper with triton 3.6 (fla issue 984).
CONFIG = {
    "prep_warps": 4,
    "chain_bv": 32,
    "chain_warps": 4,
    "chain_stages": 2,
    "out_bv": 128,
    "out_warps": 8,
    "dqk_bk": 128,
    "dqk_bv": 64,
    "dqk_warps": 8,
    "wy_bk": 128,
    "wy_bv": 128,
    "wy_warps": 8,
}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


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
    cu: torch.Tensor  # int32 [N + 1] (varlen) or a placeholder
    idx: torch.Tensor  # int32 [n_chunks, 2]: (document, chunk in document) (varlen)
    coff: torch.Tensor  # int32 [N + 1]: first global chunk of each document (varlen)
    varlen: bool

    @property
    def rows(self) -> int:
        return self.B * self.T

    @property
    def BK(self) -> int:
        return _pow2(self.K)

    def new(self, *shape, dtype=None):
        return torch.empty(*shape, device=self.q.device, dtype=dtype or self.q.dtype)


_PLANS: dict[tuple, tuple] = {}


def _varlen_plan(cu_seqlens: torch.Tensor):
    """Chunk indices and chunk offsets of packed documents (needs the boundaries on the host)."""
    bounds = tuple(cu_seqlens.tolist())
    key = (bounds, cu_seqlens.device)
    if key not in _PLANS:
        if len(_PLANS) > 64:
            _PLANS.clear()
        lens = [e - s for s, e in zip(bounds, bounds[1:])]
        nts = [-(-n // CHUNK) for n in lens]
        idx = [(d, i) for d, nt in enumerate(nts) for i in range(nt)]
        coff = [0]
        for nt in nts:
            coff.append(coff[-1] + nt)
        dev = cu_seqlens.device
        _PLANS[key] = (torch.tensor(bounds, dtype=torch.int32, device=dev),
                       torch.tensor(idx, dtype=torch.int32, device=dev).view(-1, 2),
                       torch.tensor(coff, dtype=torch.int32, device=dev), len(idx))
    return _PLANS[key]


def _layout(call: Call) -> _Layout:
    q, k, v = call.q, call.k, call.v
    if call.beta is None:
        raise ValueError("the Triton delta-rule kernels need beta (delta_rule / gated_delta_rule)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton delta-rule kernels take float16, bfloat16 or float32 inputs, got {q.dtype}; "
                         "use backend='torch' for float64")
    if call.g is not None and call.g.dim() != 3:
        raise ValueError(f"the delta-rule kernels take a scalar gate per token and head, g [B, T, H]; "
                         f"got shape {tuple(call.g.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"the Triton delta-rule kernels support head dims up to {MAX_HEAD_DIM}, got K={K}, V={V}")
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
    if call.cu_seqlens is None:
        NT = -(-T // CHUNK)
        dummy = torch.zeros(2, dtype=torch.int32, device=q.device)
        cu, idx, coff, n_chunks, N, varlen = dummy, dummy, dummy, B * NT, B, False
    else:
        cu, idx, coff, n_chunks = _varlen_plan(call.cu_seqlens)
        NT, N, varlen = 0, call.cu_seqlens.numel() - 1, True
    return _Layout(flat(q), flat(k), flat(v), flat(call.beta), flat(call.g) if call.g is not None else None,
                   call.scale, B, T, H, K, V, N, NT, n_chunks, cu, idx, coff, varlen)


@dataclass
class _WY:
    gc: torch.Tensor | None  # cumulative in-chunk gate, fp32 [rows, H]
    w: torch.Tensor  # [rows, H, K]
    u: torch.Tensor | None  # [rows, H, V]
    t: torch.Tensor | None  # (I + Akk)^-1, [rows, H, 64]
    dvl: torch.Tensor | None  # local part of dVn, [rows, H, V]


def _prep(L: _Layout, *, store_u: bool, store_t: bool, do: torch.Tensor | None = None) -> _WY:
    gc = L.new(L.rows, L.H, dtype=torch.float32) if L.g is not None else None
    w = L.new(L.rows, L.H, L.K)
    u = L.new(L.rows, L.H, L.V) if store_u else None
    t = L.new(L.rows, L.H, CHUNK) if store_t else None
    dvl = L.new(L.rows, L.H, L.V) if do is not None else None
    any_ = w
    kern.wy_prep[(L.n_chunks, L.H)](
        L.k, L.v, L.beta, L.g if L.g is not None else any_, L.q, do if do is not None else any_,
        gc if gc is not None else any_, w, u if u is not None else any_, t if t is not None else any_,
        dvl if dvl is not None else any_,
        L.cu, L.idx, L.scale, L.T, L.NT, L.H, L.K, L.V,
        BK=L.BK, BV=min(_pow2(L.V), 128), IS_VARLEN=L.varlen, USE_G=L.g is not None,
        STORE_U=store_u, STORE_T=store_t, DO_DVL=do is not None, num_warps=CONFIG["prep_warps"])
    return _WY(gc, w, u, t, dvl)


def _chains(L: _Layout, wy: _WY, *, forward: bool, reverse: bool, store: bool,
            h0=None, do=None, dht=None):
    """Run the forward chain, the reverse chain or both (one launch). Returns
    (h, vn, ht, dh, dvn, dh0), entries None where not computed."""
    f32 = torch.float32
    h = L.new(L.n_chunks, L.H, L.K, L.V) if forward and store else None
    vn = L.new(L.rows, L.H, L.V) if forward and store else None
    ht = L.new(L.N, L.H, L.K, L.V, dtype=f32) if forward else None
    dh = L.new(L.n_chunks, L.H, L.K, L.V) if reverse and store else None
    dvn = L.new(L.rows, L.H, L.V) if reverse and store else None
    dh0 = L.new(L.N, L.H, L.K, L.V, dtype=f32) if reverse else None
    h0 = h0.to(f32).contiguous() if h0 is not None else None
    dht = dht.to(f32).contiguous() if dht is not None else None
    bv = min(_pow2(L.V), CONFIG["chain_bv"])
    any_ = wy.w
    pick = lambda x: x if x is not None else any_  # noqa: E731
    grid = (triton.cdiv(L.V, bv), L.N * L.H, int(forward) + int(reverse))
    kern.state_pass[grid](
        L.q, L.k, pick(wy.gc), wy.w, pick(wy.u), pick(do), pick(wy.dvl),
        pick(h0), pick(h), pick(vn), pick(ht), pick(dht), pick(dh), pick(dvn), pick(dh0),
        L.scale, L.cu, L.coff, L.T, L.NT, L.H, L.K, L.V,
        BK=L.BK, BV=bv, IS_VARLEN=L.varlen, USE_G=L.g is not None, FORWARD=forward, REVERSE=reverse,
        USE_H0=h0 is not None, USE_DHT=dht is not None, STORE=store,
        num_warps=CONFIG["chain_warps"], num_stages=CONFIG["chain_stages"])
    return h, vn, ht, dh, dvn, dh0


def _unflat(L: _Layout, x: torch.Tensor) -> torch.Tensor:
    return x.view(L.B, L.T, *x.shape[1:])


def forward(call: Call, h0):
    L = _layout(call)
    wy = _prep(L, store_u=True, store_t=False)
    h, vn, ht, *_ = _chains(L, wy, forward=True, reverse=False, store=True, h0=h0)
    o = L.new(L.rows, L.H, L.V, dtype=call.v.dtype)
    bv = min(_pow2(L.V), CONFIG["out_bv"])
    kern.output[(L.n_chunks, L.H, triton.cdiv(L.V, bv))](
        L.q, L.k, wy.gc if wy.gc is not None else wy.w, h, vn, o, L.scale,
        L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V,
        BK=L.BK, BV=bv, IS_VARLEN=L.varlen, USE_G=L.g is not None, num_warps=CONFIG["out_warps"])
    return _unflat(L, o), ht


def final_state(call: Call, h0):
    L = _layout(call)
    wy = _prep(L, store_u=True, store_t=False)
    return _chains(L, wy, forward=True, reverse=False, store=False, h0=h0)[2]


def state_grad(call: Call, do, dht):
    L = _layout(call)
    do = do.reshape(L.rows, L.H, L.V).contiguous()
    wy = _prep(L, store_u=False, store_t=False, do=do)
    return _chains(L, wy, forward=False, reverse=True, store=False, do=do, dht=dht)[5]


def backward(call: Call, h0, do, dht) -> Grads:
    L = _layout(call)
    do = do.reshape(L.rows, L.H, L.V).to(L.q.dtype).contiguous()
    wy = _prep(L, store_u=True, store_t=True, do=do)
    h, vn, _, dh, dvn, dh0 = _chains(L, wy, forward=True, reverse=True, store=True, h0=h0, do=do, dht=dht)
    use_g = L.g is not None
    gc = wy.gc if use_g else wy.w
    f32 = torch.float32
    bk = min(L.BK, CONFIG["dqk_bk"])
    nk = triton.cdiv(L.K, bk)
    dq = L.new(L.rows, L.H, L.K)
    dk_part = L.new(L.rows, L.H, L.K, dtype=f32)
    dw = L.new(L.rows, L.H, L.K)
    dg_part = L.new(nk, L.rows, L.H, dtype=f32) if use_g else dw
    kern.bwd_dqk[(L.n_chunks, L.H, nk)](
        L.q, L.k, gc, h, vn, do, dh, dvn, dq, dk_part, dw, dg_part, L.scale,
        L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V, L.rows,
        BK=bk, BV=min(_pow2(L.V), CONFIG["dqk_bv"]), IS_VARLEN=L.varlen, USE_G=use_g,
        num_warps=CONFIG["dqk_warps"])
    dk = L.new(L.rows, L.H, L.K)
    dv = L.new(L.rows, L.H, L.V, dtype=call.v.dtype)
    dbeta = L.new(L.rows, L.H, dtype=call.beta.dtype)
    dg = L.new(L.rows, L.H, dtype=call.g.dtype) if use_g else None
    kern.bwd_wy[(L.n_chunks, L.H)](
        L.k, L.v, L.beta, gc, wy.t, dw, dvn, dk_part, dg_part, dk, dv, dbeta, dg if use_g else dw,
        L.cu, L.idx, L.T, L.NT, L.H, L.K, L.V, L.rows,
        BK=min(L.BK, CONFIG["wy_bk"]), BV=min(_pow2(L.V), CONFIG["wy_bv"]), NK=nk,
        IS_VARLEN=L.varlen, USE_G=use_g, num_warps=CONFIG["wy_warps"])
    return Grads(_unflat(L, dq).to(call.q.dtype), _unflat(L, dk).to(call.k.dtype), _unflat(L, dv),
                 _unflat(L, dg) if use_g else None, _unflat(L, dbeta), dh0)
