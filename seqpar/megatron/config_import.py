"""`seqpar config import <file> [-o out.yaml]`: a Megatron-LM configuration as a seqpar YAML.

Reads any of
* an argument list: a text or shell file with `--flag value` (line continuations, comments, bash
  arrays and `NAME=value` variables are understood; `$NAME` / `${NAME}` are substituted);
* a functional-test `model_config.yaml`: `MODEL_ARGS:` with CLI flags as keys (`true` = flag given);
* a `--yaml-cfg` file: `language_model:` and `model_parallel:` sections plus top-level arguments.

and writes the sections `model:` (seqpar.models.ModelConfig), `parallel:` (tp, pp, sp = CP, dp,
layout, method, softmax_method), `train:`, `data:`, `checkpoint:` and `log:` where the source says
something about them. Every source argument ends up in one of four lists, printed and written as
comments at the top of the output: used, matching (already what seqpar does), differs (a seqpar
model cannot do it that way; the import goes on without it) and not used by seqpar. Nothing is
dropped silently; Megatron-LM defaults that differ from the seqpar model are listed too.
No megatron-core needed.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seqpar.models import ModelConfig, check_parallel
from seqpar.models.config import pattern_blocks

PATTERN_ARGS = ("hybrid_layer_pattern", "hybrid_override_pattern")
LAUNCHER_ARGS = {"nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_backend",
                 "rdzv_endpoint", "rdzv_id", "standalone"}


@dataclass
class Imported:
    sections: dict
    source: str
    fmt: str
    used: list[str] = field(default_factory=list)
    matching: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"imported {self.source} ({self.fmt})"]
        for title, items in (("used", self.used), ("matching seqpar already", self.matching),
                             ("differs (a seqpar model cannot; left out)", self.differs),
                             ("not used by seqpar", self.unused), ("notes", self.notes)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items]
        return "\n".join(lines)

    def yaml_text(self) -> str:
        header = "".join(f"# {line}\n" for line in self.report().splitlines())
        return header + yaml.safe_dump(self.sections, sort_keys=False)


# ------------------------------------------------------------------ reading the three formats


def read_source(path: str | Path) -> tuple[str, dict]:
    """(format, {argument name with underscores: value}) from any of the three formats."""
    text = Path(path).read_text()
    doc = None
    if Path(path).suffix in (".yaml", ".yml"):
        doc = yaml.safe_load(text)
    if isinstance(doc, dict) and "MODEL_ARGS" in doc:
        args = {}
        for flag, value in (doc["MODEL_ARGS"] or {}).items():
            if value is False:
                continue  # a store_true flag switched off: as if not given
            args[_name(flag)] = True if value is True else _value(str(value))
        return "functional-test model_config.yaml", args
    if isinstance(doc, dict):
        args = {}
        for key, value in doc.items():
            if key in ("language_model", "model_parallel") and isinstance(value, dict):
                args.update({k: v for k, v in value.items() if v is not None})
            elif value is not None:
                args[key] = value
        return "--yaml-cfg file", args
    return "argument list", parse_argument_list(text)


def parse_argument_list(text: str) -> dict:
    text = text.replace("\\\n", " ")
    variables, args = {}, {}
    tokens = shlex.split(text, comments=True, posix=True)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        m = re.fullmatch(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", tok)
        if m and not tok.startswith("-"):
            variables[m.group(1)] = m.group(2).rstrip("(")
            continue
        if not tok.startswith("--") or len(tok) == 2:
            continue
        name, eq, inline = tok[2:].partition("=")
        values = [inline] if eq else []
        while not eq and i < len(tokens) and not tokens[i].startswith("--") and not _boundary(tokens[i]):
            values.append(tokens[i])
            i += 1
        values = [_substitute(v, variables) for v in values]
        args[_name(name)] = True if not values else (_value(values[0]) if len(values) == 1 else
                                                     [_value(v) for v in values])
    return args


def _boundary(tok: str) -> bool:
    """Tokens that end a flag's values: shell syntax and the training script's name."""
    return tok in (")", "(", "&&", "||", "|", ";", "\\") or tok.endswith(".py") or tok.endswith("=(")


def _substitute(value: str, variables: dict) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def _name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _value(s: str):
    for convert in (int, float):
        try:
            return convert(s)
        except ValueError:
            pass
    return {"true": True, "false": False, "True": True, "False": False}.get(s, s)


# ------------------------------------------------------------------ the mapping


def import_config(path: str | Path, *, pattern: str | None = None, linear_variant: str | None = None) -> Imported:
    fmt, args = read_source(path)
    out = Imported(sections={}, source=str(path), fmt=fmt)
    remaining = dict(args)

    def take(name, default=None):
        if name in remaining:
            value = remaining.pop(name)
            out.used.append(f"--{name.replace('_', '-')} {value!r}" if value is not True else f"--{name.replace('_', '-')}")
            return value
        return default

    def unresolved(name, value):
        if isinstance(value, str) and "$" in value:
            out.notes.append(f"--{name.replace('_', '-')} {value}: an unresolved shell variable; set it in the output")

    _differences(remaining, out)
    model, parallel, train, data, checkpoint, log = {}, {}, {}, {}, {}, {}
    tp = int(take("tensor_model_parallel_size", 1))
    pp = int(take("pipeline_model_parallel_size", 1))
    cp = int(take("context_parallel_size", 1))
    parallel.update(tp=tp, pp=pp, sp=cp)

    hidden = take("hidden_size")
    heads = take("num_attention_heads")
    megatron_layers = take("num_layers")
    if hidden is None or heads is None or megatron_layers is None:
        missing = [n for n, v in (("--hidden-size", hidden), ("--num-attention-heads", heads),
                                  ("--num-layers", megatron_layers)) if v is None]
        raise ValueError(f"{path}: the model's size is incomplete, missing {', '.join(missing)}")
    model.update(hidden_size=int(hidden), num_heads=int(heads))
    gqa = take("group_query_attention", False) or fmt == "--yaml-cfg file"
    groups = take("num_query_groups")
    if groups is not None and gqa:
        model["num_kv_heads"] = int(groups)
    elif groups is not None:
        out.notes.append(f"--num-query-groups {groups} without --group-query-attention: Megatron ignores it, so does "
                         "the import")
    if (kv := take("kv_channels")) is not None:
        model["head_dim"] = int(kv)
    ffn = take("ffn_hidden_size")
    model["ffn_hidden_size"] = int(ffn) if ffn is not None else int(4 * int(hidden) * 2 / 3 / 64) * 64
    if ffn is None:
        out.notes.append(f"ffn_hidden_size {model['ffn_hidden_size']}: Megatron-LM's default for SwiGLU")

    source_pattern = next((take(n) for n in PATTERN_ARGS if n in remaining), None)
    variant = linear_variant or "gated_delta_rule"
    if linear_variant is None and pattern is None and source_pattern is not None and "M" in str(source_pattern):
        variant = "simple_gla"
        out.notes.append("linear_variant 'simple_gla' for the pattern's Mamba layers (M): Mamba-2's SSD is the "
                         "simple-GLA recurrence, one data-dependent decay per head (pass --linear-variant to choose)")
    if pattern is None and source_pattern is None:
        pattern = "LLLS" if int(megatron_layers) % 4 == 0 else "L"
        out.notes.append(f"pattern {pattern!r}: the source has no hybrid pattern, so seqpar's 3:1 linear:softmax "
                         "default (pass --pattern to choose)")
    if pattern is None:
        pattern, _, mtp = str(source_pattern).partition("/")
        if mtp:
            out.differs.append(f"multi-token-prediction layers {mtp!r} after '/' in the hybrid pattern: not part of "
                               "a seqpar model")
        megatron_count = len(pattern.replace("|", ""))
        if megatron_count != int(megatron_layers):
            out.notes.append(f"--num-layers {megatron_layers} but the hybrid pattern has {megatron_count} layers")
        num_blocks = len(pattern_blocks(pattern, variant))
        out.notes.append(f"num_layers {num_blocks}: Megatron counts mixers and MLPs as separate layers "
                         f"({megatron_count}); a seqpar block is a mixer with its MLP")
        model["num_layers"] = num_blocks
    else:
        model["num_layers"] = int(megatron_layers)
    model.update(pattern=pattern, linear_variant=variant)
    if (k := take("linear_conv_kernel_dim")) is not None:
        model["conv_size"] = int(k)
    if (base := take("rotary_base")) is not None:
        model["rope_base"] = float(base)
    model["tie_embeddings"] = not take("untie_embeddings_and_output_weights", False)
    if (std := take("init_method_std")) is not None:
        model["init_std"] = float(std)
    eps = take("norm_epsilon", take("layernorm_epsilon"))
    if eps is not None:
        model["norm_eps"] = float(eps)
    vocab = take("vocab_size")
    divisible = int(take("make_vocab_size_divisible_by", 128))
    if vocab is not None:
        step = divisible * tp
        model["vocab_size"] = -(-int(vocab) // step) * step
        if model["vocab_size"] != int(vocab):
            out.notes.append(f"vocab_size {model['vocab_size']}: {vocab} padded to a multiple of "
                             f"--make-vocab-size-divisible-by x TP = {step}, as Megatron-LM does")
    else:
        out.notes.append("vocab_size: the source takes it from its tokenizer; set model.vocab_size (padded to a "
                         f"multiple of {divisible * tp}, as Megatron-LM does)")

    if (comm := take("cp_comm_type")) is not None:
        parallel["softmax_method"] = {"p2p": "ring", "all_gather": "allgather"}.get(str(comm), "allgather")
        if str(comm) not in ("p2p", "all_gather"):
            out.notes.append(f"--cp-comm-type {comm}: seqpar's softmax layers use allgather (or ring for p2p)")
    parallel.update(layout="zigzag", method="lasp2")
    world = _world_size(remaining, take)
    if world:
        parallel["dp"] = world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else 0

    train["engine"] = "megatron" if tp * pp > 1 else "native"
    for src, key, conv in (("seq_length", "seq_len", int), ("micro_batch_size", "micro_batch_size", int),
                           ("global_batch_size", "global_batch_size", int), ("train_iters", "steps", int),
                           ("lr", "lr", float), ("min_lr", "min_lr", float), ("lr_warmup_iters", "warmup_steps", int),
                           ("weight_decay", "weight_decay", float), ("clip_grad", "grad_clip", float),
                           ("seed", "seed", int)):
        if (v := take(src)) is not None:
            unresolved(src, v)
            train[key] = v if isinstance(v, str) else conv(v)
    if "lr" in train and "min_lr" not in train:
        train["min_lr"] = 0.0  # Megatron-LM's default --min-lr (seqpar's own default assumes its own lr)
    if "adam_beta1" in remaining or "adam_beta2" in remaining:
        train["betas"] = [float(take("adam_beta1", 0.9)), float(take("adam_beta2", 0.999))]
    if (style := take("lr_decay_style")) is not None:
        if style in ("cosine", "linear", "constant"):
            train["schedule"] = style
        else:
            out.differs.append(f"--lr-decay-style {style}: seqpar schedules are cosine, linear and constant")
    if take("bf16", False):
        train["precision"] = "bf16"
    if (gran := take("recompute_granularity")) is not None:
        train["checkpointing"] = "full"  # seqpar recomputes whole blocks or nothing
        if gran != "full":
            out.differs.append(f"--recompute-granularity {gran}: seqpar recomputes whole blocks "
                               "(train.checkpointing: full)")
    if (paths := take("data_path")) is not None:
        paths = paths if isinstance(paths, list) else [paths]
        prefixes = [p for p in paths if isinstance(p, str) and not _is_number(p)]
        data["task"] = "megatron"
        data["path"] = prefixes[0] if prefixes else ""
        for p in prefixes:
            unresolved("data_path", p)
        if len(prefixes) > 1:
            out.differs.append(f"--data-path with {len(prefixes)} weighted datasets: seqpar reads one indexed dataset "
                               f"(using {prefixes[0]})")
    if "reset_attention_mask" in remaining:
        data["pack"] = bool(take("reset_attention_mask"))
    if (save := take("save")) is not None:
        checkpoint["dir"] = save
    if (interval := take("save_interval")) is not None:
        checkpoint["interval"] = int(interval)
    if (load := take("load")) is not None:
        checkpoint["resume"] = load
    if (interval := take("log_interval")) is not None:
        log["interval"] = int(interval)

    for name, value in sorted(remaining.items()):
        out.unused.append(f"--{name.replace('_', '-')}" + ("" if value is True else f" {value!r}"))
    ModelConfig.from_dict(model)  # the model must build
    seq = train.get("seq_len")
    check_parallel(ModelConfig.from_dict(model), tp=tp, pp=pp, sp=cp, seq_len=seq if isinstance(seq, int) else None,
                   layout=parallel["layout"])
    out.sections = {k: v for k, v in (("model", model), ("parallel", parallel), ("train", train), ("data", data),
                                      ("checkpoint", checkpoint), ("log", log)) if v}
    return out


def _is_number(s) -> bool:
    return isinstance(_value(str(s)), (int, float))


def _world_size(remaining: dict, take) -> int | None:
    """torchrun's --nproc-per-node x --nnodes when the file launches it."""
    if "nproc_per_node" not in remaining:
        return None
    per_node, nodes = take("nproc_per_node"), take("nnodes", 1)
    try:
        return int(per_node) * int(str(nodes).split(":")[-1])
    except ValueError:
        return None


