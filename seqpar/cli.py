"""The `seqpar` command. Each subcommand lives in its own module, which provides
`configure(parser)`: add its arguments and `parser.set_defaults(func=...)`; func(args) -> exit code."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "env": ("seqpar.env", "versions, collectives, GPUs and usable kernel backends"),
    "bench": ("seqpar.bench.cli", "benchmarks (print a table, write JSON)"),
    "config": ("seqpar.megatron.config_import", "config tools: import a Megatron-LM configuration as a seqpar YAML"),
    "launch": ("seqpar.launch", "print torchrun / SLURM / mpirun command lines for nodes x GPUs per node"),
    "train": ("seqpar.train.cli", "train a model: YAML config + key=value overrides, under any launcher"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar", description="Sequence-parallel training of linear-attention "
                                "and hybrid language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        importlib.import_module(module).configure(sub.add_parser(name, help=help_, description=help_))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
