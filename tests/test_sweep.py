"""`seqpar bench sweep`: the CPU toy sweep runs end to end (real `seqpar bench sp` on gloo ranks
under torchrun), is resumable (a second run does no work), and writes PNG plots; the function
runner, failed points, missing commands and bad YAML behave as documented."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from seqpar.bench import sweep as S
from seqpar.cli import main as seqpar_main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
PNG = b"\x89PNG\r\n\x1a\n"


def write_yaml(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def test_toy_cpu_sweep_end_to_end_and_resumable(tmp_path):
    out = tmp_path / "toy"
    assert seqpar_main(["bench", "sweep", str(SWEEPS / "toy_cpu.yaml"), "--out", str(out)]) == 0
    sweep = S.load_sweep(SWEEPS / "toy_cpu.yaml")
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == S.RESULTS_SCHEMA and len(results["records"]) == len(sweep.points()) == 4
    for rec in results["records"]:
        assert rec["schema"] == S.RECORD_SCHEMA and rec["status"] == "ok", rec.get("error")
        assert rec["output"]["meta"]["P"] == rec["point"]["world_size"]
        assert "torch.distributed.run" in rec["runner"]["command"]
    obs = S.observations(sweep, results["records"])
    assert sorted((o["t_local"], o["world_size"], o["method"]) for o in obs) == sorted(
        (t, P, m) for t in (64, 256) for P in (1, 2) for m in ("lasp2", "zeco"))
    assert all(o["efficiency"] > 0 and o["sp_ms"] > 0 and o["single_ms"] > 0 for o in obs)
    for spec in sweep.plots:
        assert (out / "plots" / spec["file"]).read_bytes()[:8] == PNG
    records = sorted((out / "records").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in records}

    again = S.run_sweep(sweep, out)  # everything recorded: nothing runs, nothing is rewritten
    assert (again.ran, again.skipped) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in records} == before
    assert len(again.records) == 4 and all(p.read_bytes()[:8] == PNG for p in again.plots)


def model_sweep(tmp_path, **extra) -> Path:
    return write_yaml(tmp_path / "model.yaml", {
        "name": "model_small",
        "grid": {"variant": ["gla"], "t_local": [65536], "world_size": [2, 16, 256], "method": ["lasp2_ring", "zeco"]},
        "point": {"function": "seqpar.bench.model:predict_point", "args": {"gpus_per_node": 8}},
        "plots": [{"file": "eff.png", "x": "world_size", "y": "efficiency", "series": ["method"], "logx": True,
                   "model": {"variant": "gla", "t_local": 65536, "methods": ["ring"], "P": [2, 4, 8]}}],
        **extra,
    })


def test_function_points_resume_point_by_point(tmp_path):
    sweep = S.load_sweep(model_sweep(tmp_path))
    out = tmp_path / "out"
    first = S.run_sweep(sweep, out)
    assert (first.ran, first.skipped) == (6, 0)
    from seqpar.bench.model import predict_point

    for rec in first.records:  # each record holds what the function returned for its point
        assert rec["output"] == predict_point(**rec["point"], gpus_per_node=8)
    S.record_path(out, {"variant": "gla", "t_local": 65536, "world_size": 16, "method": "zeco"}).unlink()
    second = S.run_sweep(sweep, out)
    assert (second.ran, second.skipped) == (1, 5)
    assert S.model_curves({"variant": "gla", "methods": ["ring"], "P": [2, 4, 8]})["model: ring"][0][0] == 2
    assert second.plots[0].read_bytes()[:8] == PNG
    assert not list((out / "records").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_failed_points_are_recorded_skipped_and_retried(tmp_path):
    sweep = S.load_sweep(write_yaml(tmp_path / "fail.yaml", {
        "name": "fails",
        "grid": {"code": [0, 3]},
        "point": {"command": "{python} -c \"import json, sys; c = int(sys.argv[1]); "
                             "json.dump({{'code': c}}, open(sys.argv[2], 'w')); sys.exit(c)\" {code} {out}"},
    }))
    out = tmp_path / "out"
    first = S.run_sweep(sweep, out)
    status = {r["point"]["code"]: r for r in first.records}
    assert status[0]["status"] == "ok" and status[0]["output"] == {"code": 0}
    assert status[3]["status"] == "failed" and "exit status 3" in status[3]["error"]
    assert S.run_sweep(sweep, out).ran == 0
    assert S.run_sweep(sweep, out, retry_failed=True).ran == 1


def test_missing_command_fails_before_running_anything(tmp_path):
    out = tmp_path / "out"
    missing = S.load_sweep(write_yaml(tmp_path / "missing.yaml", {
        "name": "missing", "grid": {"n": [1]},
        "point": {"command": "{python} -m seqpar.cli nope --n {n} --out {out}", "expects": "`seqpar nope`"}}))
    with pytest.raises(S.SweepError, match=r"'seqpar nope' is not a seqpar subcommand(.|\n)*expects: `seqpar nope`"):
        S.run_sweep(missing, out)
    assert not out.exists()
    bad = S.load_sweep(write_yaml(tmp_path / "bad.yaml", {
        "name": "bad", "grid": {"n": [1]}, "point": {"command": "no-such-program-xyz --n {n} --out {out}"}}))
    with pytest.raises(S.SweepError, match="'no-such-program-xyz' is not on PATH"):
        S.run_sweep(bad, out)
    bench = S.load_sweep(write_yaml(tmp_path / "bench.yaml", {
        "name": "bench", "grid": {"n": [1]}, "point": {"command": "{python} -m seqpar.cli bench nope --out {out}"}}))
    with pytest.raises(S.SweepError, match="'seqpar bench nope' is not a seqpar benchmark"):
        S.run_sweep(bench, out)


@pytest.mark.parametrize("change, message", [
    ({"gird": {}}, "unknown keys"),
    ({"point": {"command": "echo {n} {m} {out}"}}, r"uses \{m\} which the grid does not define"),
    ({"point": {"command": "echo {n}"}}, r"must write its JSON to \{out\}"),
    ({"point": {"function": "seqpar.bench.model"}}, "module:name"),
    ({"grid": {"out": [1]}}, "reserved"),
    ({"exclude": [{"m": 1}]}, "exclude"),
    ({"name": "a b"}, "must be letters"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, change, message):
    base = {"name": "ok", "grid": {"n": [1, 2]}, "point": {"command": "echo {n} {out}"}}
    with pytest.raises(S.SweepError, match=message):
        S.load_sweep(write_yaml(tmp_path / "s.yaml", {**base, **change}))


def test_shipped_sweeps_load_and_expand():
    counts = {p.stem: len(S.load_sweep(p).points()) for p in SWEEPS.glob("*.yaml")}
    assert counts == {"toy_cpu": 4, "model_grid": 160, "sp_weak_scaling_h200": 4,
                      "train_hybrid_vs_softmax_h200": 10, "train_memory_vs_length_h200": 10,
                      "train_weak_scaling_h200": 4}
    weak = S.load_sweep(SWEEPS / "train_weak_scaling_h200.yaml")
    assert [(p["world_size"], p["seq_len"]) for p in weak.points()] == [(1, 65536), (2, 131072),
                                                                        (1, 262144), (2, 524288)]
    gpu = S.load_sweep(SWEEPS / "sp_weak_scaling_h200.yaml")
    S.check_runnable(gpu, gpu.points(), Path("unused"))  # `seqpar bench sp` exists today
    rows = S.extract_metrics(gpu, {"results": [{"variant": "gla", "method": "zeco", "layout": "zigzag", "efficiency": 0.9,
                                                "sp_ms": 1.0, "single_ms": 0.9, "local_kernel_ms": 0.8,
                                                "state_passes_ms": 0.05, "scan_ms": 0.1, "exposed_ms": 0.05}] * 2})
    assert len(rows) == 2 and rows[0]["efficiency"] == 0.9