# What the seqpar model cannot reproduce, explicit or by Megatron-LM's default.
_MATCHING = {"use_mcore_models", "swiglu", "disable_bias_linear", "use_rotary_position_embeddings",
             "no_position_embedding", "normalization", "position_embedding_type", "transformer_impl", "spec",
             "max_position_embeddings", "attention_dropout", "hidden_dropout", "add_bias_linear", "gated_linear_unit",
             "activation_func", "group_query_attention", "untie_embeddings_and_output_weights"}


def _differences(args: dict, out: Imported) -> None:
    """Move the arguments that shape a transformer block out of `args`: those that match the seqpar
    block to `matching`, those that contradict it (explicitly or by Megatron-LM's default) to
    `differs`, and the unsupported features to `differs`."""
    contradicted = set()

    def differs(name, value, why, default=False):
        shown = f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
        out.differs.append(f"{shown}{' (Megatron-LM default)' if default else ''}: {why}")
        contradicted.add(name)

    if not (args.get("swiglu") or args.get("activation_func") == "swiglu" or args.get("gated_linear_unit")):
        differs("swiglu", "absent", "the source MLP is GELU; seqpar blocks use SwiGLU")
    norm = args.get("normalization", "LayerNorm")
    if norm != "RMSNorm":
        differs("normalization", norm, "seqpar blocks use RMSNorm", default="normalization" not in args)
    pos = args.get("position_embedding_type", "none" if args.get("no_position_embedding") else "learned_absolute")
    if args.get("use_rotary_position_embeddings"):
        pos = "rope"
    if pos not in ("rope", "none"):
        differs("position_embedding_type", pos, "seqpar's softmax layers use RoPE at global positions",
                default="position_embedding_type" not in args)
    if not args.get("disable_bias_linear") and args.get("add_bias_linear", True) is not False:
        differs("add_bias_linear", True, "seqpar layers have no biases", default="add_bias_linear" not in args)
    for name in ("hidden_dropout", "attention_dropout"):
        if float(args.get(name, 0.1)) != 0.0:
            differs(name, args.get(name, 0.1), "seqpar has no dropout", default=name not in args)
    if args.get("transformer_impl", "local") == "transformer_engine":
        out.notes.append("--transformer-impl transformer_engine: seqpar's spec is built from local megatron-core "
                         "modules")
    for name in [n for n in args if n in _MATCHING]:
        if name in ("untie_embeddings_and_output_weights", "group_query_attention"):
            continue  # read by the mapping
        value = args.pop(name)
        if name not in contradicted:
            out.matching.append(f"--{name.replace('_', '-')}" + ("" if value is True else f" {value!r}"))
    for name in list(args):
        why = _unsupported(name, args[name])
        if why:
            differs(name, args.pop(name), why)


