"""`seqpar bench kernels`: single-GPU forward and forward+backward times of the chunk kernels.

Ours (backend "triton") and, in the same run when fla-core is installed, fla's (backend "fla"),
at B=1, H=16, K=V=128, bf16 by default. Each row also gives the achieved rate against the
device's ceilings, measured in the same run (a large device-to-device copy; a large bf16 matrix
product), and the floor: the larger of (fewest bytes / copy bandwidth) and (matrix FLOPs of the
chunkwise algorithm / matrix rate).

Timing: triton.testing.do_bench (CUDA events, median), after a warm-up call that compiles; fresh
random inputs per length. fla refuses its gated backward on Hopper with Triton < 3.7.1 (its issue
640); the guard is lifted here so that fla can be timed: its gradients are then not trusted, only
its times.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys

import torch

from seqpar.env import package_version

from .timing import kernel_breakdown

DEFAULT_VARIANTS = ["linear_attn", "lightning", "simple_gla", "gla", "delta_rule", "gated_delta_rule"]
CHUNK = 64


def configure(parser) -> None:
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="VARIANT",
                        help=f"variants to time (default: all six: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 65536, 262144], metavar="T")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128, help="K = V")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--backends", nargs="+", default=["triton", "fla"], choices=["triton", "fla", "torch"])
    parser.add_argument("--rep-ms", type=float, default=200.0, help="do_bench's repetition time per measurement")
    parser.add_argument("--output", default="bench_kernels.json", help="JSON file to write")
    parser.add_argument("--profile", action="store_true",
                        help="also record each kernel's share of one forward+backward (torch.profiler)")
    parser.set_defaults(func=run)


def inputs(variant: str, T: int, H: int, D: int, dtype, device="cuda", seed: int = 0) -> dict:
    """Random inputs of the scale a model produces (as seqpar_kernels.testing.random_inputs, drawn
    directly on the GPU: the CPU float64 draw would need tens of GB at 256K tokens)."""
    from seqpar_kernels.variants import get_variant

    var = get_variant(variant)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    x = {"q": rnd(1, T, H, D), "k": rnd(1, T, H, D) / math.sqrt(D), "v": rnd(1, T, H, D)}
    if var.gate == "head":
        x["g"] = -torch.rand(H, generator=gen, device=device) * 0.5
    elif var.gate == "token":
        x["g"] = torch.nn.functional.logsigmoid(rnd(1, T, H) + 2.0)
    elif var.gate == "key":
        x["g"] = torch.nn.functional.logsigmoid(rnd(1, T, H, D) + 2.0)
    if var.delta:
        x["k"] = torch.nn.functional.normalize(x["k"], dim=-1)
        x["beta"] = torch.sigmoid(rnd(1, T, H))
    return {n: t.to(dtype) if n != "g" or var.gate != "head" else t for n, t in x.items()}


def matrix_flops(variant: str, T: int, H: int, K: int, V: int) -> tuple[float, float]:
    """Matrix FLOPs of the chunkwise algorithm (chunks of 64): forward per token and head
    2C(K+V) (intra-chunk scores and their product with V) + 4KV (query times state, state update);
    the delta rules add the WY solve's 2CK + 2C*C + 4KV. Backward counted as twice the forward."""
    fwd = 2 * CHUNK * (K + V) + 4 * K * V
    if variant in ("delta_rule", "gated_delta_rule"):
        fwd += 2 * CHUNK * K + 2 * CHUNK * CHUNK + 4 * K * V
    fwd *= T * H
    return float(fwd), float(3 * fwd)


def min_bytes(x: dict, fwd_bwd: bool) -> float:
    """Each input read once and each output written once: q, k, v, (g, beta) -> o forward; the
    backward also reads them and do, and writes their gradients."""
    ins = sum(t.numel() * t.element_size() for t in x.values())
    out = x["v"].numel() * x["v"].element_size()
    if not fwd_bwd:
        return float(ins + out)
    return float(ins + out + ins + out + ins)


