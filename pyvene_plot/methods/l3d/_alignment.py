"""Comparing L3D subnetworks with known parameter directions: ``|cos|`` alignment and one-to-one matching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ._config import L3DConfigError


def subnetwork_alignment(subnetworks: Sequence[Mapping[str, torch.Tensor]],
                         directions: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``|cos|`` between subnetworks and reference parameter directions, on the tensors in ``directions``.

    Parameters
    ----------
    subnetworks : sequence of dict
        ``n_v`` subnetworks (``L3D.subnetworks``).
    directions : dict of str to Tensor (F, *shape)
        ``F`` reference directions (e.g. one per ground-truth feature), given on a subset of the
        decomposed tensors; only those tensors enter the cosine.

    Returns
    -------
    Tensor, shape (n_v, F)
        Absolute cosine similarities in ``[0, 1]`` (0 where a subnetwork is zero on those tensors).
    """
    if not directions:
        raise L3DConfigError("directions is empty: give {param_name: Tensor (F, *param_shape)}")
    names = list(directions)
    missing = [n for n in names if n not in subnetworks[0]]
    if missing:
        raise L3DConfigError(f"directions name tensors {missing} that the subnetworks do not contain "
                             f"({list(subnetworks[0])})")
    s = torch.stack([torch.cat([sub[n].detach().double().flatten() for n in names]) for sub in subnetworks])
    f = torch.cat([directions[n].detach().double().flatten(1) for n in names], dim=1)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-300)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (s @ f.T).abs().float()


def match_subnetworks(alignment: torch.Tensor) -> tuple[list[int], list[int]]:
    """One-to-one matching of subnetworks (rows) to reference directions (columns) maximising total ``|cos|``.

    Returns
    -------
    rows, cols : list of int
        ``alignment[rows[i], cols[i]]`` are the matched pairs (``min(n_v, F)`` of them), sorted by column.
    """
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(alignment.detach().double().numpy(), maximize=True)
    order = np.argsort(c)
    return [int(r[i]) for i in order], [int(c[i]) for i in order]