def _unsupported(name: str, value) -> str | None:
    if name.startswith("moe_") or (name in ("num_experts", "expert_model_parallel_size") and value not in (None, 1)):
        return "mixture of experts"
    if name == "sequence_parallel" and value:
        return "Megatron's TP sequence parallelism; seqpar splits the sequence over the context-parallel group"
    if name in ("multi_latent_attention", "qk_layernorm", "add_qkv_bias", "apply_layernorm_1p", "window_size",
                "rotary_interleaved", "qk_l2_norm", "mtp_num_layers"):
        return "not part of the seqpar softmax block"
    if name == "rotary_percent" and float(value) != 1.0:
        return "seqpar rotates the whole head dimension"
    if name in ("num_layers_per_virtual_pipeline_stage", "virtual_pipeline_model_parallel_size") and value:
        return "virtual (interleaved) pipeline stages"
    if name.startswith("mamba_") or name in ("linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                                             "linear_num_value_heads", "linear_attention_type"):
        return "seqpar's linear layers use num_attention_heads heads of hidden/heads (or kv_channels) dimensions"
    if name == "fp16" and value:
        return "seqpar trains in fp32 or bf16"
    return None


# ------------------------------------------------------------------ the command


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = sub.add_parser("import", help="a Megatron-LM argument list, functional-test model_config.yaml or "
                       "--yaml-cfg file as a seqpar YAML",
                       description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    p.add_argument("file", help="the Megatron-LM configuration")
    p.add_argument("-o", "--output", help="where to write the seqpar YAML (default: print it)")
    p.add_argument("--pattern", help="layer pattern, e.g. LLLS (default: the source's hybrid pattern, else LLLS)")
    p.add_argument("--linear-variant", help="linear-attention variant of the L/M blocks (default: gated_delta_rule)")
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        imported = import_config(args.file, pattern=args.pattern, linear_variant=args.linear_variant)
    except (OSError, ValueError) as e:
        print(f"seqpar config import: {e}", file=sys.stderr)
        return 2
    text = imported.yaml_text()
    if args.output:
        Path(args.output).write_text(text)
        print(imported.report(), file=sys.stderr)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0
