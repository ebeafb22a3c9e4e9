"""Single-device chunkwise linear-attention kernels (no torch.distributed here).

Every variant has the same call, following fla's convention:

    o, final_state = chunk_<variant>(q, k, v, *, g=None, beta=None, scale=None,
                                     initial_state=None, output_final_state=False,
                                     cu_seqlens=None, backend="auto")

q, k: [B, T, H, K]; v: [B, T, H, V]; g: log decay (<= 0), [H] for lightning (default: RetNet's
decays), [B, T, H] for simple_gla / gated_delta_rule, [B, T, H, K] for gla; beta: [B, T, H] for
the delta rules. States are [B or N_docs, H, K, V] in fp32 (float64 for float64 inputs).
cu_seqlens packs documents into one row (B = 1) and resets the state at each boundary.
Autograd returns a gradient for initial_state and accepts one for final_state.

naive_<variant> has the same call and runs the token-by-token recurrence: the ground truth.

The import name is ``seqpar_kernels`` (the folder is ``kernels/``) so that it can never shadow
the unrelated PyPI distribution called ``kernels``.
"""
from __future__ import annotations

from . import backends
from .variants import VARIANTS, InputError, Variant, get_variant, lightning_decay, normalize_inputs, wide_dtype

__all__ = ["VARIANTS", "Variant", "InputError", "get_variant", "lightning_decay", "wide_dtype", "chunk", "naive"]


def chunk(variant, q, k, v, *, g=None, beta=None, scale=None, initial_state=None,
          output_final_state=False, cu_seqlens=None, backend="auto"):
    """Run `variant` on one device with the chosen backend ("auto": Triton on CUDA, else torch)."""
    var = get_variant(variant)
    g, scale = normalize_inputs(var, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    impl = backends.implementation(backends.resolve(backend, q.device))
    return impl(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def naive(variant, q, k, v, *, g=None, beta=None, scale=None, initial_state=None,
          output_final_state=False, cu_seqlens=None):
    """The token-by-token recurrence (ground truth; use float64 inputs for exact comparisons)."""
    return chunk(variant, q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend="naive")


def _bind(fn, variant: str, prefix: str):
    def bound(q, k, v, *, g=None, beta=None, scale=None, initial_state=None,
              output_final_state=False, cu_seqlens=None, **kw):
        return fn(variant, q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kw)

    bound.__name__ = bound.__qualname__ = f"{prefix}_{variant}"
    bound.__doc__ = f"{fn.__doc__}\n\nVariant: {variant}. See the module docstring for the arguments."
    return bound


chunk_linear_attn = _bind(chunk, "linear_attn", "chunk")
chunk_lightning = _bind(chunk, "lightning", "chunk")
chunk_simple_gla = _bind(chunk, "simple_gla", "chunk")
chunk_gla = _bind(chunk, "gla", "chunk")
chunk_delta_rule = _bind(chunk, "delta_rule", "chunk")
chunk_gated_delta_rule = _bind(chunk, "gated_delta_rule", "chunk")

naive_linear_attn = _bind(naive, "linear_attn", "naive")
naive_lightning = _bind(naive, "lightning", "naive")
naive_simple_gla = _bind(naive, "simple_gla", "naive")
naive_gla = _bind(naive, "gla", "naive")
naive_delta_rule = _bind(naive, "delta_rule", "naive")
naive_gated_delta_rule = _bind(naive, "gated_delta_rule", "naive")

__all__ += [f"{p}_{v}" for p in ("chunk", "naive") for v in VARIANTS]
