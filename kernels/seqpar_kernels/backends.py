"""Which implementation runs a kernel call.

A backend is a function with the checked, normalised arguments
    impl(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens) -> (o, final_state)
(g is None, [B,T,H] or [B,T,H,K]; see variants.normalize_inputs). Autograd gives the gradients.
"""
from __future__ import annotations

import importlib.util

import torch

from .chunk_torch import chunk_reference
from .naive import naive_recurrence

BACKENDS = ("torch", "naive", "triton", "fla")


def _triton_unusable(device: torch.device | None = None) -> str | None:
    """None if the Triton kernels can run here (a CUDA device, or the CPU interpreter), else why not."""
    import os

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, Linux only)"
    if device is not None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CUDA tensors; on the CPU only under TRITON_INTERPRET=1 (tests only)"
    if device is None and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (and TRITON_INTERPRET is not set)"
    return None


def _fla_unusable(device: torch.device | None = None) -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "fla-core is not installed (pip install 'seqpar[bench]')"
    if (device is not None and device.type != "cuda") or (device is None and not torch.cuda.is_available()):
        return "fla's kernels need a CUDA device"
    return None


def unusable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """None if `backend` can run on `device` (None: on this machine at all), else the reason."""
    if backend in ("torch", "naive"):
        return None
    if backend == "triton":
        return _triton_unusable(device)
    if backend == "fla":
        return _fla_unusable(device)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {('auto',) + BACKENDS}")


def resolve(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on `device` (Triton on CUDA when it is
    installed, else torch); check that it can run there."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_unusable(device) is None else "torch"
    why = unusable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"kernel backend {backend!r} cannot run on {device}: {why}")
    return backend


def implementation(backend: str):
    if backend == "torch":
        return chunk_reference
    if backend == "naive":
        return naive_recurrence
    if backend == "triton":
        from .triton import chunk_triton

        return chunk_triton
    if backend == "fla":
        from .fla_backend import chunk_fla

        return chunk_fla
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {('auto',) + BACKENDS}")
