"""Random inputs and comparisons shared by the tests, the GPU checks and the benchmarks."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .variants import get_variant


@dataclass
class KernelInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    initial_state: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def kwargs(self) -> dict:
        """Keyword arguments of a kernel call (everything but q, k, v)."""
        return {n: getattr(self, n) for n in ("g", "beta", "initial_state")}

    def requires_grad_(self) -> "KernelInputs":
        for t in self.tensors().values():
            t.requires_grad_(True)
        return self

    def map(self, fn) -> "KernelInputs":
        return KernelInputs(**{f.name: (fn(getattr(self, f.name)) if getattr(self, f.name) is not None else None)
                               for f in fields(self)})


def random_inputs(variant: str, B=1, T=64, H=2, K=16, V=16, *, dtype=torch.float64, device="cpu",
                  n_states: int | None = None, initial_state=True, seed: int | None = None,
                  gate_strength: float = 1.0) -> KernelInputs:
    """Inputs of the scale a model produces: delta-rule keys L2-normalised, beta in (0, 1), log
    gates logsigmoid(x) / gate_strength-scaled. n_states: number of documents when packing (B=1)."""
    var = get_variant(variant)
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rnd(B, T, H, K)
    k = rnd(B, T, H, K) / K ** 0.5
    v = rnd(B, T, H, V)
    g = beta = None
    if var.gate == "head":
        g = -torch.rand(H, generator=gen, dtype=torch.float64) * 0.5 * gate_strength
    elif var.gate == "token":
        g = F.logsigmoid(rnd(B, T, H) + 2.0) * gate_strength
    elif var.gate == "key":
        g = F.logsigmoid(rnd(B, T, H, K) + 2.0) * gate_strength
    if var.delta:
        k = F.normalize(k, dim=-1)
        beta = torch.sigmoid(rnd(B, T, H))
    h0 = rnd(n_states or B, H, K, V) if initial_state else None
    return KernelInputs(q, k, v, g, beta, h0).map(lambda t: t.to(device=device, dtype=dtype))


def random_cu_seqlens(total: int, n_docs: int, *, seed: int | None = None, device="cpu") -> torch.Tensor:
    """Boundaries of n_docs documents of random, non-empty lengths summing to total."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    cuts = torch.randperm(total - 1, generator=gen)[: n_docs - 1] + 1
    bounds = [0] + sorted(cuts.tolist()) + [total]
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def outputs_and_grads(fn, inputs: KernelInputs, do: torch.Tensor, dht: torch.Tensor | None) -> dict:
    """Run fn(q, k, v, **kwargs) -> (o, ht), backpropagate (do, dht), and collect o, ht and every
    input's gradient under the names o, ht, dq, dk, dv, dg, dbeta, dinitial_state."""
    x = inputs.map(lambda t: t.detach().clone()).requires_grad_()
    o, ht = fn(x.q, x.k, x.v, **x.kwargs())
    outs, grads = [o], [do]
    if dht is not None:
        outs.append(ht)
        grads.append(dht)
    torch.autograd.backward(outs, grads)
    res = {"o": o.detach(), "ht": ht.detach() if ht is not None else None}
    for name, t in x.tensors().items():
        res["d" + name] = t.grad
    return res
