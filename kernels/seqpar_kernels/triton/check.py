"""Check the Triton kernels against the float64 reference.

    python -m seqpar_kernels.triton.check [--variants gla simple_gla ...] [--quick | --smoke] [--jobs N]
                                          [--json PATH]

Runs every kernel entry point (forward, backward, final_state, state_grad, the same with part of
the initial state / final-state gradient supplied late, and autograd through backend "triton") at
several shapes: odd lengths, packed documents, initial state and final-state gradient on and off,
each head dimension and each input dtype. Prints the largest relative error
||x - ref|| / ||ref|| of every case with pass/fail against the dtype's tolerance; exits 1 on any
failure. The CPU tests (TRITON_INTERPRET=1) use the same functions at tiny sizes.

The reference is the chunked PyTorch reference in float64 (`reference="torch"`, fast enough on a
GPU), or the token-by-token recurrence (`reference="naive"`); both are exact and are checked
against each other by tests/test_reference_kernels.py.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict, dataclass

import torch

from .. import variants as _variants
from ..explicit import Call, ExplicitKernel
from ..variants import InputError
from ..testing import KernelInputs, outputs_and_grads, random_cu_seqlens, random_inputs, rel_err

# relative-error bounds per input dtype: fp32 runs its matrix products in full fp32 ("ieee")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
GATED = ("linear_attn", "lightning", "simple_gla", "gla")
DELTA = ("delta_rule", "gated_delta_rule")


@dataclass(frozen=True)
class Case:
    variant: str
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "float32"
    n_docs: int = 0          # > 0: B = 1 row packing n_docs documents (cu_seqlens)
    h0: bool = True          # pass an initial state
    dht: bool = True         # pass a final-state gradient

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        docs = f" docs={self.n_docs}" if self.n_docs else ""
        return (f"{self.variant:16s} {self.dtype:8s} B={self.B} T={self.T} H={self.H} K={self.K} V={self.V}"
                f"{docs} h0={int(self.h0)} dht={int(self.dht)}")


def make_call(variant: str, x: KernelInputs, cu_seqlens) -> Call:
    """A checked, normalised Call (lightning's [H] decay expanded to [B,T,H] and materialised, so
    the kernel's dg and the reference's are gradients of the same tensor)."""
    var = _variants.get_variant(variant)
    g, scale = _variants.normalize_inputs(var, x.q, x.k, x.v, x.g, x.beta, None, x.initial_state, cu_seqlens)
    return Call(x.q, x.k, x.v, g.contiguous() if g is not None else None, x.beta, scale, cu_seqlens)


def case_inputs(case: Case, device, seed: int):
    """(call in the case's dtype, the same call in float64, do, dht, cu_seqlens) with fresh random data."""
    n_states = case.n_docs or case.B
    B = 1 if case.n_docs else case.B
    x = random_inputs(case.variant, B=B, T=case.T, H=case.H, K=case.K, V=case.V, dtype=torch.float64,
                      device=device, n_states=n_states, initial_state=case.h0, seed=seed)
    cu = random_cu_seqlens(case.T, case.n_docs, seed=seed, device=device) if case.n_docs else None
    # round once to the tested dtype so the reference sees exactly the kernel's inputs
    x = x.map(lambda t: t.to(case.torch_dtype).to(torch.float64))
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    do = torch.randn(x.v.shape, generator=gen, dtype=torch.float64).to(case.torch_dtype).double().to(device)
    dht = (torch.randn(n_states, case.H, case.K, case.V, generator=gen, dtype=torch.float64).float().double()
           .to(device) if case.dht else None)
    ref_call = make_call(case.variant, x, cu)
    low = x.map(lambda t: t.to(case.torch_dtype))
    low.initial_state = x.initial_state.float() if x.initial_state is not None else None
    low_call = make_call(case.variant, low, cu)
    return low_call, ref_call, x.initial_state, do, dht


def reference(call: Call, h0, do, dht, backend: str = "torch") -> dict:
    """Outputs and every gradient from the float64 reference (`backend` "torch" or "naive")."""
    from .. import backends

    impl = backends.implementation(backend)
    leaves = KernelInputs(call.q, call.k, call.v, call.g, call.beta, h0)
    n_states, H, K, V = call.n_states, call.q.shape[2], call.q.shape[3], call.v.shape[3]
    if h0 is None:
        leaves.initial_state = call.q.new_zeros(n_states, H, K, V)

    def fn(q, k, v, g=None, beta=None, initial_state=None):
        return impl(q, k, v, g, beta, call.scale, initial_state, True, call.cu_seqlens)

    r = outputs_and_grads(fn, leaves, do, dht)
    return {"o": r["o"], "ht": r["ht"], "dq": r["dq"], "dk": r["dk"], "dv": r["dv"], "dg": r.get("dg"),
            "dbeta": r.get("dbeta"), "dh0": r["dinitial_state"]}


def kernel_results(kernel: ExplicitKernel, call: Call, h0, do, dht) -> dict:
    """Every entry point of an explicit kernel, plus autograd through backend "triton"."""
    o, ht = kernel.forward(call, h0)
    gr = kernel.backward(call, h0, do, dht)
    res = {"o": o, "ht": ht, "dq": gr.dq, "dk": gr.dk, "dv": gr.dv, "dg": gr.dg, "dbeta": gr.dbeta,
           "dh0": gr.dh0, "final_state": kernel.final_state(call, h0), "state_grad": kernel.state_grad(call, do, dht)}
    # the sequence-parallel layer's calls: part of h0 / dht supplied late
    if h0 is not None:
        res["late_o"], res["late_ht"] = kernel.forward(call, 0.5 * h0, lambda: h0 - 0.5 * h0)
    if dht is not None:
        late = kernel.backward(call, h0, do, 0.5 * dht, lambda: dht - 0.5 * dht)
        res["late_dk"], res["late_dg"], res["late_dh0"] = late.dk, late.dg, late.dh0
    from . import chunk_triton

    x = KernelInputs(call.q, call.k, call.v, call.g, call.beta, h0)
    if h0 is None:
        x.initial_state = torch.zeros_like(res["dh0"])
    fn = functools.partial(chunk_triton, scale=call.scale, output_final_state=True, cu_seqlens=call.cu_seqlens)
    auto = outputs_and_grads(lambda q, k, v, g=None, beta=None, initial_state=None:
                             fn(q, k, v, g, beta, initial_state=initial_state), x, do, dht)
    for name, key in (("o", "autograd_o"), ("dq", "autograd_dq"), ("dk", "autograd_dk"), ("dv", "autograd_dv"),
                      ("dg", "autograd_dg"), ("dbeta", "autograd_dbeta"), ("dinitial_state", "autograd_dh0")):
        res[key] = auto.get(name)
    return res


def compare(got: dict, want: dict) -> dict[str, float]:
    """Relative error of every quantity the kernel returned (NaN never passes)."""
    pairs = {k: k for k in want} | {"final_state": "ht", "state_grad": "dh0"} | {
        f"autograd_{k}": k for k in ("o", "dq", "dk", "dv", "dg", "dbeta", "dh0")} | {
        f"late_{k}": k for k in ("o", "ht", "dk", "dg", "dh0")}
    errs = {}
    for name, ref_name in pairs.items():
        if want.get(ref_name) is None or (name.startswith("late_") and name not in got):
            continue
        if got.get(name) is None:
            errs[name] = float("inf")
            continue
        err = rel_err(got[name], want[ref_name])
        errs[name] = err if err == err else float("inf")
    return errs


def run_case(case: Case, kernel: ExplicitKernel, device="cuda", seed: int = 0, ref_backend: str = "torch"
             ) -> dict[str, float]:
    """Relative errors of every entry point of `kernel` on fresh random inputs of `case`."""
    call, ref_call, h0_64, do, dht = case_inputs(case, device, seed)
    want = reference(ref_call, h0_64, do, dht, ref_backend)
    h0 = h0_64.float() if h0_64 is not None else None
    got = kernel_results(kernel, call, h0, do.to(case.torch_dtype), dht.float() if dht is not None else None)
    return compare(got, want)


def gpu_cases(variants, quick: bool = False, smoke: bool = False) -> list[Case]:
    """Odd lengths, packed documents, with and without h0/dht, each head dimension and dtype
    (smoke: only the benchmark's configuration, bf16 K = V = 128 H = 16, three packed documents of random
    lengths, compiled as the benchmark compiles them)."""
    if smoke:
        return [Case(v, 1, 4096, 16, 128, 128, "bfloat16", n_docs=3) for v in variants]
    out = []
    for v in variants:
        out += [
            Case(v, 2, 1000, 3, 64, 64, "bfloat16"),
            Case(v, 1, 4099, 4, 128, 128, "bfloat16", n_docs=5),
            Case(v, 1, 777, 2, 256, 256, "bfloat16", h0=False, dht=False),
            Case(v, 2, 515, 2, 128, 64, "float16"),
            Case(v, 1, 700, 2, 128, 128, "float16", n_docs=2),  # V loops of several tiles, fp32 states
            Case(v, 1, 1283, 2, 128, 128, "float32", n_docs=3),
        ]
        if not quick:
            out += [Case(v, 1, 16411, 2, 128, 128, "bfloat16"), Case(v, 3, 200, 2, 64, 128, "float32", h0=False)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar_kernels.triton.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(GATED + DELTA), choices=list(GATED + DELTA))
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    p.add_argument("--smoke", action="store_true", help="one case per variant in the benchmark's configuration")
    p.add_argument("--reference", default="torch", choices=["torch", "naive"])
    p.add_argument("--json", help="write every case's errors here")
    p.add_argument("--jobs", type=int, default=1,
                   help="check this many variants at once in separate processes (compiling dominates)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs one (the CPU tests run the kernels under TRITON_INTERPRET=1)")
        return 2
    if args.jobs > 1 and len(args.variants) > 1:
        return _run_parallel(args)
    from . import TritonKernel

    kernel, rows, failed = TritonKernel(), [], 0
    for i, case in enumerate(gpu_cases(args.variants, args.quick, args.smoke)):
        tol = TOLERANCE[case.torch_dtype]
        try:
            errs = run_case(case, kernel, "cuda", seed=i, ref_backend=args.reference)
            worst = max(errs, key=errs.get)
            ok = errs[worst] < tol
            line = f"{'PASS' if ok else 'FAIL'} {case.label()}  max rel err {errs[worst]:.2e} ({worst}) tol {tol:.0e}"
        except InputError as e:  # a configuration the kernels refuse up front, with a clear message
            errs, ok, line = {}, True, f"RESTRICTED {case.label()}  {e}"
        except Exception as e:  # noqa: BLE001 - a crash (e.g. Triton's OutOfResources) fails this case only
            errs, ok, line = {}, False, f"FAIL {case.label()}  {type(e).__name__}: {e}"
        failed += not ok
        rows.append({"case": asdict(case), "errors": errs, "tolerance": tol, "pass": ok,
                     "restricted": line.startswith("RESTRICTED")})
        print(line, flush=True)
        if not ok and errs:
            print("     " + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    print(f"{len(rows) - failed}/{len(rows)} cases passed on {torch.cuda.get_device_name()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "cases": rows}, f, indent=1)
    return 1 if failed else 0


def _run_parallel(args) -> int:
    """One process per variant, args.jobs at a time; their reports printed in order, JSON merged."""
    import os
    import subprocess
    import tempfile

    tmp = tempfile.mkdtemp()
    procs, pending, failed, merged, lost = {}, list(args.variants), 0, None, []
    while pending or procs:
        while pending and len(procs) < args.jobs:
            v = pending.pop(0)
            cmd = [sys.executable, "-m", "seqpar_kernels.triton.check", "--variants", v, "--reference", args.reference,
                   "--json", os.path.join(tmp, f"{v}.json")] + (["--quick"] if args.quick else []) + (
                   ["--smoke"] if args.smoke else [])
            procs[v] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        v = next(iter(procs))
        out, _ = procs.pop(v).communicate()
        print(out, end="", flush=True)
        path = os.path.join(tmp, f"{v}.json")
        if os.path.exists(path):
            with open(path) as f:
                part = json.load(f)
            merged = part if merged is None else {**merged, "cases": merged["cases"] + part["cases"]}
            failed += sum(not c["pass"] for c in part["cases"])
        else:
            failed += 1
            lost.append(v)
            print(f"FAIL {v}: the check process wrote no results")
    if merged is not None:
        n = len(merged["cases"])
        print(f"all variants: {n - sum(not c['pass'] for c in merged['cases'])}/{n} cases passed"
              + (f"; no results from {', '.join(lost)} (FAIL)" if lost else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(merged, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
