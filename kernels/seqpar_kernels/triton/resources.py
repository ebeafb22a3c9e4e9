"""Compile the Triton kernels for Hopper without a GPU and print what each one costs.

    python -m seqpar_kernels.triton.resources [--dtype bfloat16] [--K 128] [--V 128] [--H 16]

Runs one forward and one backward of one variant per gate kind (and of both delta rules) on small
CPU tensors with the kernel launches recorded instead of run, compiles each recorded launch for
sm_90 with the installed Triton, and prints registers per thread, spill stack, shared memory and
the matrix instructions in the SASS (HGMMA: Hopper's wgmma; HMMA: the older mma). This is how the
tiles in gated.TILES and the launch settings in delta.CONFIG were chosen; times still come only from
the GPU benchmark. Compile with the GPU machine's Triton (3.6): newer ones allocate registers
differently (e.g. `pip install --no-deps --target DIR triton==3.6.0`, DIR first on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from ..explicit import run_as_autograd, run_as_in_sp
from ..testing import random_inputs
from . import check, delta, delta_kernels, gated

# shared memory one block may use on sm_90 (H100, H200): a launch that asks for more fails with
# OutOfResources on the GPU, so the compile test checks every launch against it
SM90_SHARED_BYTES = 232448
# one variant per kind of launch: gate none / per token / per key, and both delta rules (lightning
# launches what simple_gla does)
VARIANTS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
# constexprs that tell launches of one kernel apart in the printout
FLAGS = ("GATE", "USE_G", "FORWARD", "REVERSE", "STORE", "BACKWARD", "DO_DVL", "BK", "BV")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


def record_launches(variant: str, dtype: torch.dtype, K: int, V: int, H: int, as_in_sp: bool = False) -> list:
    """(kernel, args, options) of every launch of one forward and one backward (as autograd runs
    them: the backward takes what the forward kept, e.g. gla's A and the delta rules' T). as_in_sp
    (delta rules): as one shard under SP instead, over several state segments (the summaries, with
    the transition, before the kernels that reuse them)."""
    launches = []
    host, module = (delta, delta_kernels) if variant in check.DELTA else (gated, gated)
    kernels = {name: fn for name, fn in vars(module).items() if isinstance(fn, triton.runtime.JITFunction)}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    T = 64 * (2 * delta.CONFIG["state_seg_chunks"] + 1) if as_in_sp else 128  # three segments
    x = random_inputs(variant, B=1, T=T, H=H, K=K, V=V, dtype=dtype, seed=0)
    call = check.make_call(variant, x, None)
    h0, do = x.initial_state.float(), torch.zeros_like(x.v)
    try:
        for name, fn in kernels.items():
            setattr(module, name, Recorder(fn))
        if as_in_sp:
            run_as_in_sp(host, call, do, h0, torch.zeros_like(h0), transition=True)
        else:  # the launches autograd makes: the backward takes what the forward kept
            run_as_autograd(host, call, do, h0, torch.zeros_like(h0))
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)
    return launches


def compile_launch(fn, args, kw):
    """Compile one recorded launch for sm_90, specialised as a launch with aligned tensors would be."""
    names = fn.arg_names
    bound = dict(zip(names, args)) | {k: v for k, v in kw.items() if k in names}
    options = {k: v for k, v in kw.items() if k not in names}
    constexprs = {n: bound[n] for n in names if fn.params[names.index(n)].is_constexpr}
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        v = bound[n]
        if n in constexprs:
            sig[n] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), constexprs, options


def describe(kernel) -> str:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    over = "  OVER THE SM_90 LIMIT" if kernel.metadata.shared > SM90_SHARED_BYTES else ""
    return (f"regs {m.group(1):>3s}  spill stack {m.group(2):>4s} B  shared {kernel.metadata.shared // 1024:4d} KB  "
            f"HGMMA {len(re.findall(r'HGMMA', sass)):3d}  HMMA {len(re.findall(r'HMMA', sass)):3d}{over}")


def compile_all(variants, dtype: torch.dtype, K: int, V: int, H: int):
    """Every distinct launch of the variants' forward and backward, and of the delta rules as one
    shard under SP, compiled for sm_90: (JIT function, kernel, constexprs, options) per launch.
    Compiling is what catches a branch that only a GPU build type-checks (the interpreter runs only
    the branches taken)."""
    seen = set()
    for variant in variants:
        for as_in_sp in (False, True) if variant in check.DELTA else (False,):
            for fn, a, kw in record_launches(variant, dtype, K, V, H, as_in_sp):
                key = (fn.__name__, repr(sorted(kw.items())),
                       tuple(x.dtype if isinstance(x, torch.Tensor) else type(x) for x in a))
                if key not in seen:
                    seen.add(key)
                    yield (fn, *compile_launch(fn, a, kw))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar_kernels.triton.resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--H", type=int, default=16)
    args = p.parse_args(argv)
    printed = set()
    for fn, kernel, constexprs, options in compile_all(VARIANTS, getattr(torch, args.dtype), args.K, args.V, args.H):
        flags = {k: v for k, v in constexprs.items() if k in FLAGS}
        label = fn.__name__ + "".join(f" {k}={int(v) if isinstance(v, bool) else v}" for k, v in flags.items())
        launch = f"warps {options.get('num_warps')} stages {options.get('num_stages')}"
        if (label, launch) not in printed:
            printed.add((label, launch))
            print(f"{label:62s} {launch}  {describe(kernel)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
