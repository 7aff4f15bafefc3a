"""Low-rank (Tucker) parametrisation of L3D's ``n_v`` parameter directions over several tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ._config import L3DConfigError

_CORE = "abcdefgh"
_MODE = "pqrstuvw"


class TuckerTensors(nn.Module):
    """``K`` Tucker tensors of one parameter shape: ``T_k = G_k ×_1 U_k⁽¹⁾ … ×_N U_k⁽ᴺ⁾``.

    ``core``: (K, R_1..R_N); ``factors[d]``: (K, I_d, R_d). ``materialise()`` -> (K, I_1..I_N).
    """

    def __init__(self, k: int, shape: tuple[int, ...], ranks: tuple[int, ...], gen: torch.Generator) -> None:
        super().__init__()
        n = len(shape)
        if n > len(_MODE):
            raise L3DConfigError(f"parameters with more than {len(_MODE)} dimensions are not supported (shape {shape})")
        self.shape = tuple(shape)
        self.core = nn.Parameter(torch.randn(k, *ranks, generator=gen))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(k, i, r, generator=gen)) for i, r in zip(shape, ranks)]
        )
        core = "k" + _CORE[:n]
        ops = [core] + ["k" + _MODE[d] + _CORE[d] for d in range(n)]
        self.expr = ",".join(ops) + "->k" + _MODE[:n]
        self.normalise_factors()

    def materialise(self) -> torch.Tensor:
        """The ``K`` tensors, shape ``(K, I_1, ..., I_N)``."""
        return torch.einsum(self.expr, self.core, *self.factors)

    @torch.no_grad()
    def normalise_factors(self) -> None:
        """Unit-norm factor columns, scale moved into the core (the tensor is unchanged)."""
        for d, u in enumerate(self.factors):
            norms = u.norm(dim=1).clamp_min(1e-12)  # (K, R_d)
            u.div_(norms.unsqueeze(1))
            view = [norms.shape[0]] + [1] * (self.core.dim() - 1)
            view[1 + d] = norms.shape[1]
            self.core.mul_(norms.view(view))

    @torch.no_grad()
    def scale_(self, s: torch.Tensor) -> None:
        """Multiply tensor ``k`` by ``s[k]`` (through the core); ``s`` has shape (K,)."""
        self.core.mul_(s.view(-1, *([1] * (self.core.dim() - 1))))


class Directions(nn.Module):
    """``K`` low-rank directions over several parameter tensors, flattened to a (K, n_w) matrix."""

    def __init__(self, k: int, names: list[str], shapes: list[tuple[int, ...]], ranks: list[tuple[int, ...]],
                 gen: torch.Generator) -> None:
        super().__init__()
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.tuckers = nn.ModuleList([TuckerTensors(k, s, r, gen) for s, r in zip(shapes, ranks)])

    def matrix(self) -> torch.Tensor:
        """(K, n_w): every tensor's slices, flattened in ``names`` order."""
        return torch.cat([t.materialise().flatten(1) for t in self.tuckers], dim=1)

    @torch.no_grad()
    def normalise_(self, unit: bool, factors: bool = True) -> None:
        """Optionally rebalance the Tucker factors (tensor unchanged); with ``unit`` rescale every
        direction to unit norm over all tensors jointly."""
        if factors:
            for t in self.tuckers:
                t.normalise_factors()
        if unit:
            sq = sum(t.materialise().flatten(1).pow(2).sum(1) for t in self.tuckers)
            inv = 1.0 / sq.sqrt().clamp_min(1e-12)
            for t in self.tuckers:
                t.scale_(inv)


def split_directions(flat: torch.Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """(K, n_w) -> {name: (K, *shape)}."""
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape)) if len(shape) else 1
        out[name] = flat[:, start:start + size].reshape(flat.shape[0], *shape)
        start += size
    return out
