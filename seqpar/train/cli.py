"""`seqpar train [--config FILE]... [section.key=value]...`

Under torchrun, srun or mpirun every rank runs this same command. Started by hand, it starts the ranks
the config needs itself: one process for a single rank, otherwise torchrun on this machine (so the
built-in default, SP=2, runs two local ranks over gloo on a CPU, or NCCL on two GPUs).
"""
from __future__ import annotations

import os
import sys

from seqpar import config as cfg


def configure(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.steps=100 parallel.sp=4")
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML config (repeatable; later files win); none: the built-in tiny default")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    try:
        config = cfg.load(args.config, args.overrides)
        if args.print_config:
            print(cfg.dump(config), end="")
            return 0
        from .distributed import launched_by

        if launched_by() == "none" and cfg.world_size_of(config) > 1:
            return _self_launch(config, args)
        from .trainer import run

        run(config)  # raises ConfigError only before any process group exists
    except cfg.ConfigError as e:
        print(f"seqpar train: config error: {e}", file=sys.stderr)
        return 2
    return 0


def _self_launch(config: cfg.Config, args) -> int:
    """Replace this process by torchrun starting the ranks this config needs on this machine."""
    n = cfg.world_size_of(config)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "seqpar.cli", "train", *[a for f in args.config for a in ("--config", f)], *args.overrides]
    print(f"seqpar: starting {n} local ranks with torchrun (parallel: tp={config.parallel.tp} pp={config.parallel.pp} "
          f"sp={config.parallel.sp} dp={max(config.parallel.dp, 1)})", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    os.execv(sys.executable, argv)
    return 1  # not reached
