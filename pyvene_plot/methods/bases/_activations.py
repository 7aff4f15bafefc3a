"""Activations at a whole-vector site: the one collector used by the basis builders and the scheduler."""

from __future__ import annotations

import torch

from ...data import Inputs, PairBank, concat_inputs
from ...errors import SiteError
from ...models import Site, validate_sites


def bank_states(bank: PairBank | Inputs) -> Inputs:
    """Model inputs whose activations a basis is fitted on: bases then sources of a bank, or raw inputs."""
    if isinstance(bank, PairBank):
        return concat_inputs([bank.base, bank.source])
    return bank


def whole_site(model: torch.nn.Module, site: Site) -> Site:
    """Validate ``site`` for ``model`` and refuse sites with ``dims``/``basis`` (a basis spans a whole vector).

    Raises
    ------
    SiteError
        Not a :class:`Site`, a site with dims or basis, or a site the model does not have.
    """
    if not isinstance(site, Site):
        raise SiteError(f"expected a pyvene_plot.Site, got {type(site).__name__}")
    if site.dims is not None or site.basis is not None:
        raise SiteError(
            f"site {site.label}: a basis is fitted on a whole activation vector; pass the site without "
            "dims/basis (e.g. site.with_(dims=None, basis=None))"
        )
    validate_sites(model, [site])
    return site


def site_activations(
    model: torch.nn.Module,
    site: Site,
    bank: PairBank | Inputs,
    batch_size: int | str = 512,
    *,
    split_bank: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Activations at a whole-vector site, shape ``(n, d)``, on the CPU.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook.
    site : Site
        Whole-vector site (no ``dims`` / ``basis``).
    bank : PairBank or inputs
        A :class:`PairBank` (every base and then every source state: ``n = 2N``) or model inputs
        (a Tensor or dict of Tensors).
    batch_size : int or "auto", default 512
        Rows per forward pass (see :class:`~pyvene_plot.localize.InterchangeEngine`).
    split_bank : bool, default False
        For a bank: collect its bases and its sources in two passes and concatenate them, instead of
        one pass over their concatenation. The rows are the same states in the same order; batch
        boundaries (and ``"auto"`` batch sizes) follow each half, as in the progressive scheduler's
        ``pca`` stage, and bases and sources may have different sequence lengths.
    dtype : torch.dtype or None, default torch.float32
        Cast to this dtype; ``None`` keeps the model's activation dtype.

    Returns
    -------
    Tensor, shape (n, d)
    """
    from ...localize import InterchangeEngine

    site = whole_site(model, site)
    eng = InterchangeEngine(model, [site.unit], batch_size=batch_size)
    ru = (site.layer, site.component, site.position)
    if split_bank and isinstance(bank, PairBank):
        acts = torch.cat([eng.collect(bank.base)[ru], eng.collect(bank.source)[ru]], 0)
    else:
        acts = eng.collect(bank_states(bank))[ru]
    if dtype is not None:
        acts = acts.to(dtype)
    return acts.cpu()
