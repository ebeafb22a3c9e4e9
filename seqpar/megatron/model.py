"""The hybrid model as a megatron-core GPTModel: TransformerConfig from a seqpar ModelConfig,
Megatron's parallel groups (checked against the model first), the model with seqpar's layer spec,
and the ParallelContext that names Megatron's groups for seqpar code (e.g. the trainer).

    initialize_model_parallel(model_config, tp=2, pp=1, cp=2, seq_len=4096)     # on every rank
    gpt = build_gpt_model(model_config, transformer_config(model_config, tp=2, cp=2))
    loss = gpt(input_ids_local, None, None, labels=labels_local)   # [b, s_local], vocab-parallel CE
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from seqpar.models import ModelConfig, check_parallel
from seqpar.parallel import ParallelContext

from .spec import PARALLEL_OPTIONS, seqpar_layer_spec


def transformer_config(model: ModelConfig, *, tp: int = 1, pp: int = 1, cp: int = 1, dtype=torch.float32,
                       **overrides) -> TransformerConfig:
    """Megatron's config for the same network: RMSNorm, SwiGLU, no biases, no dropout."""
    check_parallel(model, tp=tp, pp=pp, sp=cp)
    on_gpu = torch.cuda.is_available()
    fields = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.num_heads,
        num_query_groups=model.num_kv_heads, kv_channels=model.head_dim, ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=model.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=model.init_std, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def recompute_options(checkpointing: str) -> dict:
    """TransformerConfig fields for seqpar's train.checkpointing: "full" recomputes every layer in
    backward (Megatron's full granularity, one layer per checkpoint), as seqpar's own blocks do."""
    if checkpointing == "none":
        return {}
    if checkpointing == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    raise ValueError(f"train.checkpointing: {checkpointing} has no Megatron counterpart here; use none or full")


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron-LM's padding of the vocabulary (--make-vocab-size-divisible-by, times TP)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def initialize_model_parallel(model: ModelConfig, *, tp: int = 1, pp: int = 1, cp: int = 1,
                              seq_len: int | None = None, layout: str = "zigzag", **megatron_kwargs) -> None:
    """Check the layout against the model (the same clear error on every rank, before any group
    exists), then create Megatron's groups. CP is seqpar's SP."""
    world = dist.get_world_size()
    check_parallel(model, tp=tp, pp=pp, sp=cp, world_size=world, seq_len=seq_len, layout=layout)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp, **megatron_kwargs)


def parallel_context(**options) -> ParallelContext:
    """Megatron's groups as a ParallelContext: SP = context parallel; options as PARALLEL_OPTIONS."""
    opts = {**PARALLEL_OPTIONS, **options}
    return ParallelContext(sp_group=parallel_state.get_context_parallel_group(),
                           tp_group=parallel_state.get_tensor_model_parallel_group(),
                           pp_group=parallel_state.get_pipeline_model_parallel_group(),
                           dp_group=parallel_state.get_data_parallel_group(), **opts)


def seqpar_options(model: ModelConfig, **parallel_options) -> dict:
    """The spec options (what TransformerConfig does not carry) of a seqpar model."""
    unknown = sorted(set(parallel_options) - set(PARALLEL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown parallel options {unknown}; known: {sorted(PARALLEL_OPTIONS)}")
    return dict(pattern=model.pattern, linear_variant=model.linear_variant, conv_size=model.conv_size,
                rope_base=model.rope_base, **parallel_options)


def build_gpt_model(model: ModelConfig, config: TransformerConfig, *, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None, max_sequence_length: int = 1 << 20,
                    **parallel_options) -> GPTModel:
    """This pipeline stage of the hybrid model as a megatron-core GPTModel (output logits
    vocab-parallel, positions handled inside the softmax mixers)."""
    tp = config.tensor_model_parallel_size
    if model.vocab_size % tp:
        raise ValueError(f"vocab_size {model.vocab_size} is not divisible by TP = {tp}: every TP rank holds an equal "
                         f"slice of the vocabulary; pad it (Megatron-LM pads to a multiple of 128 x TP = "
                         f"{padded_vocab_size(model.vocab_size, tp)}) and keep the padded size in the model config")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    # the block spelled out, so the final norm is torch's RMSNorm like every block norm (a bare layer spec
    # would get Megatron's default, TENorm or Apex's LayerNorm-only FusedLayerNorm where installed)
    layers = get_num_layers_to_build(config, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
    block = TransformerBlockSubmodules(layer_specs=[seqpar_layer_spec(seqpar_options(model, **parallel_options))] * layers,
                                       layer_norm=WrappedTorchNorm)
    return GPTModel(config=config, transformer_layer_spec=block,
                    vocab_size=model.vocab_size,
                    max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
                    parallel_output=True, share_embeddings_and_output_weights=model.tie_embeddings,
                    position_embedding_type="none", vp_stage=vp_stage)
