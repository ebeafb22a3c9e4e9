"""Backend "fla": fla-core's chunk kernels (optional; pip install 'seqpar[bench]').

Our variants map onto fla 0.6.0's functions: linear_attn and lightning run fla's simple_gla
(g=None, or lightning's per-head decay expanded to [B,T,H]), simple_gla / gla / delta_rule /
gated_delta_rule their namesakes. Used as a comparison anchor and an independent oracle.
On Hopper with Triton 3.4-3.7.0, fla refuses its gated backward (its issue 640).
"""
from __future__ import annotations

from .explicit import TorchKernel


def chunk_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Same arguments and results as chunk_torch.chunk_reference (inputs already checked)."""
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)
    if beta is not None:
        if g is None:
            from fla.ops.delta_rule import chunk_delta_rule

            return chunk_delta_rule(q, k, v, beta, **kw)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    if g is not None and g.dim() == 4:
        from fla.ops.gla import chunk_gla

        return chunk_gla(q, k, v, g, **kw)
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g=g.contiguous() if g is not None else None, **kw)


class FlaKernel(TorchKernel):
    """fla's kernels as explicit calls; the backward recomputes the forward under autograd."""

    impl = staticmethod(chunk_fla)
