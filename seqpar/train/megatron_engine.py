"""The Megatron route (train.engine: megatron): megatron-core's GPTModel with seqpar's layer spec
(seqpar.megatron), Megatron's groups (SP = context parallel, plus tensor and pipeline parallel), its
DDP, optimizer and pipeline schedule. megatron-core's schedules run on CUDA only. seqpar train writes
no checkpoints on this route (Megatron-LM's own do, with seqpar's spec plugged in).

The loss convention is the native engine's: the sum of the labelled tokens' losses over the global
count. Megatron does exactly that with `calculate_per_token_loss`: each micro-batch reports its loss
sum and its number of labelled tokens, DDP sums the gradients over data x context ranks and
finalize_model_grads divides them by the total count. The initial weights are the plain HybridLM's
under the same seed (converted), so both engines start from the same model.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from .data import IGNORE


class MegatronEngine:
    name = "megatron"

    def __init__(self, config, device: torch.device):
        if device.type != "cuda":
            raise RuntimeError("train.engine: megatron needs GPUs (megatron-core's pipeline schedules run on CUDA); "
                               "use train.engine: native on CPUs")
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from seqpar.megatron.convert import load_plain_state
        from seqpar.megatron.model import (build_gpt_model, initialize_model_parallel, parallel_context,
                                           recompute_options, transformer_config)
        from seqpar.megatron.train_step import wrap_for_training
        from seqpar.models import HybridLM

        p, t, m = config.parallel, config.train, config.model
        self.config = config
        initialize_model_parallel(m, tp=p.tp, pp=p.pp, cp=p.sp, seq_len=t.seq_len, layout=p.layout)
        model_parallel_cuda_manual_seed(t.seed)
        options = dict(layout=p.layout, linear_method=p.method, softmax_method=p.softmax_method,
                       zeco_slices=p.zeco_slices, backend=p.backend)
        self.parallel = parallel_context(**options)
        dtype = torch.float32 if t.precision == "fp32" else torch.bfloat16  # Megatron's mixed precision
        tconfig = transformer_config(m, tp=p.tp, pp=p.pp, cp=p.sp, dtype=dtype, calculate_per_token_loss=True,
                                     **recompute_options(t.checkpointing))
        gpt = build_gpt_model(m, tconfig, **options)
        torch.manual_seed(t.seed)
        load_plain_state(gpt, HybridLM(m).state_dict(), self.parallel.tp_group)  # the native engine's weights
        self.module = gpt.to(device)
        self.ddp, self.optimizer = wrap_for_training(self.module, tconfig, lr=t.lr, weight_decay=t.weight_decay,
                                                     clip_grad=t.grad_clip)

    def run_step(self, batches, lr: float) -> tuple[torch.Tensor, float]:
        """Forward, backward and update over this replica's micro-batches (full sequences). Returns this
        rank's [loss sum, correct, labelled tokens] (zeros off the last pipeline stage) and the gradient norm."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        p, t = self.config.parallel, self.config.train
        device = torch.device("cuda", torch.cuda.current_device())
        local = [b.local(self.parallel.sp_group, p.layout, device) for b in batches]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, tp_group=self.parallel.tp_group), data_iterator=iter(local),
            model=self.ddp, num_microbatches=len(local), seq_length=t.seq_len, micro_batch_size=t.micro_batch_size,
            forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for r in reports:  # only the last pipeline stage has reports
            sums += r["sums"].double()
        return sums, float(grad_norm) if grad_norm is not None else float("nan")



def _forward_step(data_iterator, model, *, tp_group):
    """Megatron forward_step_func: logits of this stage, then the masked vocab-parallel cross-entropy."""
    from megatron.core import parallel_state

    from seqpar.megatron.train_step import packed_seq_params, vocab_parallel_cross_entropy

    batch = next(data_iterator)
    out = model(batch.tokens, None, None, packed_seq_params=packed_seq_params(batch.cu_seqlens, batch.tokens.device))
    if not parallel_state.is_pipeline_last_stage():
        return out, None
    mask = batch.labels != IGNORE
    labels = torch.where(mask, batch.labels, 0)
    per_token = vocab_parallel_cross_entropy(out, labels, tp_group) * mask

    with torch.no_grad():  # top-1 correct: the target logit is the largest over the whole vocabulary
        logits = out.detach().float()
        top = logits.max(-1).values
        dist.all_reduce(top, dist.ReduceOp.MAX, group=tp_group)
        V, r = logits.shape[-1], dist.get_rank(tp_group)
        mine = (labels >= r * V) & (labels < (r + 1) * V)
        target = torch.where(mine, logits.gather(-1, (labels - r * V).clamp(0, V - 1)[..., None])[..., 0], 0.0)
        dist.all_reduce(target, group=tp_group)
        correct = ((target >= top) & mask).sum()

    def loss_func(per_token):
        total = per_token.float().sum()
        n = mask.sum().to(torch.int)
        return total, n, {"sums": torch.stack([total.detach().double(), correct.double(), n.double()])}

    return per_token, loss_func
