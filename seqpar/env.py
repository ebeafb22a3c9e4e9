"""`seqpar env`: what this machine has, for bug reports and for choosing backends."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

OPTIONAL_PACKAGES = ("torch", "triton", "megatron-core", "deepspeed", "mpi4py", "mpich", "fla-core",
                     "numpy", "pyyaml", "matplotlib", "tensorboard")


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict:
    import torch.distributed as dist

    from seqpar_kernels import backends

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    nccl = None
    if torch.cuda.is_available() and dist.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in OPTIONAL_PACKAGES},
        "torch_cuda_build": torch.version.cuda,
        "distributed": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": nccl if nccl else False,
            "torch_mpi_backend": dist.is_available() and dist.is_mpi_available(),
        },
        "gpus": gpus,
        "kernel_backends": {name: (backends.unusable_reason(name) or "usable") for name in backends.BACKENDS},
    }


def format_report(r: dict) -> str:
    lines = [f"python          {r['python']}  ({r['platform']})"]
    for name, ver in r["packages"].items():
        lines.append(f"{name:<15} {ver or '-- not installed'}")
    lines.append(f"torch CUDA      {r['torch_cuda_build'] or '-- CPU build'}")
    d = r["distributed"]
    lines.append(f"collectives     gloo={'yes' if d['gloo'] else 'no'}  nccl={d['nccl'] or 'no'}  "
                 f"torch-mpi={'yes' if d['torch_mpi_backend'] else 'no'}")
    if r["gpus"]:
        for gpu in r["gpus"]:
            lines.append(f"gpu {gpu['index']:<11} {gpu['name']}, {gpu['memory_gib']} GiB, sm_{gpu['capability']}, "
                         f"{gpu['multiprocessors']} SMs")
    else:
        lines.append("gpus            none seen")
    for name, state in r["kernel_backends"].items():
        lines.append(f"backend {name:<7} {state}")
    return "\n".join(lines)


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    import json

    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0
