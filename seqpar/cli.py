"""The `seqpar` command."""
from __future__ import annotations

import argparse
import json
import sys


def _env(args) -> int:
    from seqpar.env import format_report, report

    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    env = sub.add_parser("env", help="versions, collectives, GPUs and usable kernel backends")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=_env)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