def ceilings(device="cuda") -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matrix rate, on random data."""
    return {"copy_bytes_per_s": _copy_rate(device), "bf16_matmul_flops_per_s": _matmul_rate(device)}


def _copy_rate(device) -> float:
    from triton.testing import do_bench

    src = torch.randn(2**30 // 2, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _matmul_rate(device, n: int = 8192) -> float:
    from triton.testing import do_bench

    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def lift_fla_hopper_guard() -> None:
    try:
        import fla.ops.common.chunk_o as chunk_o

        chunk_o.TRITON_ABOVE_3_7_1 = True
    except (ImportError, AttributeError):
        pass


def time_backend(variant: str, backend: str, x: dict, rep_ms: float, profile: bool = False) -> dict:
    """Median ms of forward (no autograd) and forward+backward."""
    import seqpar_kernels as sk
    from triton.testing import do_bench

    kw = {n: t for n, t in x.items() if n in ("g", "beta")}
    q, k, v = x["q"], x["k"], x["v"]

    def fwd():
        with torch.no_grad():
            return sk.chunk(variant, q, k, v, **kw, backend=backend)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + [
        kw[n].detach().requires_grad_() for n in ("g", "beta") if n in kw]
    lkw = dict(zip([n for n in ("g", "beta") if n in kw], leaves[3:]))
    do = torch.randn_like(v)

    def fwd_bwd():
        o, _ = sk.chunk(variant, *leaves[:3], **lkw, backend=backend)
        return torch.autograd.grad(o, leaves, do)

    res = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        res[name + "_ms"] = do_bench(fn, warmup=max(25.0, rep_ms / 4), rep=rep_ms, return_mode="median")
    if profile:
        res["fwd_bwd_kernels"] = kernel_breakdown(fwd_bwd)
    return res


def usable(variant: str, backend: str) -> str | None:
    """None if `backend` can run `variant` here, else why not."""
    from seqpar_kernels import backends

    why = backends.unusable_reason(backend, torch.device("cuda"))
    if why:
        return why
    if backend == "triton" and variant in ("delta_rule", "gated_delta_rule"):
        import importlib.util

        if importlib.util.find_spec("seqpar_kernels.triton.delta") is None:
            return "the Triton delta-rule kernels are not built"
    return None


def run(args) -> int:
    if not torch.cuda.is_available():
        print("seqpar bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    lift_fla_hopper_guard()
    dtype = getattr(torch, args.dtype)
    H, D = args.heads, args.dim
    ceil = ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
          f"bf16 matmul {ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (measured)", flush=True)
    rows, skipped = [], {}
    for variant in args.variants:
        for T in args.lengths:
            x = inputs(variant, T, H, D, dtype, seed=T)
            flops_f, flops_fb = matrix_flops(variant, T, H, D, D)
            bytes_f, bytes_fb = min_bytes(x, False), min_bytes(x, True)
            floor_f = max(bytes_f / ceil["copy_bytes_per_s"], flops_f / ceil["bf16_matmul_flops_per_s"]) * 1e3
            floor_fb = max(bytes_fb / ceil["copy_bytes_per_s"], flops_fb / ceil["bf16_matmul_flops_per_s"]) * 1e3
            row = {"variant": variant, "T": T, "B": 1, "H": H, "K": D, "V": D, "dtype": args.dtype,
                   "matrix_flops": {"fwd": flops_f, "fwd_bwd": flops_fb},
                   "min_bytes": {"fwd": bytes_f, "fwd_bwd": bytes_fb},
                   "floor_ms": {"fwd": floor_f, "fwd_bwd": floor_fb}, "bound": {
                       "fwd": "bytes" if bytes_f / ceil["copy_bytes_per_s"] > flops_f / ceil[
                           "bf16_matmul_flops_per_s"] else "flops",
                       "fwd_bwd": "bytes" if bytes_fb / ceil["copy_bytes_per_s"] > flops_fb / ceil[
                           "bf16_matmul_flops_per_s"] else "flops"}}
            for backend in args.backends:
                why = usable(variant, backend)
                if why:
                    skipped[f"{variant}/{backend}"] = why
                    continue
                try:
                    row[backend] = time_backend(variant, backend, x, args.rep_ms, args.profile)
                    for r in row[backend].get("fwd_bwd_kernels", [])[:8]:
                        print(f"    {backend:6s} {r['ms']:8.3f} ms x{r['calls']:<3d} {r['kernel']}")
                except Exception as e:  # noqa: BLE001 - a failing backend is reported, the rest still run
                    row[backend] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                torch.cuda.empty_cache()
            rows.append(row)
            print(format_row(row, ceil), flush=True)
            write(args.output, ceil, rows, skipped)  # after every row: a run cut short keeps what it measured
            del x
            torch.cuda.empty_cache()
    print()
    print(table(rows, ceil))
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    print(f"wrote {args.output}")
    return 0


def write(path: str, ceil: dict, rows: list, skipped: dict) -> None:
    import triton

    result = {"benchmark": "kernels", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "fla": package_version("fla-core"), "python": platform.python_version(),
              "ceilings": ceil, "rows": rows, "skipped": skipped,
              "method": "triton.testing.do_bench median, CUDA events, warm-up call excluded; "
                        "fla's Hopper guard lifted for timing only"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _ms(r: dict | None, key: str) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "err"
    return f"{r[key]:.2f}"


def _ratio(row, key) -> str:
    a, b = row.get("fla"), row.get("triton")
    if not a or not b or "error" in a or "error" in b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def format_row(row: dict, ceil: dict) -> str:
    t = row.get("triton")
    rate = ""
    if t and "error" not in t:
        tf = row["matrix_flops"]["fwd_bwd"] / (t["fwd_bwd_ms"] * 1e-3) / 1e12
        gb = row["min_bytes"]["fwd_bwd"] / (t["fwd_bwd_ms"] * 1e-3) / 1e9
        floor = row["floor_ms"]["fwd_bwd"]
        rate = f"{tf:6.0f} {gb:6.0f} {floor:6.2f} {t['fwd_bwd_ms'] / floor:5.1f}"
    else:
        rate = f"{'-':>6s} {'-':>6s} {row['floor_ms']['fwd_bwd']:6.2f} {'-':>5s}"
    return (f"{row['variant']:16s} {row['T'] // 1024:4d}K {_ms(t, 'fwd_ms'):>7s} {_ms(row.get('fla'), 'fwd_ms'):>7s} "
            f"{_ratio(row, 'fwd_ms'):>5s} {_ms(t, 'fwd_bwd_ms'):>7s} {_ms(row.get('fla'), 'fwd_bwd_ms'):>7s} "
            f"{_ratio(row, 'fwd_bwd_ms'):>5s} {rate}")


def table(rows, ceil) -> str:
    head = (f"{'variant':16s} {'T':>5s} {'fwd':>7s} {'fla':>7s} {'x':>5s} {'f+b':>7s} {'fla':>7s} {'x':>5s} "
            f"{'TF/s':>6s} {'GB/s':>6s} {'floor':>6s} {'gap':>5s}")
    note = ("times in ms (median); x = fla / ours; TF/s = matrix FLOP/s of our f+b; GB/s = fewest bytes of "
            f"f+b / our time (ceilings: {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s copy, "
            f"{ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s bf16); floor = f+b floor ms; gap = ours / floor")
    return "\n".join([head] + [format_row(r, ceil) for r in rows] + [note])
