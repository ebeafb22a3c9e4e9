"""The run configuration: typed sections with defaults, loaded from YAML and `key=value` overrides.

    config = load(["configs/hybrid-125m.yaml", "configs/parallel/sp2.yaml"], ["train.steps=100", "parallel.sp=4"])

Sections: `model:` (seqpar.models.ModelConfig), `parallel:`, `train:`, `data:`, `checkpoint:`, `log:`.
Later files and overrides win. Every error names the bad key and what is allowed, and is raised
before any process group exists. The defaults are the built-in tiny run (`seqpar train` with no
arguments); configs/default.yaml spells them out.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seqpar.models import ModelConfig
from seqpar.parallel import SOFTMAX_METHODS
from seqpar.sp import LAYOUTS, METHODS
from seqpar_kernels.backends import BACKENDS

ENGINES = ("native", "megatron", "deepspeed")
TASKS = ("mqar", "passkey", "text", "megatron")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


def choice(default, options):
    return field(default=default, metadata={"choices": tuple(options)})


def positive(default, allow_zero: bool = False):
    return field(default=default, metadata={"min": 0 if allow_zero else 1})


@dataclass
class ParallelConfig:
    tp: int = positive(1)
    pp: int = positive(1)
    sp: int = positive(2)
    dp: int = positive(0, allow_zero=True)  # 0: whatever the job's ranks leave, world / (tp * pp * sp)
    layout: str = choice("zigzag", LAYOUTS)
    method: str = choice("lasp2", METHODS)  # linear layers: LASP-2 all-gather, ZeCO all-scan, ring
    softmax_method: str = choice("allgather", SOFTMAX_METHODS)  # softmax layers: K/V all-gather or ring
    zeco_slices: int = positive(4)
    backend: str = choice("auto", ("auto",) + BACKENDS)  # kernel backend of the linear layers


@dataclass
class TrainConfig:
    engine: str = choice("native", ENGINES)
    seq_len: int = positive(128)
    micro_batch_size: int = positive(16)
    global_batch_size: int = positive(0, allow_zero=True)  # 0: micro_batch_size x dp (no accumulation)
    steps: int = positive(250)
    lr: float = 3e-3
    min_lr: float = 1e-3
    warmup_steps: int = positive(20, allow_zero=True)
    schedule: str = choice("cosine", ("cosine", "linear", "constant"))
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0: off
    # activation checkpointing: full recomputes each block; offload also keeps the block inputs in host memory
    checkpointing: str = choice("none", ("none", "full", "offload"))
    mlp_chunk: int = positive(0, allow_zero=True)  # MLP computed this many local tokens at a time (0: at once)
    # bf16-autocast: fp32 weights, bf16 compute; bf16: bf16 weights and optimizer state; bf16-master:
    # bf16 weights and activations, fp32 master weights and optimizer state (native engine)
    precision: str = choice("fp32", ("fp32", "bf16-autocast", "bf16", "bf16-master"))
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    seed: int = 1234
    ce_chunk: int = positive(4096)  # tokens per cross-entropy chunk: logits never exceed [ce_chunk, vocab/tp]
    nonfinite: str = choice("stop", ("stop", "skip"))  # a NaN/Inf loss or gradient: stop, or skip the step
    fault_timeout_s: float = 300.0  # a rank silent this long ends the job on every rank
    exit_interval: int = positive(0, allow_zero=True)  # stop (with a checkpoint) after this many steps in one
    #                                                    invocation, for time-limited allocations; 0: run to the end
    zero_stage: int = choice(2, (0, 1, 2, 3))  # engine: deepspeed


@dataclass
class DataConfig:
    task: str = choice("mqar", TASKS)
    path: str = ""  # text: a file, directory or glob; megatron: an indexed-dataset prefix (path/name without .bin)
    pack: bool = True  # text/megatron: pack documents into sequences, with boundaries (cu_seqlens)
    num_pairs: int = positive(4)  # mqar: key-value pairs per sequence
    seed: int = 0


@dataclass
class CheckpointConfig:
    dir: str = ""  # "": <log.dir>/checkpoints
    interval: int = positive(100, allow_zero=True)  # steps between saves; 0: only at the end
    keep: int = positive(2)
    resume: str = "auto"  # auto: the latest complete checkpoint in dir if any; none; or a checkpoint path
    save: str = choice("on", ("on", "off"))  # off: write no checkpoints (benchmarks, sweeps)


@dataclass
class LogConfig:
    dir: str = "runs/default"
    interval: int = positive(10)
    progress: str = choice("on", ("on", "off"))  # rank 0: a bar on a terminal, else a line every interval
    tensorboard: str = choice("auto", ("auto", "on", "off"))  # auto: when tensorboard is installed
    profile_interval: int = positive(100, allow_zero=True)  # steps between SP-communication profiles; 0: off
    summary: str = ""  # a JSON file for the run's steady-state metrics (medians after warm-up), written at the end
    memory_report: str = choice("off", ("off", "on"))  # on: what fills GPU memory at the first steps' peak


# The built-in tiny hybrid: 2 blocks LS (Gated DeltaNet, softmax), hidden 128, 256 ids. A `model:`
# section (file or override) starts from these values; sizes derived from them (head_dim, ...) are
# derived again from the merged values.
DEFAULT_MODEL = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, pattern="LS",
                     linear_variant="gated_delta_rule", tie_embeddings=True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**DEFAULT_MODEL), metadata={"base": DEFAULT_MODEL})
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# ---------------------------------------------------------------- loading


def load(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- `section.key=value` overrides; then checked."""
    data: dict = {}
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections ({', '.join(SECTIONS)})")
        _merge(data, loaded, str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    config = from_dict(Config, data, "")
    check(config)
    return config


def _merge(into: dict, new: dict, source: str) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v, source)
        else:
            into[k] = v


