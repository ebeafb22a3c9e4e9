"""`seqpar bench softmax`: sequence-parallel softmax attention (the softmax layers of hybrids).

    torchrun --nproc-per-node 2 -m seqpar.cli bench softmax --seq-lens 131072 262144 --out softmax.json

(a) Parity, before any timing (skip with --no-check). Every result and its gradients (dq, dk, dv)
    are measured against an fp32 reference (SDPA on upcast inputs, over the whole sequence, the mask
    materialised where it is not plain causal: fine at check sizes), next to single-device SDPA in
    the benchmark dtype measured against the same reference; a case passes when its error is at most
    twice SDPA's plus a small floor. Cases: the single-device blockwise split (odd blocks, LSE
    merges, documents, windows, GQA: the flash path against the reference) and the SP call on the
    whole group for every method x layout (causal + GQA; packed documents + window + GQA).
(b) Timing of forward + backward at each total length T (B = 1): single-GPU SDPA (flash, causal)
    on the whole sequence, seqpar's own single-GPU blockwise call, and the SP call per layout x
    method on the group. Balance efficiency = (single-GPU SDPA time / P) / SP time (also given
    against seqpar's single-GPU call); median of repeats, the slowest rank counts; peak memory per
    rank (max over ranks) of each SP call, inputs included.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar import sp
from seqpar.comm import collectives as C
from seqpar.sp import blockwise
from seqpar_kernels.testing import rel_err

from .sp import DTYPES
from .timing import init_distributed, median_ms


def configure(parser) -> None:
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[131072, 262144], help="total tokens T")
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", nargs="+", type=int, default=[16, 4], help="key/value heads (GQA if fewer)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(sp.SOFTMAX_METHODS), choices=list(sp.SOFTMAX_METHODS))
    parser.add_argument("--layouts", nargs="+", default=list(sp.LAYOUTS), choices=list(sp.LAYOUTS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the parity checks")
    parser.add_argument("--check-len", type=int, default=8192, help="total T of the SP parity checks")
    parser.add_argument("--split-len", type=int, default=3001, help="T of the single-device split checks")
    parser.add_argument("--out", default="softmax_bench.json", help="JSON output (written by rank 0)")
    parser.set_defaults(func=main)


# ---- the reference ------------------------------------------------------------------------------------
def _dense_mask(T: int, causal: bool, cu, window, device):
    """The whole T x T mask: the bench's reference only, at check sizes."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None]
    ok = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window:
        ok &= i - j < window
    if cu:
        doc = torch.bucketize(torch.arange(T, device=device), torch.tensor(cu[1:], device=device), right=True)
        ok &= doc[:, None] == doc[None]
    return ok


def _sdpa(q, k, v, causal=True, cu=None, window=None):
    """SDPA over the whole sequence; q [B, T, Hq, D], k, v [B, T, Hkv, D] (KV heads repeated)."""
    G = q.shape[2] // k.shape[2]
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
    plain = cu is None and window is None
    mask = None if plain else _dense_mask(q.shape[1], causal, cu, window, q.device)
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=plain and causal).transpose(1, 2)


def _outputs_and_grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    return [o.detach().float(), *(g.float() for g in torch.autograd.grad(o, leaves, do))]


def _inputs(B, T, Hq, Hkv, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)  # identical on every rank
    q, do = (torch.randn(B, T, Hq, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, T, Hkv, D, generator=gen) for _ in range(2))
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]


def _documents(T: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(T - 1, generator=gen)[: n - 1] + 1).tolist()
    return [0] + sorted(cuts) + [T]


