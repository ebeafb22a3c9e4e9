"""`seqpar bench sp`: sequence-parallel efficiency of linear attention, measured in one run.

    torchrun --nproc-per-node 2 -m seqpar.cli bench sp --t-local 65536 262144 --out sp.json

SP efficiency = (forward+backward of the plain kernel on T_local tokens on one GPU)
              / (forward+backward of the SP call on P x T_local tokens over P GPUs),
both timed in the same run on the same GPUs (median of repeats; the slowest rank counts).
Each SP row has a breakdown measured in isolation: the local kernel (forward+backward with an
initial state and a final-state gradient, as under SP), the state passes (what the summary, its
gradient and for the delta rules the dense transition add to the kernel when run in the SP
call's order, sharing work through Call.memo), and the scan's collectives alone; what
the SP call costs beyond kernel + state passes is reported as `exposed` (communication not
hidden, plus glue), and `host` is the time the host takes to issue the call (the GPU waits for
the host where it comes near the SP time; --cuda-graph also times both calls replayed from CUDA
graphs, which takes the host out). With --check, each configuration is first compared
with the single-device kernel on the whole sequence (outputs, final state, every gradient).
With fla-core installed, fla's own context-parallel Gated DeltaNet is timed in the same run as
the anchor (its efficiency measured the same way).
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

import seqpar_kernels as sk
from seqpar import sp
from seqpar.comm import Family, StateScan
from seqpar.comm import collectives as C
from seqpar.sp.plan import make_plan
from seqpar_kernels.backends import resolve
from seqpar_kernels.explicit import Call, explicit_kernel, run_as_autograd, run_as_in_sp
from seqpar_kernels.testing import random_inputs, rel_err

from .timing import graphed, host_ms, init_distributed, kernel_breakdown, median_ms, start_together

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def configure(parser) -> None:
    parser.add_argument("--variants", nargs="+", default=list(sk.VARIANTS), choices=list(sk.VARIANTS))
    parser.add_argument("--methods", nargs="+", default=list(sp.METHODS), choices=list(sp.METHODS))
    parser.add_argument("--layouts", nargs="+", default=list(sp.LAYOUTS), choices=list(sp.LAYOUTS))
    parser.add_argument("--t-local", nargs="+", type=int, default=[65536, 262144],
                        help="tokens per rank (the SP call sees P times this)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--zeco-slices", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="compare with the single-device kernel first")
    parser.add_argument("--check-t-local", type=int, default=4096)
    parser.add_argument("--no-fla", action="store_true", help="skip fla's context-parallel anchor")
    parser.add_argument("--profile", action="store_true",
                        help="record every kernel's device time in one SP call per row (CUDA; torch.profiler)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the plain and the SP forward+backward replayed from CUDA graphs (GPUs): "
                             "the efficiency without the host's per-launch work")
    parser.add_argument("--out", default="sp_bench.json", help="JSON output (written by rank 0)")
    parser.set_defaults(func=main)


def _leaves(x, device, dtype, requires_grad=True):
    out = {}
    for n, t in x.tensors().items():
        t = t.to(device=device, dtype=torch.float32 if n == "initial_state" else dtype)
        out[n] = t.detach().requires_grad_(requires_grad)
    return out


def local_leaves(full: dict, layout: str) -> dict:
    """This rank's shard of each whole-sequence tensor, as leaves (a replicated initial state and
    lightning's [H] gate stay whole)."""
    return {n: (t if n == "initial_state" or t.dim() == 1 else sp.shard(t, None, layout)).detach().requires_grad_()
            for n, t in full.items()}


def fwd_bwd_plain(variant, x, do, backend):
    """One forward+backward of the single-device kernel on the leaves x (gradients reset first,
    as in a training step)."""
    def run():
        for t in x.values():
            t.grad = None
        o, _ = sk.chunk(variant, x["q"], x["k"], x["v"], g=x.get("g"), beta=x.get("beta"), backend=backend)
        o.backward(do)
    return run


