"""What a run reports: throughput, FLOP rate and MFU, memory, the share of time in SP communication;
written to a JSONL file (and TensorBoard when it is installed), with a progress bar on rank 0.

MFU = (model FLOPs per token x tokens per second per GPU) / peak bf16 FLOP/s of the GPU, where model
FLOPs count the forward and backward matmuls and attention of the model as defined (recomputation by
activation checkpointing is not counted); see docs/training.md.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# dense bf16 tensor-core peak, TFLOP/s, by a substring of the device name
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("A10G", 70.0),
                    ("RTX 4090", 165.2), ("V100", 125.0))


def peak_tflops(device: torch.device, configured: float = 0.0) -> float | None:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def _is_comm(event) -> bool:
    name = event.name
    return name.startswith(("gloo:", "nccl:")) if event.device_type.name == "CPU" else name.startswith("nccl")


def _union_us(intervals) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_comm(fn, device: torch.device):
    """Run fn() under torch.profiler; returns (fn's result, seconds of wall time, seconds during which at
    least one collective was in flight: gloo / NCCL host calls, and NCCL kernels on the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    with _quiet_stderr():  # the profiler's C++ side announces every start and stop there
        prof.start()
    t0 = time.perf_counter()
    try:
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    finally:
        with _quiet_stderr():
            prof.stop()
    comm = _union_us((e.time_range.start, e.time_range.end) for e in prof.events() if _is_comm(e)) / 1e6
    return result, wall, min(comm, wall)


@contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ProgressBar:
    """One line redrawn in place on a terminal; elsewhere a line every `every` steps."""

    def __init__(self, total: int, enabled: bool, every: int, stream=sys.stderr):
        self.total, self.enabled, self.every, self.stream = total, enabled, every, stream
        self.t0, self.tty = time.perf_counter(), stream.isatty()

    def update(self, step: int, text: str) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = step / max(self.total, 1)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (1 - done) if done > 0 else 0
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"[{bar}] {step}/{self.total} {text} eta {int(eta) // 60}m{int(eta) % 60:02d}s"
        if self.tty:
            self.stream.write("\r" + line[:200] + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


class RunLog:
    """Rank 0's record of the run: metrics.jsonl, TensorBoard events, the progress bar."""

    def __init__(self, folder: Path, enabled: bool, total_steps: int, progress: str, tensorboard: str, every: int):
        self.enabled, self.folder = enabled, folder
        self.jsonl = self.tb = None
        self.bar = ProgressBar(total_steps, enabled and progress != "off", every)
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(folder / "metrics.jsonl", "a")
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                if tensorboard == "on":
                    raise RuntimeError("log.tensorboard: on, but tensorboard is not installed "
                                       "(pip install tensorboard)") from None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def progress(self, step: int, text: str) -> None:
        self.bar.update(step, text)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def summarize(history: list[dict]) -> dict:
    """Steady-state figures of a run: medians over the steps after warm-up (the first quarter of the
    steps, at least one, is left out: compilation and allocator growth), peak memory's maximum, and
    the last step's loss and accuracy."""
    if not history:
        return {}
    steady = history[max(1, len(history) // 4):] or history
    out = {"steps": len(history), "steady_steps": len(steady), "loss": history[-1]["loss"],
           "accuracy": history[-1]["accuracy"],
           "peak_memory_gib": max(h["peak_memory_gib"] for h in history)}
    for key in ("step_s", "tokens_per_s", "tflops_per_gpu", "mfu", "sp_comm_share"):
        values = [h[key] for h in steady if key in h]
        if values:
            out[key] = statistics.median(values)
    return out


def write_summary(path: str, history: list[dict], meta: dict) -> None:
    """The run's summary as JSON, written atomically (a reader never sees half a file)."""
    summary = summarize(history)
    world = meta.get("world_size", 1)
    if "tokens_per_s" in summary:
        summary["tokens_per_s_per_gpu"] = summary["tokens_per_s"] / world
    summary["run"] = {k: meta[k] for k in ("engine", "world_size", "dp", "sp") if k in meta}
    train = meta.get("config", {}).get("train", {})
    summary["run"]["seq_len"] = train.get("seq_len")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, target)
