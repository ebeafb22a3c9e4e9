"""`seqpar bench sp-host`: what the host issues for one SP linear-attention forward+backward,
on the CPU (spawns its own gloo ranks; no GPU, no torchrun).

    seqpar bench sp-host --out sp_host.json

At the GPU benchmark's shortest lengths the SP call is launch-bound (docs/performance.md, run 3b):
the host needs longer to issue the call than the GPU to run it. Host work is Python plus the
dispatcher's work per op, independent of the tensor sizes, so it shows on the CPU with tiny tensors.
Per variant x method x layout this counts, for one forward+backward on every rank (the largest):
  * ops: the aten ops the dispatcher runs outside the Triton kernels; `launching` leaves out those
    that start no GPU kernel (views, empty allocations); `syncs` are reads of a tensor's value on
    the host (a device sync on a GPU);
  * triton: Triton kernel launches (each costs the host a launch through Triton's Python launcher);
  * comm: collectives and point-to-point messages (seqpar.comm counters);
and times the host's wall time per call (median over repeats, slowest rank), against the plain
single-device kernel on the same local tensors; `-waits` is that time less what the host spent
blocked in collectives (gloo blocks the host until the other ranks arrive; NCCL leaves the waiting
to the GPU), the nearer estimate of the GPU host's issue time. The Triton kernels are launched through their real
launchers but their bodies are skipped (on the CPU they run only in Triton's interpreter, which
would dominate the time; the outputs of a skipped launch are left unwritten, which changes no op
count: the host path does not read them). `--run-kernels` executes them in the interpreter for the
counts (slow; the timing still skips them). With `--backend torch` nothing is skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import seqpar_kernels as sk
from seqpar import sp
from seqpar.comm import counting

from .sp import fwd_bwd_plain, fwd_bwd_sp, local_leaves

# ops that start no GPU kernel: views, metadata, uninitialised allocations
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "as_strided", "select", "slice", "unsqueeze",
    "squeeze", "t", "transpose", "permute", "detach", "alias", "split", "split_with_sizes", "tensor_split",
    "unbind", "narrow", "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "lift_fresh",
    "is_same_size", "view_as", "expand_as", "flatten", "unflatten", "chunk", "_local_scalar_dense",
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block, by name (paused inside Triton launches)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        total = sum(self.ops.values())
        launching = sum(n for op, n in self.ops.items() if op not in NO_KERNEL)
        return {"ops": total, "launching": launching, "syncs": self.ops.get("_local_scalar_dense", 0)}


@contextlib.contextmanager
def triton_launches(run: bool = True, counter: OpCounter | None = None):
    """Count every Triton kernel launch (`kernel[grid](...)`) inside the block; run=False skips the
    kernel body (the launch is still counted). Ops inside a launch are not counted by `counter`."""
    from triton.runtime.jit import KernelInterface

    launches: Counter = Counter()
    original = KernelInterface.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)

        def counted(*args, **kwargs):
            launches[getattr(self, "__name__", None) or self.fn.__name__] += 1
            if not run:
                return None
            if counter is not None:
                counter.paused += 1
            try:
                return launch(*args, **kwargs)
            finally:
                if counter is not None:
                    counter.paused -= 1
        return counted

    KernelInterface.__getitem__ = getitem
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


@contextlib.contextmanager
def comm_waits():
    """Seconds the host spends blocked in collectives inside the block (a list, one entry per
    block): gloo blocks the host until the other ranks arrive, NCCL does not (the GPU waits), so
    the host's issue time on a GPU is nearer the wall time less these waits."""
    from seqpar.comm import collectives as C

    Work = torch._C._distributed_c10d.Work
    blocked, depth = [0.0], [0]

    def timed(fn):
        def wrapper(*args, **kwargs):  # the outermost call counts (a blocking collective waits inside)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    blocked[0] += time.perf_counter() - t0
        return wrapper

    # gloo's isend / irecv also block for a while; what collectives.py calls is looked up at call time
    saved = C._all_gather_flat, dist.all_reduce, dist.isend, dist.irecv, Work.wait
    C._all_gather_flat, dist.all_reduce, dist.isend, dist.irecv, Work.wait = (timed(f) for f in saved)
    try:
        yield blocked
    finally:
        C._all_gather_flat, dist.all_reduce, dist.isend, dist.irecv, Work.wait = saved


