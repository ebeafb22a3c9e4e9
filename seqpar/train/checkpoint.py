"""Checkpoints that are either complete or absent.

Every rank writes into `<dir>/.tmp-step-N`; after a barrier, rank 0 adds meta.json and renames the
folder to `<dir>/step-N` (a rename is atomic on one file system), then points `latest` at it. A job
killed while saving leaves only a .tmp folder, which is ignored and cleared by the next save, so the
last complete checkpoint always loads. The directory must be on a file system all ranks share.

The native engine saves with torch.distributed.checkpoint (model and optimizer state by name; replicated
tensors are written once and can be read back by any number of ranks, so a run resumes on a different
data-parallel size). The data position is the step number (see seqpar.train.data).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

META = "meta.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / META).is_file())


def find(resume: str, root: str | Path) -> Path | None:
    """checkpoint.resume -> the checkpoint to load (None: start fresh)."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / META).is_file():
        raise FileNotFoundError(f"checkpoint.resume = {resume!r} is not a complete checkpoint (no {META}); "
                                f"complete ones under {root}: {[p.name for p in complete(root)] or 'none'}")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def save(root: str | Path, step: int, write, meta: dict, keep: int) -> Path:
    """write(folder) stores every rank's state into folder (collective); returns the final folder."""
    root = Path(root)
    tmp, final = root / f".tmp-step-{step:08d}", step_dir(root, step)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    write(tmp)
    dist.barrier()  # every rank's files are in tmp
    if rank == 0:
        _write_atomic(tmp / META, json.dumps({"step": step, **meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name + "\n")
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the native engine's state


def save_native(root, step: int, model, optimizer, meta: dict, keep: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return save(root, step, lambda folder: dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder),
                meta, keep)


def load_native(path: Path, model, optimizer) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_meta(path)
