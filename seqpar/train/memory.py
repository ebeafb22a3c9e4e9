"""What fills GPU memory at the peak of the first steps (`log.memory_report: on`).

Long-sequence runs fail by running out of memory, and the allocator's totals do not say which
tensors did it. With the report on, the CUDA caching allocator records every allocation (with
its Python stack) from before the model is built; after the first two steps (the second is the
first with the optimizer state), or when a step runs out of memory, each rank replays that record
to the moment the most memory was in use and writes the tensors alive then, grouped by the line
of seqpar code that allocated them, to `<log.dir>/memory_rank<r>.json` (rank 0 also prints the
largest groups). Recording costs time: use it for a diagnosis run, not for timing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_ENTRIES = 2_000_000
_OURS = ("/seqpar/", "/seqpar_kernels/")


def start(device: torch.device) -> bool:
    """Begin recording allocations (CUDA only); False if there is nothing to record."""
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")
    return True


def stop() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def _where(frames: list[dict]) -> str:
    """The innermost frame in seqpar's own code (else the innermost Python frame), as
    `seqpar/...py:line function` or `seqpar_kernels/...`."""
    for f in frames:
        for part in _OURS:
            if part in f["filename"]:
                return f"{part[1:]}{f['filename'].rsplit(part, 1)[1]}:{f['line']} {f['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "(no stack)"


def peak_breakdown(trace: list[dict], top: int = 25) -> dict:
    """Replay one device's allocation trace (alloc / free_completed events with addr, size and
    frames) to its highest point; the blocks alive then, grouped by where they were allocated."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
        if total > peak:
            peak, peak_at = total, i
    alive: dict[int, dict] = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            alive[e["addr"]] = e
        elif e["action"] == "free_completed":
            alive.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in alive.values():
        g = groups.setdefault(_where(e.get("frames", [])), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    rows = sorted(({"where": w, "gib": b / 2**30, "tensors": n} for w, (b, n) in groups.items()),
                  key=lambda r: -r["gib"])
    return {"peak_gib": peak / 2**30, "events": len(trace), "truncated": len(trace) >= MAX_ENTRIES,
            "groups": rows[:top], "other_gib": sum(r["gib"] for r in rows[top:])}


def report(device: torch.device, out_dir: Path, rank: int, when: str) -> dict:
    """Write this rank's breakdown (and print rank 0's); recording stops."""
    snapshot = torch.cuda.memory._snapshot()
    stop()
    index = device.index if device.index is not None else torch.cuda.current_device()
    result = {"rank": rank, "when": when, "device": torch.cuda.get_device_name(device),
              "max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              **peak_breakdown(snapshot["device_traces"][index])}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory_rank{rank}.json"
    path.write_text(json.dumps(result, indent=1))
    if rank == 0:
        print(f"seqpar: memory at the peak of {when} ({result['peak_gib']:.1f} GiB of tensors; "
              f"allocator max {result['max_allocated_gib']:.1f} GiB), by where it was allocated:", flush=True)
        for r in result["groups"][:12]:
            print(f"  {r['gib']:8.2f} GiB  {r['tensors']:5d} tensors  {r['where']}", flush=True)
        print(f"  (all groups: {path})", flush=True)
    return result
