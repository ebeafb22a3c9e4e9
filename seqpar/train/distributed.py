"""Who am I in the job, and the process groups of the run.

One command line, `seqpar train ...`, runs under every launcher; `discover()` reads where the ranks
come from:

* torchrun (or anything that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT),
* SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of the step's
  node list, the port is derived from the job id so every task computes the same one),
* mpirun / mpiexec (MPICH, Open MPI, PMIx): mpi4py gives the rank and size, rank 0's host name and a
  free port are broadcast to the others.

`init_distributed()` then opens one TCP store (the heartbeat board of `seqpar.train.faults` lives in it
too) and the default process group. The sub-groups come from seqpar.parallel.ParallelContext (native
and DeepSpeed engines) or from megatron-core (Megatron engine).
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as the launcher described it."""
    launcher: str  # "torchrun" | "slurm" | "mpi" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    agent_store: bool = False  # torchrun's agent already serves the store at master_addr:master_port


def launched_by(environ=os.environ) -> str:
    """Which launcher started this process ("none" if it was started by hand)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:  # a task of srun, not the batch script
        return "slurm"
    if any(v in environ for v in MPI_RANK_VARS):
        return "mpi"
    return "none"


def discover(environ=os.environ) -> Launch:
    kind = launched_by(environ)
    if kind == "torchrun":
        return Launch("torchrun", int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                      int(environ.get("LOCAL_RANK", 0)), int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
                      environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)),
                      agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    if kind == "slurm":
        return _slurm(environ)
    if kind == "mpi":
        return _mpi(environ)
    return Launch("none", 0, 1, 0, 1, "127.0.0.1", free_port())


def _slurm(environ) -> Launch:
    node_id = int(environ.get("SLURM_NODEID", 0))
    per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
                                     or environ["SLURM_NTASKS"])
    nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                            or environ.get("SLURM_NODELIST") or "127.0.0.1")
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else 15000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000
    return Launch("slurm", int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                  int(environ.get("SLURM_LOCALID", 0)), per_node[min(node_id, len(per_node) - 1)],
                  environ.get("MASTER_ADDR", nodes[0]), port)


def _mpi(environ) -> Launch:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("this process was started by mpirun but mpi4py is not installed; install it with "
                           "`pip install mpi4py mpich` (or build mpi4py against your cluster's MPI)") from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr, port = None, None
    if rank == 0:
        addr = environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(environ.get("MASTER_PORT") or free_port())
    addr, port = comm.bcast((addr, port), root=0)
    return Launch("mpi", rank, size, local.Get_rank(), local.Get_size(), addr, port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compact host list, e.g. "gpu[01-03,7],login1" -> [gpu01, gpu02, gpu03, gpu7, login1]."""
    hosts = []
    for name, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?,?", spec):
        if not ranges:
            hosts.append(name)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{name}{i:0{len(lo)}d}")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for count, _, repeat in re.findall(r"(\d+)(\(x(\d+)\))?", spec):
        out += [int(count)] * int(repeat or 1)
    return out


def init_distributed(launch: Launch, backend: str, timeout_s: float) -> dist.Store:
    """Open the job's TCP store and the default process group. Returns the store: on rank 0 (without
    torchrun's agent) it is the server, to be kept alive until every rank is done.

    The collectives' own timeout is a backstop, set well beyond timeout_s: the heartbeats of
    seqpar.train.faults name the lost rank first (NCCL's watchdog would end the process without)."""
    timeout = timedelta(seconds=max(2 * timeout_s, timeout_s + 60))
    is_host = launch.rank == 0 and not launch.agent_store
    store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=is_host,
                          timeout=timedelta(seconds=max(timeout_s, 300)), wait_for_workers=False)
    dist.init_process_group(backend, store=dist.PrefixStore("seqpar/pg", store), rank=launch.rank,
                            world_size=launch.world_size, timeout=timeout)
    return store


def pick_device(launch: Launch, want: str) -> torch.device:
    """want: "auto" | "cpu" | "cuda". auto uses this node's GPU number local_rank when the node has
    one GPU per local rank, else the CPU."""
    if want == "cpu" or (want == "auto" and (not torch.cuda.is_available()
                                             or torch.cuda.device_count() < launch.local_world_size)):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible")
    if torch.cuda.device_count() < launch.local_world_size:
        raise RuntimeError(f"{launch.local_world_size} ranks on this node but only {torch.cuda.device_count()} "
                           f"GPUs; start one rank per GPU")
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)
