"""Collectives as autograd functions. Convention: the loss is the sum of every rank's local loss,
so a gathered (replicated) result's gradient is summed over ranks on its way back."""
from __future__ import annotations

import torch

from . import collectives as C


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return C.all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return C.reduce_scatter_sum(grad, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return C.all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return C.all_reduce_sum(grad, ctx.group), None


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """[P, *x.shape]; backward: reduce-scatter (sum) of the gradient."""
    return _AllGather.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks; backward: sum of the gradients over ranks."""
    return _AllReduceSum.apply(x, group)
