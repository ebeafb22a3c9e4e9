"""The Triton chunkwise kernels: `gated` (linear_attn, lightning, simple_gla, gla) and `delta`
(delta_rule, gated_delta_rule). Each family module provides the same four functions

    forward(call, h0) -> (o, ht)            backward(call, h0, do, dht) -> Grads
    final_state(call, h0) -> ht             state_grad(call, do, dht) -> dh0

and the gated module also takes explicit.py's late initial state / final-state gradient
(forward(call, h0, h0_late), backward(call, h0, do, dht, dht_late)), called after its state pass.

TritonKernel picks the family by the call (beta present: delta rule); chunk_triton wraps it in
autograd and is what backend "triton" runs. On the CPU they run only under TRITON_INTERPRET=1,
which must be set before this package is first imported.
"""
from __future__ import annotations

import importlib

import torch

from ..explicit import Call, ExplicitKernel, Grads, plus_late
from . import gated


def family(call: Call):
    """The module that runs this call's family (the delta module is imported on first use)."""
    if call.beta is None:
        return gated
    try:
        return importlib.import_module(".delta", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.delta":
            raise
        raise RuntimeError("the Triton delta-rule kernels are not part of this build of seqpar_kernels; "
                           "use backend='torch' for delta_rule / gated_delta_rule") from None


class TritonKernel(ExplicitKernel):
    def forward(self, call: Call, h0, h0_late=None):
        if call.beta is None:  # the gated kernels resolve h0_late after their state pass
            return gated.forward(call, h0, h0_late)
        return family(call).forward(call, plus_late(h0, h0_late))

    def backward(self, call: Call, h0, do, dht, dht_late=None) -> Grads:
        if call.beta is None:
            return gated.backward(call, h0, do, dht, dht_late)
        return family(call).backward(call, h0, do, plus_late(dht, dht_late))

    def final_state(self, call: Call, h0):
        return family(call).final_state(call, h0)

    def state_grad(self, call: Call, do, dht):
        return family(call).state_grad(call, do, dht)


_KERNEL = TritonKernel()


class _ChunkTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu_seqlens, output_final_state):
        call = Call(q, k, v, g, beta, scale, cu_seqlens)
        o, ht = _KERNEL.forward(call, initial_state)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.cu_seqlens = scale, cu_seqlens
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        call = Call(q, k, v, g, beta, ctx.scale, ctx.cu_seqlens)
        gr = _KERNEL.backward(call, initial_state, do, dht)
        need = ctx.needs_input_grad
        dh0 = gr.dh0.to(initial_state.dtype) if need[5] else None
        return (gr.dq, gr.dk, gr.dv, gr.dg if need[3] else None, gr.dbeta if need[4] else None, dh0,
                None, None, None)


def chunk_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Backend "triton": same arguments and results as chunk_torch.chunk_reference (inputs checked)."""
    return _ChunkTriton.apply(q, k, v, g, beta, initial_state, scale, cu_seqlens, output_final_state)


__all__ = ["TritonKernel", "chunk_triton", "family"]
