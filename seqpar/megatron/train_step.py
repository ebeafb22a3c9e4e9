"""A plain megatron-core training step for the hybrid model: Megatron's DDP (gradients reduced
over data x context parallel), its optimizer and its pipeline schedule (1F1B when PP > 1).
megatron-core's schedules need CUDA, so this runs on GPUs (seqpar.megatron.gpu_check runs it).

    gpt = build_gpt_model(model_config, config)
    model, optimizer = wrap_for_training(gpt, config, lr=3e-4)
    stats = train_step(model, optimizer, batches, num_microbatches=2, seq_len=T, micro_batch_size=1)

A batch is a dict with this rank's `input_ids` and `labels` [b, T / CP] in the context-parallel
layout (seqpar.sp.shard, or Megatron-LM's get_batch_on_this_cp_rank for "zigzag") and optionally
the global `cu_seqlens` of packed documents.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def packed_seq_params(cu_seqlens, device) -> PackedSeqParams | None:
    if cu_seqlens is None:
        return None
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)


def vocab_parallel_cross_entropy(logits, labels, tp_group=None):
    """Per-token cross-entropy of TP-split logits [b, s, V / TP] in their own dtype (fp32 for half
    precision); Megatron's own casts to fp32, which hides float64 parity. The max and the sums are
    reduced over TP with Megatron's identity backward, so each rank gets its slice's gradient."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
    V = logits.shape[-1]
    m = logits.detach().max(-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    z = reduce_from_tensor_model_parallel_region((logits - m).exp().sum(-1), tp_group)
    local = labels - dist.get_rank(tp_group) * V
    mine = (local >= 0) & (local < V)
    picked = logits.gather(-1, local.clamp(0, V - 1)[..., None])[..., 0] * mine
    return z.log() + m[..., 0] - reduce_from_tensor_model_parallel_region(picked, tp_group)


def lm_forward_step(data_iterator, model, *, tokens_per_loss=None, exact=False):
    """forward_step_func for Megatron's schedules. The loss of a micro-batch is the sum of its
    per-token cross-entropies over `tokens_per_loss` (default: this rank's tokens, so that DDP's
    mean over DP x CP ranks gives the mean over all tokens). exact: cross-entropy in the logits'
    dtype (vocab_parallel_cross_entropy) instead of Megatron's fused fp32 one."""
    batch = next(data_iterator)
    labels = batch["labels"]
    packed = packed_seq_params(batch.get("cu_seqlens"), labels.device)
    if exact:
        out = model(batch["input_ids"], None, None, packed_seq_params=packed)  # logits on the last stage
        per_token = vocab_parallel_cross_entropy(out, labels) if parallel_state.is_pipeline_last_stage() else out
    else:
        per_token = model(batch["input_ids"], None, None, labels=labels, packed_seq_params=packed)

    def loss_func(output):
        total = output.float().sum() if output.dtype != torch.float64 else output.sum()
        n = torch.tensor(tokens_per_loss or output.numel(), device=output.device, dtype=torch.int)  # Megatron sums ints
        return total, n, {"lm loss": torch.stack([total.detach(), n.to(total.dtype)])}

    return per_token, loss_func


def wrap_for_training(gpt, config, *, lr: float = 3e-4, weight_decay: float = 0.1, clip_grad: float = 1.0):
    """Megatron's DDP around the model (gradients in fp32 buffers, reduced over DP x CP after the
    schedule) and its Adam optimizer."""
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), module=gpt)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, clip_grad=clip_grad, bf16=config.bf16,
        params_dtype=config.params_dtype, use_distributed_optimizer=False), [model])
    return model, optimizer


def train_step(model, optimizer, batches, *, num_microbatches: int, seq_len: int, micro_batch_size: int) -> dict:
    """One optimizer step over `num_microbatches` micro-batches from the iterator `batches`
    (seq_len: the global sequence length). Returns the mean loss over all tokens (on the last
    pipeline stage; None elsewhere), the gradient norm and whether the update was applied."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=lm_forward_step, data_iterator=batches, model=model, num_microbatches=num_microbatches,
        seq_length=seq_len, micro_batch_size=micro_batch_size, forward_only=False)
    applied, grad_norm, _ = optimizer.step()
    loss = None
    if parallel_state.is_pipeline_last_stage():
        sums = torch.stack([r["lm loss"] for r in reports]).sum(0)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        loss = (sums[0] / sums[1]).item()
    return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else None, "applied": bool(applied)}


def raw_forward_backward(gpt, batches, *, num_microbatches: int, seq_len: int, micro_batch_size: int,
                         tokens_per_loss: int):
    """Forward and backward through Megatron's schedule on the bare model (no DDP, no optimizer),
    cross-entropy in the model's dtype: parameter .grad holds this rank's share (the parity checks)."""
    return get_forward_backward_func()(
        forward_step_func=partial(lm_forward_step, tokens_per_loss=tokens_per_loss, exact=True), data_iterator=batches,
        model=gpt, num_microbatches=num_microbatches, seq_length=seq_len, micro_batch_size=micro_batch_size,
        forward_only=False)