def configure(parser) -> None:
    parser.add_argument("--variants", nargs="+", default=list(sk.VARIANTS), choices=list(sk.VARIANTS))
    parser.add_argument("--methods", nargs="+", default=list(sp.METHODS), choices=list(sp.METHODS))
    parser.add_argument("--layouts", nargs="+", default=list(sp.LAYOUTS), choices=list(sp.LAYOUTS))
    parser.add_argument("--world-size", type=int, default=2, help="gloo ranks to spawn (the SP size P)")
    parser.add_argument("--t-local", type=int, default=256, help="tokens per rank (tiny: compute is negligible)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--backend", default="triton", choices=["triton", "torch"])
    parser.add_argument("--run-kernels", action="store_true", help="execute the Triton kernels when counting")
    parser.add_argument("--validate", action="store_true", help="the SP call with validate=True (the default)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="sp_host.json")
    parser.set_defaults(func=main)


def local_inputs(variant, P, t_local, heads, head_dim, layout, seed=0):
    """This rank's shard of a random whole-sequence problem (fp32 leaves) and an upstream gradient."""
    from seqpar_kernels.testing import random_inputs

    x = random_inputs(variant, B=1, T=t_local * P, H=heads, K=head_dim, V=head_dim, dtype=torch.float32,
                      initial_state=False, seed=seed)
    leaves = local_leaves(x.tensors(), layout)
    return leaves, torch.randn_like(leaves["v"])


def count(run, backend: str, run_kernels: bool = False) -> dict:
    """What one call of run() issues on this rank (see the module docstring), after a first call
    has filled the caches."""
    with triton_launches(run_kernels) if backend == "triton" else contextlib.nullcontext():
        run()
    with counting() as comm, OpCounter() as ops:
        with (triton_launches(run_kernels, ops) if backend == "triton" else contextlib.nullcontext(Counter())) as tl:
            run()
    return {**ops.summary(), "triton": sum(tl.values()), "comm": dict(comm.calls),
            "top_ops": dict(ops.ops.most_common(12)), "launches": dict(tl)}


def issue_ms(run, backend: str, warmup: int, repeat: int) -> tuple[float, float]:
    """Median wall milliseconds of run() on this rank, every run started together, and the median
    of the same less the time blocked in collectives (comm_waits); the slowest rank's."""
    with triton_launches(run=False) if backend == "triton" else contextlib.nullcontext():
        for _ in range(warmup):
            run()
        wall, issue = [], []
        for _ in range(repeat):
            dist.barrier()
            with comm_waits() as blocked:
                t0 = time.perf_counter()
                run()
                t = time.perf_counter() - t0
            wall.append(t * 1e3)
            issue.append((t - blocked[0]) * 1e3)
    med = torch.tensor([statistics.median(wall), statistics.median(issue)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return tuple(med.tolist())


def _max_over_ranks(c: dict) -> dict:
    """The largest count of each kind over the ranks (ranks differ: the chain's ends do less)."""
    keys = ["ops", "launching", "syncs", "triton"]
    t = torch.tensor([c[k] for k in keys], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {**c, **dict(zip(keys, t.tolist()))}


def measure(rank, P, opts: dict) -> list[dict]:
    torch.manual_seed(rank)
    rows = []
    for variant in opts["variants"]:
        x, do = local_inputs(variant, P, opts["t_local"], opts["heads"], opts["head_dim"], "contiguous")
        plain = fwd_bwd_plain(variant, x, do, opts["backend"])
        c_plain = _max_over_ranks(count(plain, opts["backend"], opts["run_kernels"]))
        t_plain = issue_ms(plain, opts["backend"], opts["warmup"], opts["repeat"])[0]  # no collectives
        for layout in opts["layouts"]:
            for method in opts["methods"]:
                run = fwd_bwd_sp(variant, x, do, method, layout, opts["backend"], validate=opts["validate"])
                c = _max_over_ranks(count(run, opts["backend"], opts["run_kernels"]))
                wall, issue = issue_ms(run, opts["backend"], opts["warmup"], opts["repeat"])
                rows.append({"variant": variant, "method": method, "layout": layout, "sp": c, "plain": c_plain,
                             "sp_host_ms": wall, "sp_host_ms_less_comm_waits": issue, "plain_host_ms": t_plain})
    return rows


def main(args) -> int:
    if args.backend == "triton":  # the kernels exist on the CPU only in the interpreter; set before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from seqpar.testing import run_ranks

    opts = {k: getattr(args, k) for k in ("variants", "methods", "layouts", "t_local", "heads", "head_dim",
                                         "backend", "run_kernels", "validate", "warmup", "repeat")}
    rows = run_ranks(measure, args.world_size, args=(opts,), timeout=3600)[0]
    print(f"P={args.world_size} gloo, T_local={args.t_local}, H={args.heads}, K=V={args.head_dim}, fp32, "
          f"backend {args.backend}; counts: the largest over the ranks for one forward+backward")
    print(f"{'variant':17s} {'method':6s} {'layout':10s} {'ops':>5s} {'launch':>6s} {'triton':>6s} {'comm':>4s} "
          f"{'host ms':>8s} {'-waits':>7s} | plain: {'ops':>4s} {'launch':>6s} {'triton':>6s} {'host ms':>8s}")
    for r in rows:
        s, p = r["sp"], r["plain"]
        print(f"{r['variant']:17s} {r['method']:6s} {r['layout']:10s} {s['ops']:5d} {s['launching']:6d} "
              f"{s['triton']:6d} {sum(s['comm'].values()):4d} {r['sp_host_ms']:8.3f} "
              f"{r['sp_host_ms_less_comm_waits']:7.3f} | "
              f"{p['ops']:11d} {p['launching']:6d} {p['triton']:6d} {r['plain_host_ms']:8.3f}")
    meta = {"world_size": args.world_size, "t_local": args.t_local, "heads": args.heads, "head_dim": args.head_dim,
            "backend": args.backend, "validate": args.validate, "repeat": args.repeat, "torch": torch.__version__,
            "device": "cpu", "threads_per_rank": 1}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0
