"""How a layer builds its weights, injected, so that one layer implementation serves the plain model
(nn.Linear) and the tensor-parallel Megatron build (Column/RowParallelLinear) alike.

A layer asks for
* column(in, out, std): maps [..., in] -> [..., out / tp]: this TP rank's slice of the outputs
  (its heads, its MLP channels);
* row(in, out, std): maps [..., in / tp] -> [..., out], the partial products summed over the TP group;
* shard(parameter): a parameter whose dim 0 runs over this rank's heads or channels (per-head gates,
  convolution filters, output-norm weights), so the Megatron build can tag it as TP-split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


def plain_linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    return layer


def _unchanged(p: nn.Parameter) -> nn.Parameter:
    return p


@dataclass(frozen=True)
class Projections:
    column: Callable[[int, int, float], nn.Module] = plain_linear
    row: Callable[[int, int, float], nn.Module] = plain_linear
    shard: Callable[[nn.Parameter], nn.Parameter] = _unchanged
    tp_size: int = 1
    tp_rank: int = 0

    def local(self, n: int, what: str) -> int:
        """This TP rank's share of n heads / channels."""
        if n % self.tp_size:
            raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {self.tp_size}; "
                             f"choose {what} divisible by TP or a TP size dividing {n}")
        return n // self.tp_size

    def local_slice(self, n: int, what: str) -> slice:
        m = self.local(n, what)
        return slice(self.tp_rank * m, (self.tp_rank + 1) * m)


PLAIN = Projections()
