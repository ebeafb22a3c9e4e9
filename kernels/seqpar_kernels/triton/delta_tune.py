"""GPU check and benchmark of the Triton delta-rule kernels (seqpar_kernels.triton.delta).

1. Every launch configuration in CONFIGS is checked against the float64 chunked reference
   (seqpar_kernels.chunk_torch, itself tested equal to the token recurrence) at several shapes:
   outputs, final state, every gradient, final_state / state_grad alone, the identity-start
   transition, and the same outputs in the SP call's order (summaries first, on one memo'd Call,
   over several state segments); one process per configuration, in parallel (compiling dominates).
2. Configurations that pass are timed (median of triton.testing.do_bench) at B=1, H=16, K=V=128,
   bf16: forward, forward+backward, final_state, state_grad; with --sp also one shard as the SP
   call runs it against the kernel alone (the SP efficiency with free communication); fla-core's
   chunk kernels in the same run when installed (its Hopper guard lifted for timing: its gradients
   are not trusted here).
3. A per-kernel breakdown (torch.profiler) of each configuration's forward+backward; with --sp
   every launch of the SP order.

    python -m seqpar_kernels.triton.delta_tune --out DIR [--lengths 65536,262144] [--no-fla] [--sp]

Writes DIR/delta_gpu.json (rewritten as results arrive) and prints tables; exits non-zero if any
configuration fails a check. Device time on a fresh H100: the checks compile for ~150 s (one
process per worker, in parallel), but fla's first calls autotune for ~250 s (in the main process,
at the same time), so allow ~330 s plus the machine's start; --no-fla saves ~100 s.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback

# Each configuration is checked (by one or more workers, each with its own case list) before it
# is timed. "A" is delta.CONFIG (the defaults); the others vary launch settings so that each is
# verified on its own. Add the settings to try here; those of runs 8-11 and their times are in
# docs/performance.md ("Delta-rule kernels") and the JSON beside it. Run 11, one shard under SP
# (--sp; shard / sp at 64K and 256K, gated_delta_rule), with the kernel after the summaries running
# the scan and pass 3 over the state segments: segments of 32 chunks 0.859 / 0.868, 64 0.884 /
# 0.900, 128 0.907 / 0.914, 256 0.914 / 0.922 (the default), 512 0.848 / 0.924; the backward's pair
# of chains (delta_rule's 2.06 ms at 64K against gated_delta_rule's 1.67) in 16- or 64-wide
# column blocks or 2 stages: slower for both variants; delta_rule through the gated kernels with a
# zero gate at every head dim ({"zero_gate_above": 0}, 11k): its chains as fast as the gated
# ones, but the whole 7.85 ms against 7.47; dO scaled before the reverse chain's product as in the
# gated chain (11j): slower (reverse summary 0.84 against 0.76 ms); the zero gate in the chains
# only (11l): 7.08, in the launches with a reverse chain only (11m; since then the reverse chain
# always carries a gate): 7.01.
CONFIGS = {
    "A": {},
    "S16": {"state_seg_chunks": 16},  # the summaries over several segments at the checked lengths
}
WORKERS = [("A", "core"), ("A", "ext"), ("S16", "summaries")]
TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 5e-3}
# DELTA_GPU_SMOKE=1 TRITON_INTERPRET=1: the whole script on the CPU under the Triton interpreter at
# tiny sizes (checks the script itself before it spends device time). The interpreter must be on
# before the package's kernels are defined, i.e. before this module runs: it cannot switch it on.
SMOKE = os.environ.get("DELTA_GPU_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("DELTA_GPU_SMOKE=1 runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1 as well")


def _sync():
    import torch

    if not SMOKE:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# checks (run in a worker process per configuration)
# ------------------------------------------------------------------------------------------------

def _inputs(variant, B, T, H, K, V, dtype, *, h0, cu=None, seed=0):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=DEV).manual_seed(seed)
    dev = DEV

    def rnd(*s):
        return torch.randn(*s, generator=gen, device=dev, dtype=torch.float32)

    q = rnd(B, T, H, K).to(dtype)
    k = F.normalize(rnd(B, T, H, K), dim=-1).to(dtype)
    v = rnd(B, T, H, V).to(dtype)
    beta = torch.sigmoid(rnd(B, T, H)).to(dtype)
    g = F.logsigmoid(rnd(B, T, H) + 2.0) if variant == "gated_delta_rule" else None
    n = B if cu is None else len(cu) - 1
    s0 = rnd(n, H, K, V) if h0 else None
    cu_t = torch.tensor(cu, dtype=torch.int64, device=dev) if cu is not None else None
    return q, k, v, g, beta, s0, cu_t


def _check_case(delta, variant, B, T, H, K, V, dtype_name, *, h0, dht, cu=None, seed=0, passes=False,
                as_in_sp=False):
    """Errors of every output of one call against the float64 reference; as_in_sp: the same
    outputs again as one shard under SP computes them (run_as_in_sp: the kernel after the summaries)."""
    import torch

    from seqpar_kernels.explicit import Call, TorchKernel, run_as_autograd, run_as_in_sp
    from seqpar_kernels.testing import rel_err

    dtype = getattr(torch, dtype_name)
    q, k, v, g, beta, s0, cu_t = _inputs(variant, B, T, H, K, V, dtype, h0=h0, cu=cu, seed=seed)
    scale = K ** -0.5
    call = Call(q, k, v, g, beta, scale, cu_t)
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    call64 = Call(d64(q), d64(k), d64(v), d64(g), d64(beta), scale, cu_t)
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    do = torch.randn(v.shape, generator=gen, device=DEV).to(dtype)
    n = B if cu is None else len(cu) - 1
    g_ht = torch.randn(n, H, K, V, generator=gen, device=DEV) if dht else None
    ref = TorchKernel()
    ro, rht = ref.forward(call64, d64(s0))
    rg = ref.backward(call64, d64(s0) if s0 is not None else None, d64(do), d64(g_ht))
    o, ht, gr = run_as_autograd(delta, call, do, s0, g_ht)
    got = {"o": (o, ro), "ht": (ht, rht), "dq": (gr.dq, rg.dq), "dk": (gr.dk, rg.dk), "dv": (gr.dv, rg.dv),
           "dbeta": (gr.dbeta, rg.dbeta), "dh0": (gr.dh0, rg.dh0)}
    if g is not None:
        got["dg"] = (gr.dg, rg.dg)
    if as_in_sp:
        so, sht, sgr = run_as_in_sp(delta, call, do, s0, g_ht, transition=True)
        got.update({"sp_o": (so, ro), "sp_ht": (sht, rht), "sp_dq": (sgr.dq, rg.dq), "sp_dk": (sgr.dk, rg.dk),
                    "sp_dv": (sgr.dv, rg.dv), "sp_dbeta": (sgr.dbeta, rg.dbeta), "sp_dh0": (sgr.dh0, rg.dh0)})
        if g is not None:
            got["sp_dg"] = (sgr.dg, rg.dg)
    if passes:
        got["final_state"] = (delta.final_state(call, s0), rht)
        got["state_grad"] = (delta.state_grad(call, do, g_ht), rg.dh0)
        # the dense transition of every document (v = 0 from the identity), twice: by final_state,
        # and composed by final_state_and_transition (the SP summary). Checked at these lengths:
        # over the 16K+ tokens that the default state segments need, it underflows to ~0 in fp32
        eye = torch.eye(K, device=DEV).expand(n, H, K, K).contiguous()
        zv = torch.zeros(B, T, H, K, device=DEV, dtype=dtype)
        _, rm = ref.forward(Call(d64(q), d64(k), zv.double(), d64(g), d64(beta), scale, cu_t), eye.double())
        got["transition"] = (delta.final_state(Call(q, k, zv, g, beta, scale, cu_t), eye), rm)
        sp_ht, sp_m = delta.final_state_and_transition(call, s0)
        got.update({"summary_ht": (sp_ht, rht), "summary_transition": (sp_m, rm)})
    _sync()
    errs = {}
    for name, (a, b) in got.items():
        errs[name] = float("nan") if not bool(torch.isfinite(a).all()) else rel_err(a, b)
    return errs


def _cases(which: str):
    """core: the timed specialisation (B=1, H=16, T a multiple of 16, no h0 / dht), with the
    state-only passes and the transition, and packed documents with h0 / dht; ext: the rest;
    summaries: the cases of both variants with the state-only passes and the transition (for a
    configuration that cuts them into segments: delta_rule's transition is the one that does not
    underflow to ~0 over 8192 tokens)."""
    cu_long = [0, 5000, 5001, 9000]
    if SMOKE:
        return [("gated_delta_rule", 1, 128, 2, 16, 16, "float32", dict(h0=False, dht=False, passes=True)),
                ("gated_delta_rule", 1, 300, 1, 16, 16, "float32",
                 dict(h0=True, dht=True, cu=[0, 1, 130, 300], passes=True, as_in_sp=True))][: 1 if which == "ext" else 2]
    if which == "summaries":
        return [c for c in _cases("core") + _cases("ext") if c[-1].get("passes")]
    if which == "core":
        return [
            ("gated_delta_rule", 1, 8192, 16, 128, 128, "bfloat16", dict(h0=False, dht=False, passes=True)),
            ("gated_delta_rule", 1, 9000, 2, 128, 128, "bfloat16", dict(h0=True, dht=True, cu=cu_long, passes=True)),
            # long enough for three segments of state_seg_chunks (default 256 chunks)
            ("gated_delta_rule", 1, 40000, 4, 128, 128, "bfloat16", dict(h0=True, dht=True, as_in_sp=True)),
        ]
    return [
        ("delta_rule", 1, 8192, 16, 128, 128, "bfloat16", dict(h0=False, dht=False, passes=True)),
        ("delta_rule", 1, 9000, 2, 128, 128, "bfloat16", dict(h0=True, dht=True, cu=cu_long, passes=True)),
        ("delta_rule", 1, 40000, 4, 128, 128, "bfloat16", dict(h0=True, dht=True, as_in_sp=True)),
        ("gated_delta_rule", 1, 33000, 2, 128, 128, "bfloat16",
         dict(h0=True, dht=True, cu=[0, 100, 20000, 33000], as_in_sp=True)),
        ("gated_delta_rule", 2, 1000, 4, 128, 128, "bfloat16", dict(h0=True, dht=True)),
        ("gated_delta_rule", 1, 777, 2, 64, 64, "float16", dict(h0=True, dht=True)),
        ("gated_delta_rule", 1, 500, 2, 256, 256, "bfloat16", dict(h0=True, dht=True)),
        ("delta_rule", 1, 500, 2, 256, 256, "bfloat16", dict(h0=True, dht=True)),
        ("gated_delta_rule", 1, 300, 2, 128, 128, "float32", dict(h0=True, dht=True)),
    ]


def check_config(name: str, overrides: dict, which: str) -> dict:
    """Worker: the check cases `which` of one configuration."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from seqpar_kernels.triton import delta
    from seqpar_kernels.variants import InputError

    delta.CONFIG.update(overrides)
    out = {"config": name, "which": which, "overrides": overrides, "cases": [], "ok": True}
    t0 = time.time()
    try:
        for variant, B, T, H, K, V, dt, kw in _cases(which):
            try:
                errs = _check_case(delta, variant, B, T, H, K, V, dt, **kw)
            except InputError as e:  # a shape the kernels refuse on this GPU (see delta._layout): not run
                out["cases"].append({"variant": variant, "K": K, "V": V, "restricted": str(e)})
                continue
            tol = TOL[dt]
            ok = all(math.isfinite(e) and e < tol for e in errs.values())
            out["ok"] &= ok
            out["cases"].append({"variant": variant, "B": B, "T": T, "H": H, "K": K, "V": V, "dtype": dt,
                                 **{k: v for k, v in kw.items() if k != "cu"},
                                 "cu_seqlens": kw.get("cu"), "tol": tol, "ok": ok, "errors": errs})
    except Exception:  # a compile or launch failure fails the configuration, with its trace
        out["ok"] = False
        out["error"] = traceback.format_exc()
    out["seconds"] = time.time() - t0
    return out


