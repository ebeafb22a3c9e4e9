"""Does the Megatron build compute what the plain model computes? One check, used by the CPU test
(TP x CP on gloo) and the GPU check (TP, PP through Megatron's schedule, CP on NCCL).

The plain HybridLM runs the whole sequence on this process; the Megatron GPTModel gets the same
weights (convert.load_plain_state), this rank's tokens in the CP layout, and runs either directly
or through Megatron's pipeline schedule. The loss (sum of per-token cross-entropies over all
tokens) and every gradient this rank holds (summed over CP, gathered over TP, plain names) are
compared with the plain model's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from seqpar import sp
from seqpar.models import HybridLM, ModelConfig
from seqpar.parallel import ParallelContext
from seqpar_kernels.testing import rel_err

from .convert import load_plain_state, to_plain
from .model import build_gpt_model, transformer_config
from .train_step import packed_seq_params, raw_forward_backward, vocab_parallel_cross_entropy


def plain_reference(model: ModelConfig, ids, labels, cu, seed: int, alone: ParallelContext):
    """The plain model (seeded, float64) on the whole sequence: (model, loss, {name: grad})."""
    torch.manual_seed(seed)
    plain = HybridLM(model, alone).to(device=ids.device, dtype=torch.float64)
    logits = plain(ids, cu_seqlens=cu) @ plain.output_weight.T
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.numel()
    loss.backward()
    return plain, loss.detach(), {n: p.grad for n, p in plain.named_parameters()}


def check_parity(model: ModelConfig, ids, labels, cu=None, *, layout: str, alone: ParallelContext, seed: int = 0,
                 backend: str = "torch", schedule: bool = False, **config_overrides) -> dict:
    """Errors (relative, per tensor) of the Megatron build against the plain model; call on every
    rank after initialize_model_parallel. schedule: run through Megatron's forward-backward schedule
    (needs CUDA; required for PP > 1). config_overrides: TransformerConfig fields (e.g. recompute)."""
    plain, loss_ref, grads_ref = plain_reference(model, ids, labels, cu, seed, alone)
    tp_group, cp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_context_parallel_group()
    config = transformer_config(model, tp=tp_group.size(), pp=parallel_state.get_pipeline_model_parallel_world_size(),
                                cp=cp_group.size(), dtype=torch.float64, **config_overrides)
    gpt = build_gpt_model(model, config, layout=layout, backend=backend).to(device=ids.device, dtype=torch.float64)
    load_plain_state(gpt, plain.state_dict(), tp_group)
    batch = {"input_ids": sp.shard(ids, cp_group, layout), "labels": sp.shard(labels, cp_group, layout),
             "cu_seqlens": cu}
    loss = None
    if schedule:
        reports = raw_forward_backward(gpt, iter([batch]), num_microbatches=1, seq_len=ids.shape[1],
                                       micro_batch_size=ids.shape[0], tokens_per_loss=labels.numel())
        if parallel_state.is_pipeline_last_stage():
            loss = reports[0]["lm loss"][0] / labels.numel()
    else:
        logits = gpt(batch["input_ids"], None, None, packed_seq_params=packed_seq_params(cu, ids.device))
        loss = vocab_parallel_cross_entropy(logits, batch["labels"], tp_group).sum() / labels.numel()
        loss.backward()
    errors = {}
    if loss is not None:
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        errors["loss"] = rel_err(total, loss_ref)
    grads = {}
    for name, p in gpt.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=cp_group)  # what Megatron's DDP does over DP x CP (DP = 1 here)
        grads[name] = g
    for name, g in to_plain(gpt, grads, tp_group).items():
        errors[name] = rel_err(g, grads_ref[name])
    return errors
