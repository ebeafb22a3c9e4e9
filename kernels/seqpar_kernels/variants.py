"""The six linear-attention variants, described once, and the checks on their inputs.

Every variant is the recurrence  S_t = A_t S_{t-1} + k_t u_t^T,  o_t = scale * S_t^T q_t
with a state S in R^{K x V} per head. A variant is fixed by two things:

* its decay (``gate``): none, a fixed per-head constant, a per-token scalar, or a per-token
  vector over K; always given as a log decay (<= 0);
* whether it uses the delta rule, A_t = exp(g_t) (I - beta_t k_t k_t^T), u_t = beta_t v_t.

The kind of shard transition T (identity/scalar, diagonal, dense K x K) follows from these and is
what the sequence-parallel layer exchanges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of states, decays and accumulators: float64 for float64 inputs (the exact
    reference runs), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Variant:
    name: str
    gate: str | None  # None | "head" ([H], fixed) | "token" ([B,T,H]) | "key" ([B,T,H,K])
    delta: bool

    @property
    def transition(self) -> str:
        """Shape of a shard's transition T_r: "scalar" (one number per head), "diagonal"
        (K numbers per head) or "dense" (K x K per head)."""
        if self.delta:
            return "dense"
        return "diagonal" if self.gate == "key" else "scalar"

    @property
    def needs_g(self) -> bool:
        return self.gate in ("token", "key")


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("linear_attn", None, False),
        Variant("lightning", "head", False),
        Variant("simple_gla", "token", False),
        Variant("gla", "key", False),
        Variant("delta_rule", None, True),
        Variant("gated_delta_rule", "token", True),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown linear-attention variant {name!r}; choose one of {sorted(VARIANTS)}"
        ) from None


def lightning_decay(num_heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Default per-head log decay of lightning/retention: log(1 - 2^(-5-h)), as in RetNet."""
    h = torch.arange(num_heads, device=device, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(dtype)


class InputError(ValueError):
    """Bad arguments to a kernel; the message says what is wrong and how to fix it."""


def _fail(variant: str, msg: str):
    raise InputError(f"{variant}: {msg}")


def check_values_enabled(t: torch.Tensor) -> bool:
    """Value checks (e.g. positive log-gates) need a host sync on a GPU; they always run on the CPU
    and on a GPU only when SEQPAR_CHECK_VALUES=1, so they never stall the hot path by default."""
    import os

    return t.device.type == "cpu" or os.environ.get("SEQPAR_CHECK_VALUES", "0") == "1"


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int, batch: int, where: str = "") -> None:
    """cu_seqlens: 1-D integer tensor [0, l1, l1+l2, ..., T], strictly increasing, batch size 1."""
    prefix = f"{where}: " if where else ""
    if batch != 1:
        raise InputError(f"{prefix}cu_seqlens packs documents along T and needs batch size 1, got B={batch}; "
                         "concatenate the batch into one row first")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise InputError(f"{prefix}cu_seqlens must be a 1-D int32/int64 tensor, got shape "
                         f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    c = cu_seqlens.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != total_len:
        raise InputError(f"{prefix}cu_seqlens must start at 0 and end at the sequence length {total_len}, got {c}")
    if any(b <= a for a, b in zip(c, c[1:])):
        raise InputError(f"{prefix}cu_seqlens must be strictly increasing (no empty documents), got {c}")


def normalize_inputs(variant: Variant, q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Check every argument of a kernel call and bring the decay into one form.

    Returns (g, scale) where g is None (no decay), a [B,T,H] log decay or a [B,T,H,K] log decay,
    whatever form the caller used (a lightning [H] decay is broadcast to [B,T,H]).
    Raises InputError before any work is done.
    """
    name = variant.name
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail(name, f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        _fail(name, f"q and k must have the same shape [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.shape[:3] != (B, T, H):
        _fail(name, f"v must be [B, T, H, V] = [{B}, {T}, {H}, V] like q; got {tuple(v.shape)}")
    V = v.shape[-1]
    if not (q.dtype == k.dtype == v.dtype):
        _fail(name, f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        _fail(name, f"q, k, v must be floating point; got {q.dtype}")
    if not (q.device == k.device == v.device):
        _fail(name, "q, k, v must be on the same device")

    if variant.gate is None and g is not None:
        _fail(name, "takes no gate g (it has no decay); drop g or pick a gated variant such as simple_gla")
    if not variant.delta and beta is not None:
        _fail(name, "takes no beta (only delta_rule and gated_delta_rule do)")
    if variant.delta and beta is None:
        _fail(name, "needs beta, the [B, T, H] write strength of the delta rule")
    if variant.needs_g and g is None:
        want = "[B, T, H]" if variant.gate == "token" else "[B, T, H, K]"
        _fail(name, f"needs the log-decay gate g of shape {want}")

    if variant.gate == "head":
        if g is None:
            g = lightning_decay(H, device=q.device, dtype=wide_dtype(q.dtype))
        if g.shape != (H,):
            _fail(name, f"g must be the per-head log decay of shape [H] = [{H}]; got {tuple(g.shape)}")
        g = g.to(device=q.device).view(1, 1, H).expand(B, T, H)
    elif variant.gate == "token":
        if g.shape != (B, T, H):
            _fail(name, f"g must be [B, T, H] = [{B}, {T}, {H}] (one log decay per token and head); "
                        f"got {tuple(g.shape)}")
    elif variant.gate == "key":
        if g.shape != (B, T, H, K):
            _fail(name, f"g must be [B, T, H, K] = [{B}, {T}, {H}, {K}] (one log decay per key channel); "
                        f"got {tuple(g.shape)}")
    if g is not None:
        if not g.is_floating_point():
            _fail(name, f"g must be floating point, got {g.dtype}")
        if check_values_enabled(g) and bool((g > 0).any()):
            _fail(name, "g holds log decays and must be <= 0 everywhere (a positive value makes the state "
                        "grow without bound); pass e.g. F.logsigmoid(x) or -softplus(x)")
    if beta is not None:
        if beta.shape != (B, T, H):
            _fail(name, f"beta must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(beta.shape)}")
        if not beta.is_floating_point():
            _fail(name, f"beta must be floating point, got {beta.dtype}")

    n_states = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, T, B, where=name)
        n_states = cu_seqlens.numel() - 1
    if initial_state is not None:
        if initial_state.shape != (n_states, H, K, V):
            what = "number of documents" if cu_seqlens is not None else "batch size"
            _fail(name, f"initial_state must be [N, H, K, V] = [{n_states}, {H}, {K}, {V}] (N = {what}); "
                        f"got {tuple(initial_state.shape)}")
        if not initial_state.is_floating_point():
            _fail(name, f"initial_state must be floating point, got {initial_state.dtype}")
    if scale is None:
        scale = 1.0 / math.sqrt(K)
    return g, float(scale)
