"""The Triton chunkwise kernels: `gated` (linear_attn, lightning, simple_gla, gla) and `delta`
(delta_rule, gated_delta_rule). Each family module provides the same four functions

    forward(call, h0, h0_late=None) -> (o, ht)      backward(call, h0, do, dht, dht_late=None) -> Grads
    final_state(call, h0) -> ht                     state_grad(call, do, dht) -> dh0

with explicit.py's late initial state / final-state gradient resolved only after the work that does
not depend on it (the gated state pass; the delta rule's WY preparation), so that the SP exchange
overlaps that work.

TritonKernel picks the family by the call (beta present: delta rule); chunk_triton wraps it in
autograd and is what backend "triton" runs. On the CPU they run only under TRITON_INTERPRET=1,
which must be set before this package is first imported.
"""
from __future__ import annotations

import torch

from ..explicit import Call, ExplicitKernel, Grads, save_with_memo, saved_with_memo
from . import delta, gated


def family(call: Call):
    return gated if call.beta is None else delta


class TritonKernel(ExplicitKernel):
    def forward(self, call: Call, h0, h0_late=None):
        return family(call).forward(call, h0, h0_late)

    def backward(self, call: Call, h0, do, dht, dht_late=None) -> Grads:
        return family(call).backward(call, h0, do, dht, dht_late)

    def final_state(self, call: Call, h0):
        return family(call).final_state(call, h0)

    def state_grad(self, call: Call, do, dht):
        return family(call).state_grad(call, do, dht)

    def final_state_and_transition(self, call: Call, h0):
        if call.beta is None:  # the gated family's transitions come from its gates, not from a pass
            return super().final_state_and_transition(call, h0)
        return delta.final_state_and_transition(call, h0)


_KERNEL = TritonKernel()


class _ChunkTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu_seqlens, output_final_state):
        cu_host = tuple(cu_seqlens.tolist()) if cu_seqlens is not None else None  # once, for both passes
        # the memo carries what the forward keeps for the backward (gla: the intra-chunk matrix; the
        # delta rules: the WY inverse), so only where a backward can follow
        memo = {} if any(ctx.needs_input_grad) else None
        call = Call(q, k, v, g, beta, scale, cu_seqlens, memo=memo, cu_host=cu_host)
        o, ht = _KERNEL.forward(call, initial_state)
        save_with_memo(ctx, call.memo, q, k, v, g, beta, initial_state)
        ctx.scale, ctx.cu_seqlens, ctx.cu_host = scale, cu_seqlens, cu_host
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        (q, k, v, g, beta, initial_state), memo = saved_with_memo(ctx)
        call = Call(q, k, v, g, beta, ctx.scale, ctx.cu_seqlens, memo=memo, cu_host=ctx.cu_host)
        gr = _KERNEL.backward(call, initial_state, do, dht)
        need = ctx.needs_input_grad
        dh0 = gr.dh0.to(initial_state.dtype) if need[5] else None
        return (gr.dq, gr.dk, gr.dv, gr.dg if need[3] else None, gr.dbeta if need[4] else None, dh0,
                None, None, None)


def chunk_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Backend "triton": same arguments and results as chunk_torch.chunk_reference (inputs checked)."""
    return _ChunkTriton.apply(q, k, v, g, beta, initial_state, scale, cu_seqlens, output_final_state)


__all__ = ["TritonKernel", "chunk_triton", "family"]
