"""What every benchmark needs: a process group on the GPUs (or CPU ranks) and a fair timer."""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist


def init_distributed() -> torch.device:
    """Join the torchrun group (or make a one-process one); NCCL on GPUs, gloo on the CPU."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `seqpar bench ...`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_together(device: torch.device) -> None:
    """An idle GPU on every rank, and every rank at this point: the start of a fair measurement."""
    sync(device)
    dist.barrier()


def _slowest_median(times: list[float], device: torch.device) -> float:
    """This rank's median, maximised over the ranks (the step waits for the slowest)."""
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def median_ms(fn, device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of fn() over `repeat` runs after `warmup`; every rank starts each run
    together and the slowest rank's median is returned on all ranks (the step waits for it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start_together(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _slowest_median(times, device)


def graphed(fn, device: torch.device, warmup: int = 3):
    """fn() captured once in a CUDA graph, whose replay() runs it again without the host's
    per-launch work (into the tensors the capture allocated). The warm-up calls before the capture
    compile every kernel and build every cache outside it (fn must not read results on the host).
    Every rank captures the same collectives, so the replays are collective too."""
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread queries events while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph


def host_ms(fn, device: torch.device, repeat: int = 10) -> float:
    """Median milliseconds the host takes to issue fn() onto an idle GPU (no synchronisation at
    the end). Near the GPU time of fn, the GPU waits for the host: the call is launch-bound."""
    times = []
    for _ in range(repeat):
        start_together(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    return _slowest_median(times, device)


def kernel_breakdown(fn) -> list[dict]:
    """Device time of every kernel in one call of fn (CUDA), largest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:80], "ms": getattr(e, "device_time_total", 0.0) / 1e3, "calls": e.count}
            for e in prof.key_averages()]
    return sorted([r for r in rows if r["ms"] > 0], key=lambda r: -r["ms"])