# ------------------------------------------------------------------------------------------------
# timing (main process)
# ------------------------------------------------------------------------------------------------

def _bench(fn):
    import triton

    if SMOKE:
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def _fla_fns(variant):
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # fla is optional
        return None, f"fla not importable: {e!r}"
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # lift the Hopper guard: times only, gradients untrusted
    import fla

    if variant == "gated_delta_rule":
        return (lambda q, k, v, g, beta, scale: chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]), fla.__version__
    return (lambda q, k, v, g, beta, scale: chunk_delta_rule(q, k, v, beta, scale=scale)[0]), fla.__version__


MEASURES = ("fwd", "fwdbwd", "final_state", "state_grad")


def time_config(delta, variant, T, with_fla=False, measures=MEASURES):
    """Median ms of each measure: fwd, fwdbwd (no h0 / dht, as fla is timed), final_state,
    state_grad; shard (fwdbwd with h0 and dht, a shard under SP), sp and sp_m (the same in the SP
    call's order, without and with the dense transition: see run_as_in_sp)."""
    import torch

    from seqpar_kernels.explicit import Call, run_as_autograd, run_as_in_sp

    H, D, dt = (2, 16, torch.float32) if SMOKE else (16, 128, torch.bfloat16)
    q, k, v, g, beta, _, _ = _inputs(variant, 1, T, H, D, D, dt, h0=False, seed=T)
    scale = D ** -0.5
    call = Call(q, k, v, g, beta, scale)
    do = torch.randn_like(v)
    h0, dht = (0.1 * torch.randn(1, H, D, D, device=DEV) for _ in range(2))
    res = {}
    fns = {
        "fwd": lambda: delta.forward(call, None),
        "fwdbwd": lambda: run_as_autograd(delta, call, do),
        "final_state": lambda: delta.final_state(call, None),
        "state_grad": lambda: delta.state_grad(call, do, None),
        "shard": lambda: run_as_autograd(delta, call, do, h0, dht),
        "sp": lambda: run_as_in_sp(delta, call, do, h0, dht, False),
        "sp_m": lambda: run_as_in_sp(delta, call, do, h0, dht, True),
    }
    for m in measures:
        res[m] = _bench(fns[m])
    if with_fla:
        fn, ver = _fla_fns(variant)
        if fn is not None:
            res["fla_version"] = ver
            with torch.no_grad():
                res["fla_fwd"] = _bench(lambda: fn(q, k, v, g, beta, scale))
            xs = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, g, beta)]
            leaves = [t for t in xs if t is not None]

            def fb():  # gradients returned, not accumulated into .grad (ours are not accumulated either)
                torch.autograd.grad(fn(*xs, scale), leaves, do)

            res["fla_fwdbwd"] = _bench(fb)
            del xs
        else:
            res["fla_error"] = ver
    if not SMOKE:
        torch.cuda.empty_cache()
    return res


