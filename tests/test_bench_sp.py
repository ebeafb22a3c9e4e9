"""`seqpar bench sp` runs end to end on CPU ranks and its parity check passes (a smoke test: the
numbers that matter come from the GPUs)."""
from __future__ import annotations

import json

from seqpar.bench import sp as bench_sp
from seqpar.cli import build_parser
from seqpar.testing import run_ranks


def bench_on_rank(rank, world_size, out):
    args = build_parser().parse_args(
        ["bench", "sp", "--variants", "gla", "delta_rule", "--t-local", "32", "--heads", "2", "--head-dim", "8",
         "--dtype", "fp32", "--repeat", "1", "--warmup", "0", "--check", "--check-t-local", "24", "--out", out])
    return bench_sp.main(args)


def test_bench_sp_smoke(tmp_path):
    out = str(tmp_path / "sp.json")
    assert run_ranks(bench_on_rank, 2, args=(out,)) == [0, 0]
    data = json.loads(open(out).read())
    assert data["meta"]["P"] == 2
    assert len(data["checks"]) == 2 * 3 * 2 and all(c["pass"] for c in data["checks"])
    rows = data["results"]
    assert len(rows) == 2 * 3 * 2
    for r in rows:
        assert r["sp_ms"] > 0 and r["single_ms"] > 0 and r["efficiency"] > 0
        assert r["local_kernel_ms"] > 0 and r["scan_ms"] > 0