def fwd_bwd_sp(variant, x, do, method, layout, backend, validate=False, **options):
    """The same through the SP call on this rank's shards x (options: more sp.linear_attention
    arguments, e.g. zeco_slices; validation off unless asked, as timed)."""
    def run():
        for t in x.values():
            t.grad = None
        o, _ = sp.linear_attention(x["q"], x["k"], x["v"], variant=variant, g=x.get("g"), beta=x.get("beta"),
                                   method=method, layout=layout, backend=backend, validate=validate, **options)
        o.backward(do)
    return run


def _breakdown(variant, x, do, method, layout, backend_name, slices, device, args):
    """The pieces of one SP call, each timed alone on this rank's shard."""
    var = sk.get_variant(variant)
    g, scale = sk.normalize_inputs(var, x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), None, None, None)
    kernel = explicit_kernel(backend_name)
    call = Call(x["q"].detach(), x["k"].detach(), x["v"].detach(),
                g.detach() if g is not None else None,
                x["beta"].detach() if "beta" in x else None, scale)
    B, T, H, K = call.q.shape
    V = call.v.shape[-1]
    h0 = torch.randn(B, H, K, V, device=device) * 0.1
    dht = torch.randn(B, H, K, V, device=device) * 0.1

    def local_kernel():
        run_as_autograd(kernel, call, do, h0, dht)

    plan = make_plan(layout, C.rank(), C.size(), B, T, None)
    transition = var.transition == "dense" and plan.needs_transitions

    def kernels_as_in_sp():
        run_as_in_sp(kernel, call, do, h0, dht, transition)

    fam = Family(var.transition)
    n_local = plan.n_local
    t_shape = {"scalar": (H,), "diagonal": (H, K), "dense": (H, K, K)}[var.transition]
    Ts = torch.rand(n_local, B, *t_shape, device=device)
    dS = torch.randn(n_local, B, H, K, V, device=device)

    def scan_only():
        s = StateScan(method, fam, plan.chain, plan.positions, None, slices)
        s.forward(Ts, dS)
        s.backward(dS, Ts)

    t_kernel = median_ms(local_kernel, device, args.warmup, args.repeat)
    return {
        "local_kernel_ms": t_kernel,
        # what the summary passes add to the kernel, as the SP call runs them
        "state_passes_ms": max(0.0, median_ms(kernels_as_in_sp, device, args.warmup, args.repeat) - t_kernel),
        "scan_ms": median_ms(scan_only, device, args.warmup, args.repeat),
    }


def _graph_times(plain, run, x, device, args) -> dict:
    """The plain and the SP forward+backward replayed from CUDA graphs, and how far the replayed
    SP call's gradients are from an eager call's (the replay must compute the same thing)."""
    plain_graph = graphed(plain, device, args.warmup)
    t_plain = median_ms(plain_graph.replay, device, args.warmup, args.repeat)
    del plain_graph  # its memory pool
    sp_graph = graphed(run, device, args.warmup)
    replayed = {n: t.grad for n, t in x.items() if t.grad is not None}  # the graph writes these
    run()
    eager = {n: t.grad.clone() for n, t in x.items() if t.grad is not None}
    t_sp = median_ms(sp_graph.replay, device, args.warmup, args.repeat)  # ends synchronised
    err = max(rel_err(replayed[n].float(), eager[n].float()) for n in eager)
    return {"single_graph_ms": t_plain, "sp_graph_ms": t_sp, "efficiency_graph": t_plain / t_sp,
            "graph_vs_eager_rel_err": err}


