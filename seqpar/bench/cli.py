"""`seqpar bench <name>`: each benchmark module provides `configure(parser)` like a subcommand."""
from __future__ import annotations

import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("seqpar.bench.kernels", "single-GPU kernel times, ours and fla's, against the device's ceilings"),
}


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module, help_) in BENCHMARKS.items():
        importlib.import_module(module).configure(sub.add_parser(name, help=help_, description=help_))
