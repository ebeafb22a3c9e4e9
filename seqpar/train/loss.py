"""Cross-entropy of the output head without ever holding [T, vocab] logits.

Only the tokens that carry a label are scored. They are taken `chunk` at a time: logits [chunk,
vocab / tp] in fp32, the log-sum-exp and the target logit combined over the tensor-parallel group
(the vocabulary is split over it, as in Megatron's vocab-parallel output layer), and the gradients
of the hidden states and of the output weight computed right there, so the backward only scales
them. Peak extra memory: one chunk of logits plus a gradient the size of the weight.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .data import IGNORE


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, tp_group, vocab_start, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedCE._forward(ctx, hidden, weight, labels, chunk, tp_group, vocab_start, dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk, tp_group, vocab_start, dtype):
        H, V_local = hidden.shape[-1], weight.shape[0]
        h, y = hidden.reshape(-1, H), labels.reshape(-1)
        rows = (y != IGNORE).nonzero().squeeze(1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_grad else None
        acc = torch.promote_types(dtype, torch.float32)  # logits, softmax and sums in fp32 at least
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        w = weight.to(dtype)
        tp = tp_group is not None and dist.get_world_size(tp_group) > 1
        for s in range(0, rows.numel(), chunk):
            idx = rows[s:s + chunk]
            hc, yc = h.index_select(0, idx).to(dtype), y.index_select(0, idx) - vocab_start
            logits = (hc @ w.t()).to(acc)  # [c, V_local]
            mine = (yc >= 0) & (yc < V_local)
            target = torch.where(mine, logits.gather(1, yc.clamp(0, V_local - 1)[:, None])[:, 0], 0.0)
            top = logits.max(dim=1).values
            if tp:
                dist.all_reduce(top, dist.ReduceOp.MAX, group=tp_group)
            sumexp = (logits - top[:, None]).exp().sum(dim=1)
            if tp:
                dist.all_reduce(sumexp, group=tp_group)
                dist.all_reduce(target, group=tp_group)
            lse = top + sumexp.log()
            loss += (lse - target).sum()
            correct += (target >= top).sum()
            if need_grad:
                p = (logits - lse[:, None]).exp()  # softmax over the whole vocabulary
                p[mine.nonzero().squeeze(1), yc[mine]] -= 1.0
                grad_h.index_copy_(0, idx, (p.to(dtype) @ w).to(h.dtype))
                grad_w += p.t() @ hc.to(acc)
        if need_grad and tp:  # every TP rank scored its vocabulary slice; dL/dh sums them
            dist.all_reduce(grad_h, group=tp_group)
        ctx.save_for_backward(grad_h.view_as(hidden) if need_grad else None,
                              grad_w.to(weight.dtype) if need_grad else None)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int = 4096,
                  tp_group=None, vocab_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token losses and number of correct top-1 predictions over the labelled tokens.

    hidden [..., H] (the final-norm output), weight [vocab / tp, H] (this rank's vocabulary rows,
    starting at global id vocab_start), labels [...] global ids or IGNORE. The gradient reaching
    `hidden` is complete (summed over the TP group). Divide the loss by the global number of labelled
    tokens to get the mean."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _ChunkedCE.apply(hidden, weight, labels, chunk, tp_group, vocab_start, dtype)
