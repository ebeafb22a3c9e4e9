"""Blockwise softmax attention merged by log-sum-exp: the primitive under SP softmax attention.

A query block and a key block are runs of *global* positions. The mask (causal, sliding window,
packed documents) is a rule on global positions, so any pair of blocks knows what it may see
without a T x T mask. A block pair is cut into **tiles**: one rectangle (query rows x key rows)
per document, with a band measured from the rectangle's bottom-right diagonal, which is
FlashAttention's own convention (row i may see columns i + (nk - nq) - left ..  i + (nk - nq) + right;
None = unlimited). Tiles whose rows would see nothing are cropped away, so every tile row sees at
least one key and the log-sum-exp of a tile is always finite.

Two implementations of a tile, chosen per call:
* flash: PyTorch's FlashAttention-2 kernels (`aten._flash_attention_forward/_backward`, varlen),
  which return the log-sum-exp and take the band natively: one kernel call per group of tiles with
  the same band (all documents of a block pair at once). CUDA, fp16/bf16, head dim <= 256.
* math: plain PyTorch in query x key chunks of `chunk` tokens (block-sized scores only), in fp32
  or fp64; the CPU path and the reference for the flash one.

Partial results are merged by log-sum-exp (`Partial`). The backward is blockwise too: with the
final output and log-sum-exp of each query row, every (query block, key block) pair's gradients
are independent (the FlashAttention backward), so the same tiles are walked again.
`blockwise_attention` drives one autograd Function over local query spans, local key spans and an
optional `remote` source of key blocks (the SP exchange); `attention` is the single-device call.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from seqpar_kernels import InputError, wide_dtype

IMPLS = ("auto", "flash", "math")
_NO_LIMIT = 1 << 62


# ---- the mask and its tiles ---------------------------------------------------------------------
@dataclass(frozen=True)
class Mask:
    """Which keys a query sees, in global positions: key j <= query i if causal, i - j < window,
    both in the same document (cu_seqlens: global document boundaries, one packed row)."""
    causal: bool = True
    window: int | None = None
    cu_seqlens: tuple[int, ...] | None = None

    def documents(self, a: int, b: int):
        """(start, end) of each document overlapping [a, b)."""
        if self.cu_seqlens is None:
            return [(-_NO_LIMIT, _NO_LIMIT)]
        cu, out = self.cu_seqlens, []
        i = max(bisect.bisect_right(cu, a) - 1, 0)
        while i + 1 < len(cu) and cu[i] < b:
            out.append((cu[i], cu[i + 1]))
            i += 1
        return out


@dataclass(frozen=True)
class Tile:
    """Queries [q0, q1) x keys [k0, k1) in global positions, with a band relative to the
    bottom-right diagonal (left/right: how far before/after it keys are visible; None = all)."""
    q0: int
    q1: int
    k0: int
    k1: int
    left: int | None
    right: int | None


@functools.lru_cache(maxsize=4096)
def tiles(mask: Mask, q0: int, q1: int, k0: int, k1: int) -> tuple[Tile, ...]:
    """The non-empty tiles of queries [q0, q1) against keys [k0, k1); () if the mask hides the pair."""
    out = []
    for ds, de in mask.documents(q0, q1):
        qa, qb, ka, kb = max(q0, ds), min(q1, de), max(k0, ds), min(k1, de)
        if not mask.causal:
            if ka < kb and qa < qb:
                out.append(Tile(qa, qb, ka, kb, None, None))
            continue
        # FlashAttention reads a band side left open, or wider than the keys, as "the number of
        # keys", which cuts rows off when a banded tile has more queries than keys: cut such tiles
        # into runs of queries no longer than their keys (each run re-cropped, so repeat).
        todo = [_causal_tile(qa, qb, ka, kb, mask.window)]
        while todo:
            t = todo.pop(0)
            if t is None:
                continue
            nq, nk = t.q1 - t.q0, t.k1 - t.k0
            if (t.left is None and t.right is None) or nq <= nk:
                out.append(t)
            else:
                todo[:0] = [_causal_tile(a, min(a + nk, t.q1), t.k0, t.k1, mask.window) for a in range(t.q0, t.q1, nk)]
    return tuple(out)


def _causal_tile(qa: int, qb: int, ka: int, kb: int, w: int | None) -> Tile | None:
    """Queries [qa, qb) x keys [ka, kb) of one document, causal with an optional window, cropped to
    the rows and columns that see something."""
    kb = min(kb, qb)                # no key after the last query
    if w is not None:
        ka = max(ka, qa - w + 1)    # no key before the first query's window
    if ka >= kb:
        return None
    qa = max(qa, ka)                # queries before the first key see none of it
    if w is not None:
        qb = min(qb, kb - 1 + w)    # queries whose window ends before the last key
    if qa >= qb:
        return None
    # j <= i  <=>  col <= row + (nk - nq) + (qb - kb);  i - j < w  <=>  left = w - 1 - (qb - kb)
    right = qb - kb
    left = None if w is None else w - 1 - right
    right = None if right >= qb - qa - 1 else right
    left = None if left is not None and left >= kb - ka - 1 else left
    return Tile(qa, qb, ka, kb, left, right)


def key_hull(mask: Mask, q0: int, q1: int, k0: int, k1: int) -> tuple[int, int] | None:
    """The smallest run of keys in [k0, k1) holding every key that queries [q0, q1) see."""
    ts = tiles(mask, q0, q1, k0, k1)
    return (min(t.k0 for t in ts), max(t.k1 for t in ts)) if ts else None


@dataclass(frozen=True)
class _Run:
    """Tiles of one band as flat row ranges of [B * T, H, D] tensors."""
    left: int | None
    right: int | None
    q_rows: tuple[tuple[int, int], ...]
    k_rows: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=4096)
def _runs(mask: Mask, B: int, q_start: int, Tq: int, k_start: int, Tk: int) -> tuple[_Run, ...]:
    """The tiles of a block pair for B batch rows, grouped by band (one kernel call per group)."""
    groups: dict[tuple, tuple[list, list]] = {}
    for t in tiles(mask, q_start, q_start + Tq, k_start, k_start + Tk):
        qr, kr = groups.setdefault((t.left, t.right), ([], []))
        for b in range(B):
            qr.append((b * Tq + t.q0 - q_start, b * Tq + t.q1 - q_start))
            kr.append((b * Tk + t.k0 - k_start, b * Tk + t.k1 - k_start))
    return tuple(_Run(left, right, tuple(qr), tuple(kr)) for (left, right), (qr, kr) in groups.items())


def _gather(x: torch.Tensor, rows) -> torch.Tensor:
    """Rows of x for a list of ranges: a view when they are adjacent, else a copy."""
    if all(a == pb for (a, _), (_, pb) in zip(rows[1:], rows)):
        return x[rows[0][0]:rows[-1][1]]
    return torch.cat([x[a:b] for a, b in rows])


def _scatter_ranges(rows):
    """(row range, slice of the gathered tensor) pairs, adjacent ranges fused."""
    out, pos = [], 0
    for a, b in rows:
        if out and out[-1][0][1] == a:
            (a0, _), (p0, _) = out[-1]
            out[-1] = ((a0, b), (p0, pos + b - a))
        else:
            out.append(((a, b), (pos, pos + b - a)))
        pos += b - a
    return out


# ---- log-sum-exp merging ---------------------------------------------------------------------------
def merge(out, lse, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets: out [n, H, D], lse [n, H]."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # rows that saw nothing yet
    a, b = (lse - safe).exp(), (lse_b - safe).exp()
    return out * a[..., None] + out_b.to(out.dtype) * b[..., None], new


class Partial:
    """Running (out, lse) of one query block, flat rows [B * T]; merged by log-sum-exp."""

    def __init__(self, n: int, H: int, D: int, dtype, device):
        self.out = torch.zeros(n, H, D, dtype=dtype, device=device)
        self.lse = torch.full((n, H), float("-inf"), dtype=dtype, device=device)

    def add(self, a: int, b: int, out, lse) -> None:
        """Merge the partial result of rows [a, b) over further keys, in place."""
        o, l = self.out[a:b], self.lse[a:b]
        new = torch.logaddexp(l, lse.to(l.dtype))
        safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
        o.mul_((l - safe).exp()[..., None]).add_(out * (lse - safe).exp()[..., None])
        l.copy_(new)


# ---- the two implementations of a band of tiles -----------------------------------------------------
def _band(nq: int, nk: int, i0: int, i1: int, j0: int, j1: int, left, right, device):
    """Visibility of rows [i0, i1) x columns [j0, j1) of a tile, or None when all are visible."""
    if left is None and right is None:
        return None
    rows = torch.arange(i0, i1, device=device)[:, None] + (nk - nq)
    cols = torch.arange(j0, j1, device=device)[None, :]
    ok = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if right is not None:
        ok &= cols <= rows + right
    if left is not None:
        ok &= cols >= rows - left
    return ok


def _col_range(nq, nk, i0, i1, left, right):
    """Columns that rows [i0, i1) of a tile may see."""
    lo = 0 if left is None else max(0, i0 + nk - nq - left)
    hi = nk if right is None else min(nk, i1 - 1 + nk - nq + right + 1)
    return lo, hi


def _math_forward(q, k, v, left, right, scale, chunk, adt):
    """One tile: q [nq, Hkv, G, D], k, v [nk, Hkv, D] -> out [nq, Hkv*G, D], lse [nq, Hkv*G]."""
    nq, nk = q.shape[0], k.shape[0]
    outs, lses = [], []
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        qi = q[i0:i1].to(adt)
        o = torch.zeros(qi.shape, dtype=adt, device=q.device)
        lse = torch.full(qi.shape[:-1], float("-inf"), dtype=adt, device=q.device)
        lo, hi = _col_range(nq, nk, i0, i1, left, right)
        for j0 in range(lo, hi, chunk):
            j1 = min(hi, j0 + chunk)
            s = torch.einsum("ihgd,jhd->ihgj", qi, k[j0:j1].to(adt)) * scale
            ok = _band(nq, nk, i0, i1, j0, j1, left, right, q.device)
            if ok is not None:
                s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
            l_c = torch.logsumexp(s, -1)
            p = (s - torch.where(torch.isneginf(l_c), torch.zeros_like(l_c), l_c)[..., None]).exp()
            o, lse = merge(o, lse, torch.einsum("ihgj,jhd->ihgd", p, v[j0:j1].to(adt)), l_c)
        outs.append(o.flatten(1, 2))
        lses.append(lse.flatten(1, 2))
    return torch.cat(outs), torch.cat(lses)


def _math_backward(q, k, v, do, lse, delta, left, right, scale, chunk, adt):
    """One tile's gradients given the final lse and delta = rowsum(do * out) of its rows.
    q, do [nq, Hkv, G, D]; lse, delta [nq, Hkv, G]; k, v [nk, Hkv, D]."""
    nq, nk = q.shape[0], k.shape[0]
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    dk = torch.zeros(k.shape, dtype=adt, device=q.device)
    dv = torch.zeros(v.shape, dtype=adt, device=q.device)
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        qi, doi = q[i0:i1].to(adt), do[i0:i1].to(adt)
        li, di = lse[i0:i1, ..., None], delta[i0:i1, ..., None]
        lo, hi = _col_range(nq, nk, i0, i1, left, right)
        for j0 in range(lo, hi, chunk):
            j1 = min(hi, j0 + chunk)
            kj, vj = k[j0:j1].to(adt), v[j0:j1].to(adt)
            s = torch.einsum("ihgd,jhd->ihgj", qi, kj) * scale
            ok = _band(nq, nk, i0, i1, j0, j1, left, right, q.device)
            if ok is not None:
                s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
            p = (s - li).exp()
            dv[j0:j1] += torch.einsum("ihgj,ihgd->jhd", p, doi)
            ds = p * (torch.einsum("ihgd,jhd->ihgj", doi, vj) - di) * scale
            dq[i0:i1] += torch.einsum("ihgj,jhd->ihgd", ds, kj)
            dk[j0:j1] += torch.einsum("ihgj,ihgd->jhd", ds, qi)
    return dq.flatten(1, 2), dk, dv


@functools.lru_cache(maxsize=1024)
def _cu_tensor(lengths: tuple[int, ...], device) -> torch.Tensor:
    """Cumulative lengths for the varlen kernels, made once per distinct tiling (no host sync later)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=16)
