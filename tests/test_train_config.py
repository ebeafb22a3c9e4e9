"""The config system: YAML + overrides into typed sections, and a clear error for every bad value."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from seqpar import config as cfg
from seqpar import launch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "sweeps" not in p.parts)


def test_default_yaml_is_the_builtin_default():
    assert cfg.load([ROOT / "configs" / "default.yaml"]) == cfg.Config()
    # and spells out every key, so that it documents them all
    import dataclasses

    import yaml

    written = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    for section in cfg.SECTIONS:
        fields = {f.name for f in dataclasses.fields(getattr(cfg.Config(), section))}
        assert set(written[section]) == fields, (section, fields ^ set(written[section]))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_configs_load(path):
    c = cfg.load([path])
    assert c.train.seq_len > 0


def test_files_merge_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train: {steps: 7, lr: 1e-3}\nparallel: {sp: 4}\n")
    c = cfg.load([ROOT / "configs" / "hybrid-125m.yaml", a], ["train.steps=9", "model.num_kv_heads=4",
                                                                 "train.betas=[0.8, 0.9]", "data.pack=false"])
    assert (c.train.steps, c.train.lr, c.parallel.sp, c.model.hidden_size) == (9, 1e-3, 4, 768)
    assert c.model.num_kv_heads == 4 and c.train.betas == (0.8, 0.9) and c.data.pack is False


BAD = [
    (["train.stesp=3"], "unknown key 'train.stesp' (did you mean 'steps'?)"),
    (["trian.steps=3"], "unknown key 'trian' (did you mean 'train'?)"),
    (["parallel.method=foo"], "parallel.method = 'foo' is not allowed; choose one of: lasp2, zeco, ring"),
    (["parallel.layout=diagonal"], "parallel.layout = 'diagonal' is not allowed; choose one of: contiguous, zigzag"),
    (["train.engine=jax"], "train.engine = 'jax' is not allowed; choose one of: native, megatron, deepspeed"),
    (["train.precision=fp8"], "train.precision = 'fp8' is not allowed"),
    (["train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["train.steps=2.5"], "train.steps must be an integer, got 2.5"),
    (["train.steps=0"], "train.steps = 0 must be >= 1"),
    (["data.pack=maybe"], "data.pack must be true or false"),
    (["train.betas=[0.9]"], "train.betas must have 2 entries"),
    (["model.num_heads=3"], "hidden_size 128 is not divisible by num_heads 3"),
    (["model.pattern=LLX"], "unknown symbols ['X']"),
    (["train.seq_len=130"], "train.seq_len = 130 must be divisible by 4 (2 x parallel.sp = 2 for the zigzag layout)"),
    (["parallel.tp=2"], "tensor and pipeline parallelism run on train.engine: megatron"),
    (["train.engine=deepspeed", "train.nonfinite=skip"], "train.nonfinite: skip is not available with"),
    (["train.engine=megatron", "train.mlp_chunk=4096"], "train.mlp_chunk applies to seqpar's own blocks"),
    (["train.engine=megatron", "train.checkpointing=offload"], "train.checkpointing: offload applies to seqpar's own blocks"),
    (["train.engine=deepspeed", "train.precision=bf16-master"], "train.precision: bf16-master is the native engine's"),
    (["train.min_lr=1"], "train.min_lr = 1.0 must be between 0 and train.lr"),
    (["data.task=text"], "data.path is required for data.task: text"),
    (["data.num_pairs=20"], "data.num_pairs = 20: the 40 pair tokens must fit in the first of 4 parts"),
    (["data.num_pairs=100"], "data.num_pairs = 100 needs model.vocab_size >= 400"),
    (["train.steps"], "override 'train.steps' must look like section.key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load([], overrides)
    assert message in str(e.value)


def test_parallel_sizes_must_fit_the_job():
    c = cfg.load([], ["parallel.sp=2"])
    with pytest.raises(cfg.ConfigError, match="the job has 3 ranks, not a multiple of parallel.tp x pp x sp"):
        cfg.check(c, world_size=3)
    c = cfg.load([], ["parallel.dp=3"])
    with pytest.raises(cfg.ConfigError, match="parallel.dp = 3: tp x pp x sp x dp = 6 but the job has 4 ranks"):
        cfg.check(c, world_size=4)
    c = cfg.load([], ["train.global_batch_size=24", "train.micro_batch_size=16"])
    with pytest.raises(cfg.ConfigError, match="must be a multiple of train.micro_batch_size x dp"):
        cfg.check(c, world_size=2)


def test_bad_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(cfg.ConfigError, match="a config is a mapping of sections"):
        cfg.load([bad])


def test_cli_reports_config_errors_before_starting_anything():
    out = subprocess.run([sys.executable, "-m", "seqpar.cli", "train", "parallel.method=lasp3"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "config error: parallel.method = 'lasp3' is not allowed; choose one of: lasp2, zeco, ring" in out.stderr


def test_launch_command_lines():
    lines = launch.commands("torchrun", 2, 8, ["--config", "configs/hybrid-1.3b.yaml"], master_addr="n0", port=1234)
    assert "--nnodes=2 --nproc-per-node=8 --node-rank=$i --master-addr=n0 --master-port=1234 -m seqpar.cli train " \
           "--config configs/hybrid-1.3b.yaml" in lines[-1]
    assert launch.commands("torchrun", 1, 2, [])[0] == "torchrun --standalone --nproc-per-node=2 -m seqpar.cli train"
    assert launch.commands("slurm", 2, 4, ["train.steps=5"])[0] == \
        "sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 launch/slurm.sbatch train.steps=5"
    assert launch.commands("mpirun", 2, 4, [], master_addr="n0")[0] == "mpirun -n 8 -ppn 4 -hosts n0,NODE1 seqpar train"
