"""Kernel forward and backward as explicit calls, without an autograd graph.

The sequence-parallel layer needs the pieces of a kernel call separately (a forward whose initial
state arrives later, a backward whose final-state gradient arrives later), so it drives a kernel
through this interface rather than through autograd. Every backend provides one:

    forward(call, h0, h0_late=None)            -> (o, ht)   ht: fp32 final state per sequence
    backward(call, h0, do, dht, dht_late=None) -> Grads     gradients of every input and of h0
    final_state(call, h0)                      -> ht        the state pass alone
    state_grad(call, do, dht)                  -> dh0       the initial-state gradient alone
    transition(call)                           -> [N, H, K, K]  dense transition (delta rules)
    final_state_and_transition(call, h0)       -> (ht, M)   both, from one pass where possible

`h0_late` / `dht_late` are functions returning a further initial state / final-state gradient
(added to h0 / dht) that is still being exchanged between ranks when the call starts: a kernel
that can do the work independent of it first (e.g. the state recurrence from zero) calls it only
then, so the exchange overlaps that work. The default resolves it at once.

`Call.memo` (a dict, or None) lets the entry points called on one Call share work: the SP layer
runs a state pass and then the kernel on the same Call, and the h0-independent part of the state
pass (the Triton kernels' segment-local states, the delta rules' WY preparation) is what the
kernel would compute again; a backend may keep it there for the next entry point. What a forward
leaves there for its backward (hand_over, take) goes through save_for_backward
(save_with_memo / saved_with_memo), so activation checkpointing and offloading treat it as they
treat every other saved activation.
Arguments are already checked and normalised (variants.normalize_inputs); h0 / dht may be None.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch

from .chunk_torch import chunk_reference
from .summaries import gated_final_state, gated_state_grad
from .variants import wide_dtype


@dataclass(frozen=True)
class Call:
    """A checked kernel call: g is None, [B,T,H] or [B,T,H,K]; beta None or [B,T,H]."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    beta: torch.Tensor | None
    scale: float
    cu_seqlens: torch.Tensor | None = None
    memo: dict | None = field(default=None, compare=False, repr=False)  # see the module docstring
    # cu_seqlens on the host, where the caller has it: the kernels need the boundaries on the host
    # and would otherwise copy them back from the device (a sync) in every entry point
    cu_host: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def n_states(self) -> int:
        return self.q.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def boundaries(self) -> tuple[int, ...]:
        """Token boundaries of the independent sequences along the flattened [B*T] axis, on the host:
        cu_seqlens for packed documents, else every batch row's ends."""
        if self.cu_seqlens is None:
            B, T = self.q.shape[:2]
            return tuple(b * T for b in range(B + 1))
        return self.cu_host if self.cu_host is not None else tuple(self.cu_seqlens.tolist())


@dataclass
class Grads:
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dg: torch.Tensor | None
    dbeta: torch.Tensor | None
    dh0: torch.Tensor