def _rng_placeholders(device):
    # philox seed/offset of the flash backward; unused without dropout
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.empty(0, device=device)


def _flash_args(run: _Run, device):
    nq = tuple(b - a for a, b in run.q_rows)
    nk = tuple(b - a for a, b in run.k_rows)
    return (_cu_tensor(nq, device), _cu_tensor(nk, device), max(nq), max(nk))


def _window_args(run: _Run) -> dict:
    return dict(window_size_left=-1 if run.left is None else run.left,
                window_size_right=-1 if run.right is None else run.right)


def flash_usable(q: torch.Tensor) -> str | None:
    """Why the flash kernels cannot run these tensors (None: they can)."""
    if not q.is_cuda:
        return "tensors are not on a CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (flash takes float16/bfloat16)"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (flash takes multiples of 8 up to 256)"
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "GPU older than sm80"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    return None


def resolve_impl(impl: str, q: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise InputError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
    why = flash_usable(q)
    if impl == "flash" and why:
        raise InputError(f"impl='flash' cannot run here: {why}; use impl='auto' or 'math'")
    return "math" if impl == "math" or (impl == "auto" and why) else "flash"


# ---- one block pair, forward and backward -----------------------------------------------------------
@dataclass
class KeyBlock:
    """Keys from elsewhere: k, v [B, n, Hkv, D] starting at global position `start`; in backward,
    their dK/dV are added into `grad` [2, B, n, Hkv, D] (accumulation dtype)."""
    start: int
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor | None = None


@dataclass(frozen=True)
class Spec:
    """One blockwise attention call. Spans are (local offset, length, global start) runs of the
    local tensors. `remote` (optional) brings keys from elsewhere: `start(kv)` with the local
    [2, B, T, Hkv, D] K/V begins its transfers, `blocks(backward)` yields KeyBlocks as they arrive,
    and after the backward's blocks `finish()` returns the dK/dV of the local keys that the other
    places computed (see softmax_attention)."""
    q_spans: tuple[tuple[int, int, int], ...]
    k_spans: tuple[tuple[int, int, int], ...]
    mask: Mask
    scale: float
    impl: str
    chunk: int = 256
    remote: object = None


def attend(part: Partial, q, k, v, q_start: int, k_start: int, spec: Spec) -> None:
    """Merge the contribution of keys k, v [B, Tk, Hkv, D] (global start k_start) into the partial
    result of queries q [B, Tq, Hq, D] (global start q_start)."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    runs = _runs(spec.mask, B, q_start, Tq, k_start, Tk)
    if not runs:
        return
    qf, kf, vf = q.reshape(B * Tq, Hq, D), k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D)
    for run in runs:
        if spec.impl == "flash":
            qr, kr, vr = _gather(qf, run.q_rows), _gather(kf, run.k_rows), _gather(vf, run.k_rows)
            out, lse, *_ = torch.ops.aten._flash_attention_forward(
                qr, kr, vr, *_flash_args(run, q.device), 0.0, False, False, scale=spec.scale, **_window_args(run))
            lse = lse.t()  # varlen lse is [H, n]
            for (a, b), (p0, p1) in _scatter_ranges(run.q_rows):
                part.add(a, b, out[p0:p1], lse[p0:p1])
            continue
        for (qa, qb), (ka, kb) in zip(run.q_rows, run.k_rows):
            out, lse = _math_forward(qf[qa:qb].unflatten(1, (Hkv, -1)), kf[ka:kb], vf[ka:kb], run.left, run.right,
                                     spec.scale, spec.chunk, part.out.dtype)
            part.add(qa, qb, out, lse)


def attend_backward(q, k, v, out, do, lse, delta, q_start, k_start, dq, dk, dv, spec: Spec) -> None:
    """Add this key block's share of the gradients: dq [B*Tq, Hq, D] and dk, dv [B*Tk, Hkv, D]
    (accumulators); out, do [B, Tq, Hq, D] the final output and its gradient, lse [B*Tq, Hq] the
    final log-sum-exp, delta = rowsum(do * out) [B*Tq, Hq] (math path only)."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    runs = _runs(spec.mask, B, q_start, Tq, k_start, Tk)
    if not runs:
        return
    flat = [x.reshape(B * Tq, Hq, D) for x in (q, out, do)]
    kf, vf = k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D)
    for run in runs:
        if spec.impl == "flash":
            qr, outr, dor = (_gather(x, run.q_rows) for x in flat)
            kr, vr = _gather(kf, run.k_rows), _gather(vf, run.k_rows)
            lr = _gather(lse, run.q_rows).t().contiguous()
            g_q, g_k, g_v = torch.ops.aten._flash_attention_backward(
                dor, qr, kr, vr, outr, lr, *_flash_args(run, q.device), 0.0, False, *_rng_placeholders(q.device),
                scale=spec.scale, **_window_args(run))
            for (a, b), (p0, p1) in _scatter_ranges(run.q_rows):
                dq[a:b] += g_q[p0:p1]
            for (a, b), (p0, p1) in _scatter_ranges(run.k_rows):
                dk[a:b] += g_k[p0:p1]
                dv[a:b] += g_v[p0:p1]
            continue
        for (qa, qb), (ka, kb) in zip(run.q_rows, run.k_rows):
            g_q, g_k, g_v = _math_backward(
                flat[0][qa:qb].unflatten(1, (Hkv, -1)), kf[ka:kb], vf[ka:kb], flat[2][qa:qb].unflatten(1, (Hkv, -1)),
                lse[qa:qb].unflatten(1, (Hkv, -1)), delta[qa:qb].unflatten(1, (Hkv, -1)), run.left, run.right,
                spec.scale, spec.chunk, dq.dtype)
            dq[qa:qb] += g_q
            dk[ka:kb] += g_k
            dv[ka:kb] += g_v


