"""Weights between the plain HybridLM (whole tensors, seqpar names) and this rank's part of the
Megatron GPTModel built by seqpar.megatron.model (its pipeline stage's layers, its TP slices).

    load_plain_state(gpt, plain_model.state_dict(), tp_group)    # plain -> this rank's Megatron part
    full = to_plain(gpt, dict(gpt.named_parameters()), tp_group)  # this stage's tensors, whole, plain names

Parameters tagged TP-split (Column/RowParallelLinear, vocab-parallel embedding and head, seqpar's
per-head parameters) are cut along their `partition_dim`; Megatron fuses the SwiGLU gate and up
projections into one `linear_fc1` whose TP slice r is [gate slice r; up slice r].
"""
from __future__ import annotations

import re

import torch

from seqpar.comm import collectives as C

_FC1 = "mlp.linear_fc1.weight"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_IN_LAYER = {"input_layernorm.weight": "attn_norm.weight", "pre_mlp_layernorm.weight": "mlp_norm.weight",
             "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
_TOP = {"embedding.word_embeddings.weight": "embed.weight", "decoder.final_layernorm.weight": "final_norm.weight",
        "output_layer.weight": "output.weight"}


def plain_names(gpt) -> dict[str, str | tuple[str, str]]:
    """Megatron parameter name -> plain name (a (gate, up) pair for the fused fc1)."""
    names = {}
    for name, _ in gpt.named_parameters():
        m = _LAYER.fullmatch(name)
        if m is None:
            if name not in _TOP:
                raise ValueError(f"no plain counterpart for Megatron parameter {name!r}")
            tied = name == "output_layer.weight" and gpt.share_embeddings_and_output_weights
            names[name] = "embed.weight" if tied else _TOP[name]
            continue
        block = f"blocks.{gpt.decoder.layers[int(m.group(1))].layer_number - 1}."
        rest = m.group(2)
        if rest == _FC1:
            names[name] = (block + "mlp.gate_proj.weight", block + "mlp.up_proj.weight")
        elif rest in _IN_LAYER:
            names[name] = block + _IN_LAYER[rest]
        elif rest.startswith("self_attention.mixer."):
            names[name] = block + "mixer." + rest[len("self_attention.mixer."):]
        else:
            raise ValueError(f"no plain counterpart for Megatron parameter {name!r}")
    return names


def _split(p) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def load_plain_state(gpt, plain: dict[str, torch.Tensor], tp_group=None) -> None:
    """Copy the plain model's weights into this rank's part of the Megatron model."""
    tp, r = C.size(tp_group), C.rank(tp_group)
    params = dict(gpt.named_parameters())
    with torch.no_grad():
        for name, target in plain_names(gpt).items():
            p = params[name]
            if isinstance(target, tuple):
                value = torch.cat([plain[t].chunk(tp, dim=0)[r] for t in target])
            elif _split(p) is not None:
                value = plain[target].chunk(tp, dim=_split(p))[r]
            else:
                value = plain[target]
            if value.shape != p.shape:
                raise ValueError(f"{name}: the plain {target} gives shape {tuple(value.shape)} on TP rank {r}, the "
                                 f"Megatron parameter has {tuple(p.shape)}; were both built from the same ModelConfig?")
            p.copy_(value)


def to_plain(gpt, tensors: dict[str, torch.Tensor], tp_group=None) -> dict[str, torch.Tensor]:
    """Per-parameter tensors of this rank (weights or gradients) -> whole tensors under plain names,
    gathered over TP (collective over the TP group: call on all its ranks)."""
    params = dict(gpt.named_parameters())
    out = {}
    for name, target in plain_names(gpt).items():
        t, dim = tensors[name], _split(params[name])
        if dim is None:
            out[target] = t
            continue
        parts = list(C.all_gather(t, tp_group)) if C.size(tp_group) > 1 else [t]
        if isinstance(target, tuple):
            halves = [p.chunk(2, dim=0) for p in parts]
            out[target[0]] = torch.cat([h[0] for h in halves])
            out[target[1]] = torch.cat([h[1] for h in halves])
        else:
            out[target] = torch.cat(parts, dim=dim)
    return out