def _compare(name, fn, inputs, mask, dtype, layout=None):
    """Errors of fn and of SDPA in `dtype`, both against SDPA in fp32 on the same inputs."""
    q, k, v, do = inputs
    ref = _outputs_and_grads(lambda *x: _sdpa(*x, **mask), *(t.float() for t in (q, k, v, do)))
    low = _outputs_and_grads(lambda *x: _sdpa(*x, **mask), q, k, v, do)
    try:
        got, error = fn(q, k, v, do), None
    except Exception as e:  # noqa: BLE001 - recorded as a failed check, the other checks still run
        got, error = [torch.full_like(r, float("nan")) for r in ref], f"{type(e).__name__}: {e}"
    floor = 1e-3 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    row = {"case": name, "batch": q.shape[0], **{kk: str(vv) for kk, vv in mask.items() if vv is not None and kk != "cu"},
           "documents": len(mask["cu"]) - 1 if mask.get("cu") else 1, "error": error}
    ok = error is None
    for n, g, r, s in zip(("o", "dq", "dk", "dv"), got, ref, low):
        e, e_sdpa = rel_err(g, r), rel_err(s, r)
        row[f"err_{n}"], row[f"sdpa_err_{n}"] = e, e_sdpa
        ok &= e <= 2 * e_sdpa + floor
    worst = torch.tensor([0.0 if ok else 1.0], device=q.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank's share must pass
    row["pass"] = worst.item() == 0.0
    return row


def _checks(args, device, dtype) -> list[dict]:
    P = C.size()
    Hq, D = args.heads, args.head_dim
    Hkv = min(args.kv_heads)
    rows = []
    # the single-device blockwise split: odd blocks, every mask kind, on this rank alone
    T = args.split_len
    cu = _documents(T, 9, seed=5)
    block = T // 4 + 1
    for B, mask in [(1, dict(causal=True)), (1, dict(causal=True, cu=cu)), (2, dict(causal=True, window=T // 9)),
                    (1, dict(causal=True, cu=cu, window=T // 3)), (1, dict(causal=False, cu=cu))]:
        inputs = _inputs(B, T, Hq, Hkv, D, dtype, device, seed=7)

        def split(q, k, v, do, mask=mask):
            return _outputs_and_grads(lambda *x: blockwise.attention(
                *x, causal=mask["causal"], cu_seqlens=mask.get("cu"), window=mask.get("window"), block_size=block),
                q, k, v, do)

        rows.append(_compare("split", split, inputs, mask, dtype))
    # the SP call over the whole group against the whole sequence
    T = args.check_len
    cu = _documents(T, 7, seed=6)
    for layout in args.layouts:
        for method in args.methods:
            for mask in [dict(causal=True), dict(causal=True, cu=cu, window=T // (2 * P) + 3)]:
                inputs = _inputs(1, T, Hq, Hkv, D, dtype, device, seed=8)

                def run_sp(q, k, v, do, mask=mask, layout=layout, method=method):
                    loc = [sp.shard(x, None, layout).detach().requires_grad_() for x in (q, k, v)]
                    o = sp.softmax_attention(*loc, method=method, layout=layout, causal=mask["causal"],
                                             cu_seqlens=mask.get("cu"), window=mask.get("window"))
                    grads = torch.autograd.grad(o, loc, sp.shard(do, None, layout))
                    return [sp.unshard(x.detach(), None, layout).float() for x in (o, *grads)]

                rows.append(_compare(f"sp/{method}/{layout}", run_sp, inputs, mask, dtype))
    return rows


# ---- timing ---------------------------------------------------------------------------------------------
def _fwd_bwd(fn, q, k, v, do):
    def run():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    return run


def _sdpa_flash(q, k, v):
    """Single-GPU SDPA with the flash backend; GQA natively where this torch allows it, else with the
    KV heads repeated (the same arithmetic)."""
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)
        except RuntimeError:
            G = q.shape[2] // k.shape[2]
            o = F.scaled_dot_product_attention(q_, k_.repeat_interleave(G, 1), v_.repeat_interleave(G, 1),
                                               is_causal=True)
    return o.transpose(1, 2)


def _peak_gib(fn, device) -> float:
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


def _timings(args, device, dtype) -> list[dict]:
    P, rank = C.size(), C.rank()
    Hq, D = args.heads, args.head_dim
    rows = []
    for T in args.seq_lens:
        for Hkv in args.kv_heads:
            full = [x.requires_grad_() for x in _inputs(1, T, Hq, Hkv, D, dtype, device, seed=rank)]
            t_sdpa = median_ms(_fwd_bwd(_sdpa_flash, *full), device, args.warmup, args.repeat)
            t_own = median_ms(_fwd_bwd(blockwise.attention, *full), device, args.warmup, args.repeat)
            del full
            loc = [x.requires_grad_() for x in _inputs(1, T // P, Hq, Hkv, D, dtype, device, seed=rank)]
            kv_local_gib = 2 * (T // P) * Hkv * D * loc[0].element_size() / 2**30
            for layout in args.layouts:
                for method in args.methods:
                    def attn(q, k, v, layout=layout, method=method):
                        return sp.softmax_attention(q, k, v, method=method, layout=layout, validate=False)

                    run = _fwd_bwd(attn, *loc)
                    t_sp = median_ms(run, device, args.warmup, args.repeat)
                    row = {"T": T, "P": P, "heads": Hq, "kv_heads": Hkv, "layout": layout, "method": method,
                           "sdpa_1gpu_ms": t_sdpa, "seqpar_1gpu_ms": t_own, "sp_ms": t_sp,
                           "efficiency": t_sdpa / P / t_sp, "efficiency_vs_seqpar_1gpu": t_own / P / t_sp,
                           "peak_gib_per_rank": _peak_gib(run, device), "kv_local_gib": kv_local_gib}
                    rows.append(row)
                    if rank == 0:
                        print(f"T={T:>7d} Hkv={Hkv:>2d} {layout:10s} {method:9s} SP {t_sp:9.2f} ms  SDPA/P "
                              f"{t_sdpa / P:9.2f} ms  eff {row['efficiency']:.3f} (vs seqpar-1gpu "
                              f"{row['efficiency_vs_seqpar_1gpu']:.3f})  peak {row['peak_gib_per_rank']:.1f} GiB",
                              flush=True)
            del loc
    return rows


def _table(checks, rows) -> str:
    lines = []
    if checks:
        lines.append(f"{'check':22s} {'mask':28s} {'err o':>8s} {'err dq':>8s} {'err dk':>8s} {'err dv':>8s}"
                     f" {'sdpa o':>8s} {'sdpa dq':>8s}  result")
        for c in checks:
            mask = f"causal={c['causal']} docs={c['documents']} window={c.get('window', '-')}"
            lines.append(f"{c['case']:22s} {mask:28s} {c['err_o']:8.1e} {c['err_dq']:8.1e} {c['err_dk']:8.1e} "
                         f"{c['err_dv']:8.1e} {c['sdpa_err_o']:8.1e} {c['sdpa_err_dq']:8.1e}  "
                         f"{'PASS' if c['pass'] else 'FAIL'}")
    if rows:
        lines.append(f"{'T':>7s} {'Hkv':>3s} {'layout':10s} {'method':9s} {'SP ms':>9s} {'SDPA 1gpu':>10s} "
                     f"{'own 1gpu':>9s} {'eff':>6s} {'eff/own':>7s} {'peak GiB':>8s}")
        for r in rows:
            lines.append(f"{r['T']:>7d} {r['kv_heads']:>3d} {r['layout']:10s} {r['method']:9s} {r['sp_ms']:9.2f} "
                         f"{r['sdpa_1gpu_ms']:10.2f} {r['seqpar_1gpu_ms']:9.2f} {r['efficiency']:6.3f} "
                         f"{r['efficiency_vs_seqpar_1gpu']:7.3f} {r['peak_gib_per_rank']:8.1f}")
    return "\n".join(lines)


def main(args) -> int:
    device = init_distributed()
    P, rank = C.size(), C.rank()
    dtype = DTYPES[args.dtype]
    checks = [] if args.no_check else _checks(args, device, dtype)
    failed = [c for c in checks if not c["pass"]]
    rows = _timings(args, device, dtype)  # timed even after a failed check (flagged below): speed still informs
    if rank == 0:
        print(_table(checks, rows))
        meta = {"P": P, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim, "torch": torch.__version__,
                "repeat": args.repeat,
                "impl": blockwise.resolve_impl("auto", torch.empty(1, 1, 1, args.head_dim, device=device, dtype=dtype))}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "checks": checks, "parity_failed": len(failed), "results": rows}, f, indent=1)
        for c in failed:
            if c["error"]:
                print(f"{c['case']}: {c['error']}")
        print(f"wrote {args.out}" + (f"; {len(failed)} parity checks FAILED: the timings are of a path that "
                                     "failed them" if failed else ""))
    dist.destroy_process_group()
    return 1 if failed else 0
