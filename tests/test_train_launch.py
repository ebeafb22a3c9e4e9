"""`seqpar train` under real launchers, as separate processes: torchrun (the built-in default must learn
its task), SLURM-style and torchrun-style environments, mpirun from the PyPI MPICH, two "nodes" in
two network namespaces, and a rank that dies or freezes mid-step."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.train.distributed import discover, expand_hostlist, expand_tasks_per_node, free_port

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.pattern=LS", "train.seq_len=32",
        "train.micro_batch_size=2", "train.steps=4", "data.num_pairs=2", "log.interval=1", "log.profile_interval=2",
        "log.tensorboard=off"]
SEQPAR = [sys.executable, "-m", "seqpar.cli", "train"]
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_all(procs, timeout):
    deadline = time.time() + timeout
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outs


# ---------------------------------------------------------------- discovery


def test_slurm_discovery_from_environment():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08,10],login3", "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}
    d = discover(env)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("slurm", 5, 8, 1, 2)
    assert (d.master_addr, d.master_port) == ("gpu07", 15000 + 4242 % 20000)
    assert discover({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).master_addr == "10.0.0.1"
    batch_script = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}  # sbatch's shell is not a rank
    assert discover(batch_script).launcher == "none"
    assert expand_hostlist("gpu[07-08,10],login3") == ["gpu07", "gpu08", "gpu10", "login3"]
    assert expand_hostlist("a[1-2],b[009-010]") == ["a1", "a2", "b009", "b010"]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    tr = discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9",
                   "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (tr.launcher, tr.rank, tr.agent_store) == ("torchrun", 1, True)


def test_two_ranks_from_a_slurm_environment(tmp_path):
    """Each task sees only what srun would set; seqpar derives the master and port from it."""
    job = 10000 + os.getpid() % 9000
    procs = [subprocess.Popen(SEQPAR + TINY + [f"log.dir={tmp_path}"], env=_env(
        SLURM_PROCID=r, SLURM_NTASKS=2, SLURM_LOCALID=r, SLURM_NODEID=0, SLURM_STEP_ID=0, SLURM_JOB_ID=job,
        SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="2"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = _wait_all(procs, 300)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "2 ranks (slurm, gloo, cpu)" in outs[0][0]
    rows = _metrics(tmp_path)
    assert rows[-1]["step"] == 4 and "sp_comm_share" in rows[1]


def test_mpirun_from_pypi_mpich(tmp_path):
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun (pip install mpich mpi4py)")
    pytest.importorskip("mpi4py")
    out = subprocess.run([mpirun, "-n", "2", *SEQPAR, *TINY, f"log.dir={tmp_path}"], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 ranks (mpi, gloo, cpu)" in out.stdout
    assert _metrics(tmp_path)[-1]["step"] == 4


# ---------------------------------------------------------------- the built-in default


def test_builtin_default_learns_its_task_under_torchrun(tmp_path):
    """The README's `seqpar train`, with the built-in config (only the output folder moved): no launcher, so
    it starts torchrun with 2 CPU ranks itself. The answers sit on the other rank, so accuracy only rises
    if state crosses the SP boundary."""
    out = subprocess.run(SEQPAR + [f"log.dir={tmp_path}"], env=_env(), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _metrics(tmp_path)
    assert rows[-1]["step"] == 250
    first, last = rows[0], rows[-3:]
    assert first["accuracy"] < 0.1 and min(r["accuracy"] for r in last) > 0.5, [r["accuracy"] for r in rows]
    assert max(r["loss"] for r in last) < first["loss"] / 2
    assert any("sp_comm_share" in r for r in rows)
    assert "seqpar: starting 2 local ranks with torchrun" in out.stdout and "2 ranks (torchrun, gloo, cpu)" in out.stdout
    assert f"checkpoint: {tmp_path}/checkpoints/step-00000250" in out.stdout


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_lost_rank_ends_the_job_by_name(tmp_path, fault):
    """Rank 1 dies (SIGKILL) or freezes (SIGSTOP) mid-run; rank 0 must exit non-zero within the timeout,
    naming rank 1 and its step; the last complete checkpoint still loads."""
    timeout = 10
    port = free_port()
    args = TINY + [f"log.dir={tmp_path}", "train.steps=1000", "checkpoint.interval=2", "log.profile_interval=0",
                   f"train.fault_timeout_s={timeout}"]
    procs = [subprocess.Popen(SEQPAR + args, env=_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1",
                                                      MASTER_PORT=port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 180
        while not list((tmp_path / "checkpoints").glob("step-00000004")):
            assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=timeout + 30)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0
    assert elapsed < timeout + 15, elapsed
    assert "seqpar: rank 1 stopped responding at step" in err, err[-3000:]
    _load_last_checkpoint(tmp_path / "checkpoints")


def _load_last_checkpoint(folder: Path):
    import torch.distributed.checkpoint as dcp

    from seqpar.train import checkpoint
    from seqpar.train.trainer import LMWithLoss

    last = checkpoint.find("auto", folder)
    meta = checkpoint.read_meta(last)
    assert meta["step"] >= 4
    from seqpar import config as cfg
    from seqpar.models import HybridLM

    config = cfg.load([], TINY)
    model = LMWithLoss(HybridLM(config.model), 4096)
    state = {"model": {k: v.clone().zero_() for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=last)
    assert all(v.abs().sum() > 0 for k, v in state["model"].items() if "norm" not in k)


# ---------------------------------------------------------------- two nodes


def _sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair: 10.77.0.1 (node 0) and 10.77.0.2 (node 1)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")
    tag = f"sp{os.getpid() % 100000}"
    ns = [f"{tag}a", f"{tag}b"]
    try:
        for n in ns:
            _sh("ip", "netns", "add", n)
            _sh("ip", "-n", n, "link", "set", "lo", "up")
        _sh("ip", "link", "add", f"{tag}0", "netns", ns[0], "type", "veth", "peer", "name", f"{tag}1", "netns", ns[1])
        for i, n in enumerate(ns):
            _sh("ip", "-n", n, "addr", "add", f"10.77.0.{i + 1}/24", "dev", f"{tag}{i}")
            _sh("ip", "-n", n, "link", "set", f"{tag}{i}", "up")
        yield [(n, f"10.77.0.{i + 1}", f"{tag}{i}") for i, n in enumerate(ns)]
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_two_nodes_in_two_network_namespaces(tmp_path, two_namespaces):
    """One torchrun per "node", each in its own network namespace with its own address; the ranks meet
    over the veth pair (gloo), SP=2 across the two nodes."""
    master = two_namespaces[0][1]
    procs = []
    for node, (ns, addr, dev) in enumerate(two_namespaces):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", f"--node-rank={node}", f"--master-addr={master}", "--master-port=29611",
               f"--local-addr={addr}", "-m", "seqpar.cli", "train", *TINY, f"log.dir={tmp_path}"]
        procs.append(subprocess.Popen(cmd, env=_env(GLOO_SOCKET_IFNAME=dev), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = _wait_all(procs, 300)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "2 ranks (torchrun, gloo, cpu)" in outs[0][0]
    assert _metrics(tmp_path)[-1]["step"] == 4