def from_dict(cls, data, where: str):
    """Build dataclass `cls` from a mapping, checking names, types and allowed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {name!r}{hint}; {where or 'the config'} has: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], fields[key], name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the section's own checks (ModelConfig validates itself)
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(value, tp, f: dataclasses.Field, name: str):
    if dataclasses.is_dataclass(tp):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return from_dict(tp, {**f.metadata.get("base", {}), **(value or {})}, name)
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp, origin = args[0], typing.get_origin(args[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else object
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{name} must have {len(args)} entries, got {value!r}")
        items = [_scalar(v, inner if origin is list or args[-1] is Ellipsis else args[i], f"{name}[{i}]")
                 for i, v in enumerate(value)]
        value = origin(items)
    else:
        value = _scalar(value, tp, name)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: {allowed}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{name} = {value!r} must be >= {meta['min']}")
    return value


def _scalar(value, tp, name: str):
    if tp is typing.Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: "
                          f"{', '.join(map(str, typing.get_args(tp)))}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{name} must be a {tp.__name__}, got {value!r}")
    return value


def dump(config: Config) -> str:
    return yaml.safe_dump(_plain(config.to_dict()), sort_keys=False)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------- checks across keys


def check(config: Config, world_size: int | None = None) -> None:
    """Checks that need more than one key. With world_size, also the fit of the parallel sizes."""
    p, t, d = config.parallel, config.train, config.data
    shards = p.sp * (2 if p.layout == "zigzag" else 1)
    if t.seq_len % shards:
        raise ConfigError(f"train.seq_len = {t.seq_len} must be divisible by {shards} "
                          f"({'2 x ' if p.layout == 'zigzag' else ''}parallel.sp = {p.sp} for the {p.layout} layout)")
    if t.engine == "native" and (p.tp > 1 or p.pp > 1):
        raise ConfigError(f"parallel.tp = {p.tp}, parallel.pp = {p.pp}: tensor and pipeline parallelism run on "
                          "train.engine: megatron; the native engine does sequence and data parallelism")
    if t.engine == "deepspeed" and (p.tp > 1 or p.pp > 1):
        raise ConfigError(f"parallel.tp = {p.tp}, parallel.pp = {p.pp}: the DeepSpeed route runs ZeRO over sequence "
                          "and data parallelism; use train.engine: megatron for tensor and pipeline parallelism")
    if t.engine == "megatron" and config.checkpoint.resume not in ("auto", "none"):
        raise ConfigError("checkpoint.resume: train.engine: megatron writes no seqpar checkpoints (use Megatron-LM's "
                          "--save/--load with seqpar's layer spec); set checkpoint.resume: none")
    if t.engine != "native" and t.precision == "bf16-master":
        raise ConfigError(f"train.precision: bf16-master is the native engine's; with train.engine: {t.engine} use "
                          "train.precision: bf16, whose optimizer keeps fp32 master weights already")
    if t.engine == "megatron" and t.mlp_chunk:
        raise ConfigError("train.mlp_chunk applies to seqpar's own blocks (engines native and deepspeed); Megatron "
                          "builds its own MLP: set train.mlp_chunk=0 with train.engine: megatron")
    if t.engine == "megatron" and t.checkpointing == "offload":
        raise ConfigError("train.checkpointing: offload applies to seqpar's own blocks (engines native and deepspeed); "
                          "with train.engine: megatron use full")
    if t.engine == "megatron" and t.nonfinite == "skip":
        raise ConfigError("train.nonfinite: skip is not available with train.engine: megatron; use stop")
    if t.engine == "deepspeed" and t.nonfinite == "skip":
        raise ConfigError("train.nonfinite: skip is not available with train.engine: deepspeed (ZeRO reduces and "
                          "applies gradients in one step, they cannot be dropped); use stop")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr = {t.min_lr} must be between 0 and train.lr = {t.lr}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr = {t.lr} must be > 0")
    if d.task in ("text", "megatron") and not d.path:
        raise ConfigError(f"data.path is required for data.task: {d.task} "
                          f"({'a text file, directory or glob' if d.task == 'text' else 'an indexed dataset prefix'})")
    if d.task in ("mqar", "passkey"):
        from seqpar.train.data import synthetic_problem

        problem = synthetic_problem(config)
        if problem:
            raise ConfigError(problem)
    if world_size is not None:
        model_ranks = p.tp * p.pp * p.sp
        if world_size % model_ranks:
            raise ConfigError(f"the job has {world_size} ranks, not a multiple of parallel.tp x pp x sp = "
                              f"{p.tp} x {p.pp} x {p.sp} = {model_ranks}")
        dp = p.dp or world_size // model_ranks
        if model_ranks * dp != world_size:
            raise ConfigError(f"parallel.dp = {p.dp}: tp x pp x sp x dp = {model_ranks * dp} but the job has "
                              f"{world_size} ranks; set parallel.dp: 0 to use what is left")
        gbs = t.global_batch_size or t.micro_batch_size * dp
        if gbs % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size = {gbs} must be a multiple of train.micro_batch_size x dp = "
                              f"{t.micro_batch_size} x {dp}")


def world_size_of(config: Config) -> int:
    """Ranks a run of this config needs when it starts its own (no launcher): dp 0 counts as 1."""
    p = config.parallel
    return p.tp * p.pp * p.sp * max(p.dp, 1)
