"""`seqpar bench sp` runs end to end on CPU ranks and its parity check passes (a smoke test: the
numbers that matter come from the GPUs)."""
from __future__ import annotations

import json

import pytest
import torch

from seqpar.bench import comm as bench_comm
from seqpar.testing import run_cli


def test_bench_sp_smoke(tmp_path):
    out = str(tmp_path / "sp.json")
    assert run_cli(["bench", "sp", "--variants", "gla", "delta_rule", "--t-local", "32", "--heads", "2", "--head-dim",
                    "8", "--dtype", "fp32", "--repeat", "1", "--warmup", "0", "--check", "--check-t-local", "24",
                    "--out", out], 2) == [0, 0]
    data = json.loads(open(out).read())
    assert data["meta"]["P"] == 2
    assert len(data["checks"]) == 2 * 3 * 2 and all(c["pass"] for c in data["checks"])
    rows = data["results"]
    assert len(rows) == 2 * 3 * 2
    for r in rows:
        assert r["sp_ms"] > 0 and r["single_ms"] > 0 and r["efficiency"] > 0
        assert r["local_kernel_ms"] > 0 and r["scan_ms"] > 0


def test_bench_sp_cuda_graph_needs_gpus():
    from seqpar.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    with pytest.raises(SystemExit, match="--cuda-graph captures CUDA graphs and needs GPUs"):
        main(["bench", "sp", "--cuda-graph"])


def test_bench_sp_host_smoke(tmp_path):
    from seqpar.cli import build_parser

    out = str(tmp_path / "sp_host.json")
    args = build_parser().parse_args(["bench", "sp-host", "--variants", "simple_gla", "--methods", "lasp2", "zeco",
                                      "--repeat", "2", "--warmup", "1", "--out", out])
    assert args.func(args) == 0  # spawns its own two gloo ranks
    rows = json.loads(open(out).read())["results"]
    assert len(rows) == 2 * 2
    for r in rows:
        assert r["sp"]["triton"] == r["plain"]["triton"] + 2 and r["sp"]["ops"] > r["plain"]["ops"] > 0
        assert r["sp_host_ms"] >= r["sp_host_ms_less_comm_waits"] > 0 and r["plain_host_ms"] > 0


def test_bench_comm_smoke(tmp_path):
    out = str(tmp_path / "comm.json")
    assert run_cli(["bench", "comm", "--sizes-kb", "4", "64", "512", "--repeat", "2", "--out", out], 2) == [0, 0]
    data = json.loads(open(out).read())
    for op in ("all_gather", "all_to_all", "p2p"):
        assert len(data["times_ms"][op]) == 3 and all(t > 0 for t in data["times_ms"][op])
        assert data["fit"][op]["alpha_s"] >= 0 and data["fit"][op]["beta_Bps"] > 0


def test_alpha_beta_fit_recovers_a_line():
    sizes = [1e3, 1e5, 1e7]
    alpha, beta = 20e-6, 50e9
    alpha_fit, beta_fit = bench_comm.fit_alpha_beta(sizes, [(alpha + n / beta) * 1e3 for n in sizes])
    assert abs(alpha_fit - alpha) < 1e-9 and abs(beta_fit / beta - 1) < 1e-6