def _check(variant, method, layout, backend, args, device, dtype) -> dict:
    """SP on P x T tokens against the single-device kernel on the whole sequence (same backend)."""
    P = C.size()
    T = args.check_t_local * P
    # gates weak enough that a state still counts after a whole shard (about e^-5 of it is left):
    # with the default strength it decays to nothing within ~700 tokens, and the check would pass
    # whatever the states that cross the shard boundaries
    x = random_inputs(variant, B=1, T=T, H=args.heads, K=args.head_dim, V=args.head_dim, dtype=torch.float32,
                      initial_state=True, seed=11, gate_strength=32.0 / args.check_t_local)
    full = _leaves(x, device, dtype)
    gen = torch.Generator().manual_seed(12)  # the same upstream gradients on every rank
    do = torch.randn(full["v"].shape, generator=gen).to(device=device, dtype=dtype)
    dht = torch.randn(full["initial_state"].shape, generator=gen).to(device)
    o, ht = sk.chunk(variant, full["q"], full["k"], full["v"], g=full.get("g"), beta=full.get("beta"),
                     initial_state=full["initial_state"], output_final_state=True, backend=backend)
    torch.autograd.backward([o, ht], [do, dht])
    loc = local_leaves({n: t.detach() for n, t in full.items()}, layout)
    o_l, ht_l = sp.linear_attention(loc["q"], loc["k"], loc["v"], variant=variant, g=loc.get("g"),
                                    beta=loc.get("beta"), initial_state=loc["initial_state"],
                                    output_final_state=True, method=method, layout=layout, backend=backend,
                                    zeco_slices=args.zeco_slices)
    # every rank's loss weighs the final state with dht / P, so the gradients sum to the reference's
    torch.autograd.backward([o_l, ht_l], [sp.shard(do, None, layout), dht / P])
    errs = {"o": rel_err(o_l, sp.shard(o, None, layout)), "final_state": rel_err(ht_l, ht)}
    for n, t in loc.items():
        got = t.grad.float()
        if n == "initial_state" or t.dim() == 1:
            dist.all_reduce(got)
            want = full[n].grad
        else:
            want = sp.shard(full[n].grad, None, layout)
        errs["d" + n] = rel_err(got, want)
    worst = torch.tensor([max(errs.values())], device=device, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {"max_rel_err": worst.item(), "tolerance": tol, "pass": worst.item() < tol, "errors_rank0": errs}


def _fla_anchor(t_local, args, device, dtype):
    """fla's context-parallel chunk_gated_delta_rule, efficiency measured the same way."""
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.cp import build_cp_context
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # lift fla's Hopper guard: timing only
    P = C.size()
    rows = []
    x = random_inputs("gated_delta_rule", B=1, T=t_local, H=args.heads, K=args.head_dim, V=args.head_dim,
                      dtype=torch.float32, initial_state=False, seed=3)
    single = _leaves(x, device, dtype)
    do = torch.randn(single["v"].shape, device=device, dtype=dtype)

    def run_single():
        for t in single.values():
            t.grad = None
        o, _ = chunk_gated_delta_rule(single["q"], single["k"], single["v"], single["g"], single["beta"])
        o.backward(do)

    t_single = median_ms(run_single, device, args.warmup, args.repeat)
    for layout in args.layouts:
        ctx = build_cp_context(torch.tensor([0, t_local * P], device=device, dtype=torch.int32),
                               group=dist.group.WORLD, layout=layout)
        loc = single  # each rank's local part: same shape; fresh data is not needed for timing

        def run_cp():
            for t in loc.values():
                t.grad = None
            o, _ = chunk_gated_delta_rule(loc["q"], loc["k"], loc["v"], loc["g"], loc["beta"], cp_context=ctx)
            o.backward(do)

        t_cp = median_ms(run_cp, device, args.warmup, args.repeat)
        rows.append({"impl": "fla-cp", "variant": "gated_delta_rule", "layout": layout, "t_local": t_local,
                     "single_ms": t_single, "sp_ms": t_cp, "efficiency": t_single / t_cp})
    return rows


def main(args) -> int:
    if args.cuda_graph and not torch.cuda.is_available():
        raise SystemExit("seqpar bench sp: --cuda-graph captures CUDA graphs and needs GPUs; drop it on the CPU")
    device = init_distributed()
    P, rank = C.size(), C.rank()
    dtype = DTYPES[args.dtype]
    backend = resolve(args.backend, device)
    results, checks, anchors = [], [], []
    meta = {"P": P, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "backend": backend, "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim,
            "torch": torch.__version__, "repeat": args.repeat}

    def save():  # after every row, so a run cut short keeps what it measured
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "checks": checks, "results": results, "fla_anchor": anchors}, f, indent=1)
    if args.check:
        for variant in args.variants:
            for method in args.methods:
                for layout in args.layouts:
                    c = _check(variant, method, layout, backend, args, device, dtype)
                    checks.append({"variant": variant, "method": method, "layout": layout, **c})
                    save()
                    if rank == 0:
                        print(f"check {variant:17s} {method:6s} {layout:10s} max rel err {c['max_rel_err']:.2e} "
                              f"{'PASS' if c['pass'] else 'FAIL'}", flush=True)
    for t_local in args.t_local:
        for variant in args.variants:
            x = random_inputs(variant, B=1, T=t_local, H=args.heads, K=args.head_dim, V=args.head_dim,
                              dtype=torch.float32, initial_state=False, seed=rank)
            single = _leaves(x, device, dtype)
            do = torch.randn(single["v"].shape, device=device, dtype=dtype)
            plain = fwd_bwd_plain(variant, single, do, backend)
            t_single = median_ms(plain, device, args.warmup, args.repeat)
            host_single = host_ms(plain, device, args.repeat)
            for layout in args.layouts:
                for method in args.methods:
                    run = fwd_bwd_sp(variant, single, do, method, layout, backend, zeco_slices=args.zeco_slices)
                    t_sp = median_ms(run, device, args.warmup, args.repeat)
                    parts = _breakdown(variant, single, do, method, layout, backend, args.zeco_slices, device, args)
                    exposed = max(0.0, t_sp - parts["local_kernel_ms"] - parts["state_passes_ms"])
                    row = {"variant": variant, "method": method, "layout": layout, "t_local": t_local, "P": P,
                           "single_ms": t_single, "sp_ms": t_sp, "efficiency": t_single / t_sp,
                           **parts, "exposed_ms": exposed,
                           "single_host_ms": host_single, "host_ms": host_ms(run, device, args.repeat)}
                    if args.cuda_graph:
                        row.update(_graph_times(plain, run, single, device, args))
                    if args.profile and device.type == "cuda":
                        # compute kernels summed against sp_ms: the rest is the GPU idle; NCCL kernels are
                        # listed apart (their time includes waiting for the other rank)
                        start_together(device)
                        kernels = kernel_breakdown(run)
                        compute = [r for r in kernels if not r["kernel"].startswith("nccl")]
                        row["profile"] = {"compute_kernels_ms_sum": sum(r["ms"] for r in compute),
                                          "top": compute[:15],
                                          "nccl": [r for r in kernels if r["kernel"].startswith("nccl")]}
                    results.append(row)
                    save()
                    if rank == 0:
                        print(f"{variant:17s} {method:6s} {layout:10s} T_local={t_local:>7d} single {t_single:8.2f} ms"
                              f"  SP {t_sp:8.2f} ms  eff {row['efficiency']:.3f}  kernel {parts['local_kernel_ms']:.2f}"
                              f"  state {parts['state_passes_ms']:.2f}  scan {parts['scan_ms']:.3f}"
                              f"  exposed {exposed:.2f}  host {row['host_ms']:.2f} (single {host_single:.2f})"
                              + (f"  graphs: single {row['single_graph_ms']:.2f} SP {row['sp_graph_ms']:.2f} eff "
                                 f"{row['efficiency_graph']:.3f} (vs eager {row['graph_vs_eager_rel_err']:.1e})"
                                 if args.cuda_graph else ""), flush=True)
            del single, do
        if not args.no_fla and device.type == "cuda":
            rows = _fla_anchor(t_local, args, device, dtype) or []
            anchors += rows
            save()
            for row in rows:
                if rank == 0:
                    print(f"fla-cp gated_delta_rule {row['layout']:10s} T_local={t_local:>7d} single "
                          f"{row['single_ms']:8.2f} ms  SP {row['sp_ms']:8.2f} ms  eff {row['efficiency']:.3f}",
                          flush=True)
    if rank == 0:
        print(f"wrote {args.out}")
    failed = [c for c in checks if not c["pass"]]
    dist.destroy_process_group()
    return 1 if failed else 0