# ---- the autograd function ----------------------------------------------------------------------------
def _span(x, span):
    off, n, _ = span
    return x[:, off:off + n]


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: Spec):
        B, _, Hq, D = q.shape
        adt = wide_dtype(q.dtype)
        if spec.remote is not None:  # in flight while the local blocks are computed
            spec.remote.start(torch.stack([k, v]))
        parts = [Partial(B * n, Hq, D, adt, q.device) for _, n, _ in spec.q_spans]
        qs = [_span(q, s) for s in spec.q_spans]

        def attend_all(kb, vb, k_start):
            for part, qx, (_, _, q_start) in zip(parts, qs, spec.q_spans):
                attend(part, qx, kb, vb, q_start, k_start, spec)

        for ks in spec.k_spans:
            attend_all(_span(k, ks), _span(v, ks), ks[2])
        if spec.remote is not None:
            for blk in spec.remote.blocks(backward=False):
                attend_all(blk.k, blk.v, blk.start)
        o = torch.cat([p.out.view(B, n, Hq, D) for p, (_, n, _) in zip(parts, spec.q_spans)], 1).to(q.dtype)
        lse = torch.cat([p.lse for p in parts])
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        spec = ctx.spec
        B, T, Hq, D = q.shape
        adt = lse.dtype
        do = do.contiguous()
        if spec.remote is not None:
            spec.remote.start(torch.stack([k, v]))
        blocks, row = [], 0
        for s in spec.q_spans:
            n = B * s[1]
            qx, ox, dox = _span(q, s), _span(o, s), _span(do, s)
            delta = (dox.to(adt) * ox.to(adt)).sum(-1).reshape(n, Hq) if spec.impl == "math" else None
            dq = torch.zeros(n, Hq, D, dtype=adt, device=q.device)
            blocks.append((qx, ox, dox, lse[row:row + n], delta, s[2], dq))
            row += n

        def grads_of(kb, vb, k_start):
            dk = torch.zeros(kb.shape[0] * kb.shape[1], *kb.shape[2:], dtype=adt, device=q.device)
            dv = torch.zeros_like(dk)
            for qx, ox, dox, lx, delta, q_start, dq in blocks:
                attend_backward(qx, kb, vb, ox, dox, lx, delta, q_start, k_start, dq, dk, dv, spec)
            return dk.view(kb.shape), dv.view(kb.shape)

        dkv = torch.zeros((2,) + tuple(k.shape), dtype=adt, device=k.device)
        for ks in spec.k_spans:
            dk, dv = grads_of(_span(k, ks), _span(v, ks), ks[2])
            _span(dkv[0], ks).add_(dk)
            _span(dkv[1], ks).add_(dv)
        if spec.remote is not None:
            for blk in spec.remote.blocks(backward=True):
                dk, dv = grads_of(blk.k, blk.v, blk.start)
                blk.grad[0].add_(dk)
                blk.grad[1].add_(dv)
            dkv += spec.remote.finish()
        dq = torch.cat([b[-1].view(B, -1, Hq, D) for b in blocks], 1)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def blockwise_attention(q, k, v, spec: Spec) -> torch.Tensor:
    """Attention of the local query spans to the local key spans and the remote key blocks.
    The query spans must tile the local sequence in order."""
    return _BlockwiseAttention.apply(q, k, v, spec)


