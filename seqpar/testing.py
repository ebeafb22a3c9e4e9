"""Run a function on P real torch.distributed ranks (gloo, one process each) and collect results.

Used by the test suite and handy for trying SP code on a laptop:

    results = run_ranks(my_fn, world_size=4, args=(...))   # my_fn(rank, world_size, *args)

`my_fn` must be importable by name (a module-level function). An exception on any rank is
re-raised here with every failing rank's traceback; a run that exceeds `timeout` is killed.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
    except queue.Empty:
        errors.append(f"timed out after {timeout} s waiting for the ranks")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return out


def _cli_on_rank(rank, world_size, argv):
    from seqpar.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def run_cli(argv: list[str], world_size: int, timeout: float = 600.0) -> list:
    """`seqpar <argv>` on `world_size` gloo ranks, as torchrun would start it; each rank's exit status."""
    return run_ranks(_cli_on_rank, world_size, args=(list(argv),), timeout=timeout)