def breakdown(delta, variant, T, as_in_sp=False):
    """CUDA time per kernel name over one forward+backward (torch.profiler); as_in_sp: of one shard
    in the SP call's order with the transition (run_as_in_sp), every launch in order, as
    [name, ms] (the summary passes and the kernel launch the same kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from seqpar_kernels.explicit import Call, run_as_autograd, run_as_in_sp

    H, D, dt = (2, 16, torch.float32) if SMOKE else (16, 128, torch.bfloat16)
    q, k, v, g, beta, _, _ = _inputs(variant, 1, T, H, D, D, dt, h0=False, seed=1)
    call = Call(q, k, v, g, beta, D ** -0.5)
    do = torch.randn_like(v)
    h0, dht = (0.1 * torch.randn(1, H, D, D, device=DEV) for _ in range(2))
    run = (lambda: run_as_in_sp(delta, call, do, h0, dht, True)) if as_in_sp else (lambda: run_as_autograd(delta, call, do))
    iters = 1 if as_in_sp else 3
    for _ in range(2):
        run()
    _sync()
    with profile(activities=[ProfilerActivity.CPU if SMOKE else ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        _sync()
    if as_in_sp:
        kind = "CPU" if SMOKE else "CUDA"  # the smoke run has no device: its outermost CPU ops
        events = sorted((e for e in prof.events() if e.device_type.name == kind and not (SMOKE and e.cpu_parent)),
                        key=lambda e: e.time_range.start)
        return [[e.name, e.time_range.elapsed_us() / 1e3] for e in events]
    rows = {}
    for e in prof.key_averages():
        t = e.cpu_time_total if SMOKE else (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0))
        if t:
            rows[e.key] = {"ms_per_iter": t / 1e3 / iters, "calls_per_iter": e.count / iters}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms_per_iter"]))


def ceilings():
    import torch

    if SMOKE:
        return {}
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x))
    bw = 2 * x.numel() / (t * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    tm = _bench(lambda: a @ b)
    return {"copy_TBps": bw, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / (tm * 1e-3) / 1e12}


def _dump(report, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "delta_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)


def _fmt(d):
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="65536,262144")
    ap.add_argument("--no-fla", action="store_true", help="skip fla (its autotuning costs ~250 s of device time)")
    ap.add_argument("--delta-rule-all", action="store_true", help="time delta_rule for every configuration (else A's)")
    ap.add_argument("--sp", action="store_true",
                    help="also time each shard as the SP call runs it (summary passes + kernel: shard, sp, sp_m)")
    args = ap.parse_args()
    measures = MEASURES + (("shard", "sp", "sp_m") if args.sp else ())
    fla = not (SMOKE or args.no_fla)
    import torch
    import triton

    lengths = [int(x) for x in args.lengths.split(",")]
    report = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "configs": CONFIGS}
    print(report, flush=True)
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(WORKERS)) as pool:
        pending = [pool.apply_async(check_config, (n, CONFIGS[n], w)) for n, w in WORKERS]
        # meanwhile: compile / autotune fla once (its autotuning is not keyed on T), the ceilings
        from seqpar_kernels.triton import delta

        report["ceilings"] = ceilings()
        print("ceilings", report["ceilings"], flush=True)
        for variant in ("gated_delta_rule", "delta_rule") if fla else ():
            try:
                time_config(delta, variant, 16384, with_fla=True, measures=())
            except Exception:
                report.setdefault("fla_warm_errors", []).append(traceback.format_exc())
        checks = [p.get() for p in pending]
    report["checks"] = checks
    report["check_seconds"] = time.time() - t0
    print(f"\nchecks ({report['check_seconds']:.0f}s)", flush=True)
    for c in checks:
        worst = {}
        for case in c["cases"]:
            for k, e in case.get("errors", {}).items():
                worst[k] = max(worst.get(k, 0.0), e) if math.isfinite(e) else float("nan")
        print(f"  {c['config']}/{c['which']:5s} {'PASS' if c['ok'] else 'FAIL'} {c['seconds']:.0f}s worst: "
              + " ".join(f"{k}={v:.1e}" for k, v in worst.items()), flush=True)
        if "error" in c:
            print(c["error"], flush=True)
        for case in c["cases"]:
            if "restricted" in case:
                print(f"    restricted: {case['variant']} K={case['K']} V={case['V']}", flush=True)
            elif not case["ok"]:
                print("    failed:", case, flush=True)
    passed = [n for n in CONFIGS if all(c["ok"] for c in checks if c["config"] == n)]
    _dump(report, args.out)

    defaults = dict(delta.CONFIG)
    timings, breakdowns = {}, {}
    report["timings"], report["breakdown"] = timings, breakdowns

    def use(n):
        delta.CONFIG.clear()
        delta.CONFIG.update(defaults, **CONFIGS[n])

    for i, n in enumerate(passed):  # gated_delta_rule for every configuration, delta_rule for A or all
        use(n)
        for variant in ("gated_delta_rule", "delta_rule") if (n == "A" or args.delta_rule_all) else ("gated_delta_rule",):
            for T in lengths:
                key = f"{n}/{variant}/{T}"
                timings[key] = time_config(delta, variant, T, with_fla=fla and i == 0, measures=measures)
                print(key, _fmt(timings[key]), flush=True)
            breakdowns[f"{n}/{variant}/{lengths[0]}"] = breakdown(delta, variant, lengths[0])
            if args.sp:
                report[f"sp_launches/{n}/{variant}/{lengths[0]}"] = breakdown(delta, variant, lengths[0], as_in_sp=True)
            _dump(report, args.out)
    report["seconds"] = time.time() - t0
    _dump(report, args.out)
    if passed:
        first = passed[0]
        print(f"\nfwd+bwd ms, B=1 H=16 K=V=128 bf16, {report['device']}")
        print(f"{'config':8s}" + "".join(f"{T:>12d}" for T in lengths))
        print(f"{'fla':8s}" + "".join(f"{timings[f'{first}/gated_delta_rule/{T}'].get('fla_fwdbwd', float('nan')):12.3f}"
                                     for T in lengths))
        for n in passed:
            print(f"{n:8s}" + "".join(f"{timings[f'{n}/gated_delta_rule/{T}']['fwdbwd']:12.3f}" for T in lengths))
        if args.sp:  # the compute-only ceiling of SP efficiency: shard alone over shard with its summaries
            print("\nshard / as in SP (no transition, with transition)")
            for key, t in timings.items():
                print(f"  {key:32s} {t['shard'] / t['sp']:.3f} {t['shard'] / t['sp_m']:.3f}")
        for key, rows in breakdowns.items():
            print("breakdown", key, " ".join(f"{kn}={r['ms_per_iter']:.3f}x{r['calls_per_iter']:.0f}"
                                              for kn, r in rows.items() if r["ms_per_iter"] > 0.01))
    failed = [n for n in CONFIGS if n not in passed]
    if failed:
        print("FAILED configurations:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