# ---- argument checks and the single-device call ------------------------------------------------------
def check_inputs(q, k, v, *, causal: bool, window, scale, cu: list[int] | None, total_len: int) -> None:
    """Every local check of an attention call (shapes, GQA, window, documents); raises InputError."""
    from seqpar_kernels.variants import check_cu_seqlens

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise InputError(f"k and v must have the same shape [B, T, Hkv, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise InputError(f"q [B, T, Hq, D] and k, v [B, T, Hkv, D] must agree on B, T and D; got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise InputError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) for "
                         "grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise InputError(f"q, k, v must share one floating-point dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError("q, k, v must be on the same device")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InputError(f"window must be a positive int (keys seen per query, itself included); got {window!r}")
        if not causal:
            raise InputError("a sliding window is defined for causal attention; pass causal=True or window=None")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise InputError(f"scale must be a positive number; got {scale!r}")
    if cu is not None:
        check_cu_seqlens(torch.tensor(cu), total_len, q.shape[0], where="cu_seqlens (global document boundaries)")


def as_list(cu_seqlens) -> list[int] | None:
    if cu_seqlens is None:
        return None
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def attention(q, k, v, *, causal: bool = True, cu_seqlens=None, window: int | None = None, scale=None,
              block_size: int | None = None, chunk: int = 256, impl: str = "auto") -> torch.Tensor:
    """Softmax attention on one device, computed in blocks of `block_size` tokens (None: one block)
    merged by log-sum-exp. q [B, T, Hq, D], k, v [B, T, Hkv, D]; `cu_seqlens`: document boundaries
    (B = 1); `window`: each query sees its `window` most recent keys, itself included.
    impl: "flash" (CUDA, fp16/bf16), "math" (chunks of `chunk` tokens), "auto"."""
    cu = as_list(cu_seqlens)
    check_inputs(q, k, v, causal=causal, window=window, scale=scale, cu=cu, total_len=q.shape[1])
    T = q.shape[1]
    n = T if not block_size else block_size
    spans = tuple((a, min(n, T - a), a) for a in range(0, T, n))
    spec = Spec(spans, spans, Mask(causal, window, tuple(cu) if cu else None),
                q.shape[-1] ** -0.5 if scale is None else float(scale), resolve_impl(impl, q), chunk)
    return blockwise_attention(q, k, v, spec)
