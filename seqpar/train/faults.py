"""Faults: a rank that dies or hangs ends the whole job, by name; a NaN is traced to its layer.

Heartbeats. Every rank runs a small thread that, every timeout/10 seconds, writes to the job's TCP
store its step, its phase, when the training loop last moved and how many collectives it has issued,
and reads everybody else's. A rank whose heartbeat is older than the timeout died or froze; if
every rank's loop has stood still for the timeout, the one that is behind (lowest step, fewest
collectives) hangs and the others wait for it. Either way every rank that can prints the same
message naming the rank and the step, posts it to the store (so the others stop at once) and exits
with EXIT_FAULT, leaving the last complete checkpoint in place (seqpar.train.checkpoint).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from seqpar.comm import collectives

EXIT_FAULT = 3
PHASES = ("start", "data", "forward", "backward", "optimizer", "checkpoint", "done")


class FaultError(RuntimeError):
    """The run cannot go on (a non-finite loss, a lost rank); the message says where."""


class Watchdog:
    def __init__(self, addr: str, port: int, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout = rank, world, timeout_s
        self.interval = min(max(timeout_s / 10, 0.1), 5.0)
        self.step, self.phase, self.moved = 0, "start", time.time()
        self._addr, self._port = addr, port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seqpar-watchdog", daemon=True)

    def start(self) -> None:
        self._store = dist.PrefixStore("seqpar/heartbeat", dist.TCPStore(
            self._addr, self._port, is_master=False, timeout=timedelta(seconds=max(self.timeout, 10))))
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        """The loop has ended on this rank: say so (a finished rank is not a silent one) and stop."""
        self.mark(self.step, "done")
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)
        try:
            self._beat()
        except Exception:  # noqa: BLE001 - the store may already be closed by a rank that finished first
            pass

    def mark(self, step: int, phase: str) -> None:
        """Called by the training loop whenever it moves on (cheap: no I/O)."""
        self.step, self.phase, self.moved = step, phase, time.time()

    def _beat(self) -> None:
        calls = sum(collectives.STATS.calls.values())
        self._store.set(str(self.rank), json.dumps(
            {"step": self.step, "phase": self.phase, "alive": time.time(), "moved": self.moved, "calls": calls}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                message = self._check()
            except Exception as e:  # noqa: BLE001 - the store is gone: its host (rank 0 or the launcher) died
                message = (f"lost the job's store at {self._addr}:{self._port} ({type(e).__name__}: {e}); rank 0 or "
                           f"the launcher that hosts it died (this rank was at step {self.step}, {self.phase})")
            if message and not self._stop.is_set():
                self.abort(message)

    def _check(self) -> str | None:
        if self._store.check(["abort"]):
            return self._store.get("abort").decode()
        now = time.time()
        beats = {r: json.loads(self._store.get(str(r))) for r in range(self.world)}
        silent = [r for r, b in beats.items() if b["phase"] != "done" and now - b["alive"] > self.timeout]
        if silent:
            r = silent[0]
            return (f"rank {r} stopped responding at step {beats[r]['step']} ({beats[r]['phase']}): no heartbeat for "
                    f"{now - beats[r]['alive']:.0f} s (train.fault_timeout_s = {self.timeout:g}); it died or froze")
        fresh = all(now - b["alive"] <= 3 * self.interval for b in beats.values())  # else: wait, a rank may be dead
        if fresh and all(b["phase"] != "done" and now - b["moved"] > self.timeout for b in beats.values()):
            order = {p: i for i, p in enumerate(PHASES)}
            key = {r: (b["step"], order.get(b["phase"], 0), b["calls"]) for r, b in beats.items()}
            behind = min(key, key=key.get)
            if list(key.values()).count(key[behind]) == len(key):
                return (f"every rank has stood still for {self.timeout:g} s at step {beats[0]['step']} "
                        f"({beats[0]['phase']}): a collective that never completes")
            b = beats[behind]
            return (f"rank {behind} hangs at step {b['step']} ({b['phase']}): no progress for {now - b['moved']:.0f} s "
                    f"(train.fault_timeout_s = {self.timeout:g}) while the other ranks wait for it")
        return None

    def abort(self, message: str) -> None:
        abort(message, self._store)

    def explain(self, error: BaseException) -> str:
        """A collective failed on this rank: wait (up to the timeout) for the heartbeats to say which rank
        is to blame, so the message names it rather than a socket."""
        deadline = time.time() + self.timeout + 2 * self.interval
        while time.time() < deadline:
            try:
                message = self._check()
            except Exception:  # noqa: BLE001
                message = None
            if message:
                return message
            time.sleep(self.interval)
        return f"rank {self.rank} failed at step {self.step} ({self.phase}): {type(error).__name__}: {error}"


def is_comm_error(e: BaseException) -> bool:
    """A failed collective (a peer vanished, a timeout), as opposed to an error of this rank's own."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in (
        "gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out", "Timed out"))


def abort(message: str, store=None) -> None:
    """Print the message, post it for the other ranks, and leave at once (a rank blocked in a
    collective cannot be woken up any other way)."""
    print(f"seqpar: {message}", file=sys.stderr, flush=True)
    if store is not None:
        try:
            store.compare_set("abort", "", message)
        except Exception:  # noqa: BLE001 - best effort: the store may be the thing that died
            pass
    os._exit(EXIT_FAULT)


# ---------------------------------------------------------------- non-finite values


def first_nonfinite_module(model: torch.nn.Module, forward) -> str | None:
    """Rerun forward() with a check after every submodule; the first (innermost, earliest) module whose
    output holds a NaN or Inf, or None."""
    found: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            if not found and any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all()
                                 for o in outs):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None
