"""seqpar's token mixers as a megatron-core layer spec.

The spec is Megatron's own local GPT layer (RMSNorm, SwiGLU MLP, residuals, all from megatron-core)
with `self_attention` replaced by `SeqparMixer`, which builds, for its layer number, the block's
mixer from the pattern: a linear-attention variant or softmax attention (seqpar.layers), with

* heads split over TP through Megatron's Column/RowParallelLinear (the same layer code as the plain
  model, given Megatron projections), per-head parameters tagged as TP-split;
* Megatron's context-parallel group as the SP group (layout "zigzag" = get_batch_on_this_cp_rank);
* Megatron's attention call: forward(hidden_states [s_local, b, h], attention_mask, ...,
  packed_seq_params, ...) -> (output, None); packed_seq_params.cu_seqlens_q are taken as the global
  document boundaries of the packed row (batch 1).

Megatron-LM:  --spec seqpar.megatron.spec layer_spec  (with --transformer-impl local,
--normalization RMSNorm, --swiglu, --disable-bias-linear, --position-embedding-type none), and the
seqpar options (pattern, linear_variant, conv_size, rope_base, layout, method, ...) from the YAML
file named by the environment variable SEQPAR_CONFIG (its `model:` and `parallel:` sections), or
the defaults below. In code: `seqpar_layer_spec(options)`.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import init_method_normal

from seqpar.comm import collectives as C
from seqpar.layers import Projections
from seqpar.models import ModelConfig, make_mixer
from seqpar.parallel import ParallelContext

# seqpar options that megatron's TransformerConfig does not carry, and their defaults here
MODEL_OPTIONS = {"pattern": "LLLS", "linear_variant": "gated_delta_rule", "conv_size": 4, "rope_base": 10000.0}
PARALLEL_OPTIONS = {"layout": "zigzag", "linear_method": "lasp2", "softmax_method": "allgather", "zeco_slices": 4,
                    "backend": "auto", "validate": True}
ENV_CONFIG = "SEQPAR_CONFIG"


def resolve_options(options: dict | None = None) -> dict:
    """The spec's options, else the SEQPAR_CONFIG file's `model:` / `parallel:` sections, else defaults."""
    merged = {**MODEL_OPTIONS, **PARALLEL_OPTIONS}
    path = os.environ.get(ENV_CONFIG)
    if path:
        import yaml

        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        for section in ("model", "parallel"):
            merged.update({k: v for k, v in (doc.get(section) or {}).items() if k in merged})
        if "method" in (doc.get("parallel") or {}):
            merged["linear_method"] = doc["parallel"]["method"]
    unknown = sorted(set(options or {}) - set(merged))
    if unknown:
        raise ValueError(f"unknown seqpar spec options {unknown}; known: {sorted(merged)}")
    merged.update(options or {})
    return merged


def model_config_from(config, options: dict, vocab_size: int = 1) -> ModelConfig:
    """The seqpar ModelConfig that a Megatron TransformerConfig plus the seqpar options describe."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=config.hidden_size, num_layers=config.num_layers,
                       num_heads=config.num_attention_heads,
                       num_kv_heads=config.num_query_groups or config.num_attention_heads,
                       head_dim=config.kv_channels, ffn_hidden_size=config.ffn_hidden_size,
                       pattern=options["pattern"], linear_variant=options["linear_variant"],
                       conv_size=options["conv_size"], rope_base=options["rope_base"],
                       init_std=config.init_method_std, norm_eps=config.layernorm_epsilon)


class _Column(ColumnParallelLinear):
    """Column-parallel projection returning only its output (no bias), like nn.Linear."""

    def forward(self, x):
        return super().forward(x)[0]


class _Row(RowParallelLinear):
    def forward(self, x):
        return super().forward(x)[0]


def megatron_projections(config, tp_group) -> Projections:
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()

    def shard(p):  # per-head parameters: dtype and device as Megatron's own, tagged TP-split along dim 0
        p.data = p.data.to(device=device, dtype=config.params_dtype)
        set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        return p

    def column(i, o, std):
        return _Column(i, o, config=config, init_method=init_method_normal(std), bias=False, gather_output=False,
                       skip_bias_add=True, tp_group=tp_group)

    def row(i, o, std):
        return _Row(i, o, config=config, init_method=init_method_normal(std), bias=False, input_is_parallel=True,
                    skip_bias_add=True, tp_group=tp_group)

    return Projections(column=column, row=row, shard=shard, tp_size=C.size(tp_group), tp_rank=C.rank(tp_group))


class SeqparMixer(MegatronModule):
    """Megatron's `self_attention` slot filled by the seqpar mixer of this layer."""

    def __init__(self, config, layer_number: int, pg_collection: ProcessGroupCollection | None = None,
                 seqpar: dict | None = None, **_megatron_extras):  # cp_comm_type, pp_layer_offset, name, ...
        super().__init__(config=config)
        if config.sequence_parallel:
            raise ValueError("seqpar mixers need Megatron's TP sequence_parallel off (they split the sequence "
                             "over the context-parallel group instead); drop --sequence-parallel")
        options = resolve_options(seqpar)
        model_config = model_config_from(config, options)
        self.kind = model_config.layer_kinds()[layer_number - 1]
        pg = pg_collection or ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.parallel = ParallelContext(sp_group=pg.cp, tp_group=pg.tp, layout=options["layout"],
                                        linear_method=options["linear_method"],
                                        softmax_method=options["softmax_method"],
                                        zeco_slices=options["zeco_slices"], backend=options["backend"],
                                        validate=options["validate"])
        self.mixer = make_mixer(self.kind, model_config, self.parallel, megatron_projections(config, pg.tp))

    def forward(self, hidden_states, attention_mask=None, *, packed_seq_params=None, **_unused):
        # attention_mask is ignored: every mixer is causal; rotary_pos_emb is ignored: the softmax mixer
        # applies RoPE at the tokens' global positions itself
        cu = None
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            cu = packed_seq_params.cu_seqlens_q
        out = self.mixer(hidden_states.transpose(0, 1), cu)
        return out.transpose(0, 1).contiguous(), None


def seqpar_layer_spec(options: dict | None = None) -> ModuleSpec:
    """Megatron's local GPT layer (RMSNorm, SwiGLU MLP) with seqpar's mixer as self_attention."""
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    mixer = ModuleSpec(module=SeqparMixer, params={"seqpar": dict(options)} if options else {})
    # no key remapping: that map renames norms as fused parts of Megatron's own attention projections
    submodules = dataclasses.replace(local.submodules, self_attention=mixer, sharded_state_dict_keys_map={})
    return ModuleSpec(module=local.module, submodules=submodules)


# for Megatron-LM: --spec seqpar.megatron.spec layer_spec
layer_spec = seqpar_layer_spec()
