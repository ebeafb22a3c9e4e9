"""`seqpar bench <name>`: each benchmark module provides `configure(parser)` like a subcommand."""
from __future__ import annotations

import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "comm": ("seqpar.bench.comm", "latency and bandwidth of all-gather, all-to-all, point-to-point (torchrun)"),
    "sp": ("seqpar.bench.sp", "SP efficiency of linear attention per variant x method x layout (torchrun)"),
    "model": ("seqpar.bench.model", "alpha-beta cost model: predicted SP efficiency of LASP-2, ZeCO, ring, a2a vs P"),
    "sweep": ("seqpar.bench.sweep", "run a grid of benchmark points from a YAML file (resumable), collect JSON, plot"),
    "sp-host": ("seqpar.bench.sp_host", "host work of one SP call on the CPU: ops, launches, host time vs the plain kernel"),
    "softmax": ("seqpar.bench.softmax", "SP softmax attention: parity with SDPA, balance per layout x method (torchrun)"),
    "kernels": ("seqpar.bench.kernels", "single-GPU kernel times, ours and fla's, against the device's ceilings"),
}


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module, help_) in BENCHMARKS.items():
        importlib.import_module(module).configure(sub.add_parser(name, help=help_, description=help_))