class ExplicitKernel(ABC):
    """A backend's forward and backward; state_grad and transition default to calls of those."""

    @abstractmethod
    def forward(self, call: Call, h0, h0_late=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(o, ht) with o in v's dtype and ht the fp32 final state of every sequence."""

    @abstractmethod
    def backward(self, call: Call, h0, do, dht, dht_late=None) -> Grads:
        """Gradients of every input and of h0, given do and (possibly None) dht."""

    def final_state(self, call: Call, h0) -> torch.Tensor:
        """The final state alone (a backend may skip the outputs)."""
        return self.forward(call, h0)[1]

    def state_grad(self, call: Call, do, dht):
        # the initial state enters linearly, so its gradient does not depend on its value
        return self.backward(call, None, do, dht).dh0

    def final_state_and_transition(self, call: Call, h0) -> tuple[torch.Tensor, torch.Tensor]:
        """(ht, M): the final state and the dense transition [N, H, K, K] of every sequence (delta
        rules). A backend whose state pass computes transitions anyway returns both from one pass."""
        return self.final_state(call, h0), self.transition(call)

    def transition(self, call: Call) -> torch.Tensor:
        """The product of the A_t of each sequence: the final state started from the identity
        with nothing written (v = 0). K columns instead of V; fp32 throughout."""
        N, H, K = call.n_states, call.q.shape[2], call.q.shape[3]
        eye = torch.eye(K, device=call.q.device, dtype=torch.float32).expand(N, H, K, K).contiguous()
        zeros = call.q.new_zeros(*call.q.shape)
        return self.final_state(replace(call, v=zeros), eye)


def plus_late(x, late):
    """x + late() where either may be missing (None, or late() returning None)."""
    extra = late() if late is not None else None
    if extra is None:
        return x
    return extra if x is None else x + extra


def reuse(memo: dict | None, key, tag, keep: bool, compute):
    """compute(), or what an earlier entry point on the same Call kept in its memo under `key` with
    the same `tag` (compared by identity, e.g. a backward's do); the entry is used up. keep: leave
    the result in the memo for the next entry point (a state pass keeps, the kernel uses)."""
    if memo is not None:
        kept = memo.pop(key, None)
        if kept is not None and kept[0] is tag:
            return kept[1]
    out = compute()
    if keep and memo is not None:
        memo[key] = (tag, out)
    return out


def take(memo: dict | None, key, tag=None):
    """What an earlier entry point kept in the memo under `key` (with `tag`), used up; else None."""
    return reuse(memo, key, tag, False, lambda: None)


def hand_over(memo: dict | None, key, x: torch.Tensor) -> None:
    """Leave x for the backward on the same Call (taken there with take(memo, key)); the autograd
    functions carry it through save_for_backward (save_with_memo)."""
    if memo is not None:
        memo[key] = (None, x)


def run_as_autograd(kernel, call: Call, do, h0=None, dht=None):
    """The kernel's forward and backward as the autograd function runs them: on one memo, so the
    backward takes what the forward kept (gla's intra-chunk matrix, the delta rules' WY inverse).
    kernel: anything with the entry points above. Returns (o, ht, Grads)."""
    call = replace(call, memo={})
    o, ht = kernel.forward(call, h0)
    return o, ht, kernel.backward(call, h0, do, dht)


def run_as_in_sp(kernel, call: Call, do, h0=None, dht=None, transition: bool = False):
    """One shard's forward and backward in the order the SP call issues them
    (seqpar.sp.linear_attention), on one memo shared from forward to backward as autograd shares
    it: the summary (the final state from zero, with the dense transition where a later shard needs
    it), the kernel from the incoming state h0, the summary's gradient pass from zero, the kernel's
    backward from dht. kernel: anything with the entry points above. Returns (o, ht, Grads)."""
    call = replace(call, memo={})
    (kernel.final_state_and_transition if transition else kernel.final_state)(call, None)
    o, ht = kernel.forward(call, h0)
    kernel.state_grad(call, do, None)
    return o, ht, kernel.backward(call, h0, do, dht)


def save_with_memo(ctx, memo: dict | None, *tensors) -> None:
    """ctx.save_for_backward(*tensors) and the tensors a kernel's forward left in `memo` for its
    backward (gla's intra-chunk matrix, the delta rules' WY inverse). Kept in ctx.memo instead they
    would stay on the GPU until the backward: activation checkpointing could not drop them, nor
    save_on_cpu move them to the host."""
    keys = [k for k, (tag, x) in (memo or {}).items() if tag is None and isinstance(x, torch.Tensor)]
    ctx.memo, ctx.memo_keys = memo, keys
    ctx.save_for_backward(*tensors, *(memo.pop(k)[1] for k in keys))


def saved_with_memo(ctx) -> tuple[tuple, dict | None]:
    """(the tensors given to save_with_memo, the memo with the forward's tensors back in it)."""
    saved = ctx.saved_tensors
    n = len(saved) - len(ctx.memo_keys)
    if ctx.memo is not None:
        ctx.memo.update((k, (None, x)) for k, x in zip(ctx.memo_keys, saved[n:]))
    return saved[:n], ctx.memo


class TorchKernel(ExplicitKernel):
    """The chunked PyTorch reference; backward by autograd on a recomputed forward. The state
    passes of the gated family use their closed forms (summaries.py). A subclass with another
    differentiable `impl` (same arguments) gets the same explicit calls."""

    impl = staticmethod(chunk_reference)

    def forward(self, call: Call, h0, h0_late=None):
        h0 = plus_late(h0, h0_late)
        with torch.no_grad():
            o, ht = self.impl(call.q, call.k, call.v, call.g, call.beta, call.scale, h0, True, call.cu_seqlens)
        return o, ht

    def _inputs(self, call: Call, h0):
        names = ["q", "k", "v", "g", "beta"]
        leaves = {n: getattr(call, n).detach().requires_grad_() for n in names if getattr(call, n) is not None}
        if h0 is None:
            N, H, K, V = call.n_states, call.q.shape[2], call.q.shape[3], call.v.shape[3]
            h0 = call.q.new_zeros(N, H, K, V, dtype=wide_dtype(call.q.dtype))
        leaves["h0"] = h0.detach().requires_grad_()
        return leaves

    def _grad(self, call, h0, do, dht, wanted):
        with torch.enable_grad():
            x = self._inputs(call, h0)
            o, ht = self.impl(x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), call.scale, x["h0"], True,
                              call.cu_seqlens)
            outs, grads = [o], [do]
            if dht is not None:
                outs.append(ht)
                grads.append(dht.to(ht.dtype))
            names = [n for n in wanted if n in x]
            got = torch.autograd.grad(outs, [x[n] for n in names], grads, allow_unused=True)
        res = {n: (gr if gr is not None else torch.zeros_like(x[n])) for n, gr in zip(names, got)}
        return res

    def backward(self, call: Call, h0, do, dht, dht_late=None) -> Grads:
        dht = plus_late(dht, dht_late)
        r = self._grad(call, h0, do, dht, ["q", "k", "v", "g", "beta", "h0"])
        return Grads(r["q"], r["k"], r["v"], r.get("g"), r.get("beta"), r["h0"])

    def final_state(self, call: Call, h0):
        if call.beta is None:
            return gated_final_state(call, h0)
        return super().final_state(call, h0)

    def state_grad(self, call: Call, do, dht):
        if call.beta is None:
            return gated_state_grad(call, do, dht)
        # autograd follows only the paths that reach h0: the adjoint state recurrence
        return self._grad(call, None, do, dht, ["h0"])["h0"]


_EXPLICIT: dict[str, ExplicitKernel] = {"torch": TorchKernel()}


def explicit_kernel(backend: str) -> ExplicitKernel:
    """The explicit forward/backward of a concrete backend (see backends.resolve)."""
    if backend in ("torch", "naive"):
        return _EXPLICIT["torch"]
    if backend not in _EXPLICIT:
        if backend == "triton":
            from .triton import TritonKernel

            _EXPLICIT["triton"] = TritonKernel()
        elif backend == "fla":
            from .fla_backend import FlaKernel

            _EXPLICIT["fla"] = FlaKernel()
        else:
            raise ValueError(f"unknown kernel backend {backend!r}")
    return _EXPLICIT[backend]
