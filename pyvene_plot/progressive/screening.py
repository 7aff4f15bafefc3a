"""Screening."""

from __future__ import annotations

import dataclasses

# ---------------------------------------------------------------------------------------- scheduler
import logging as _logging  # noqa: E402
from typing import Any

from ..errors import PlotError

_log = _logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- screening
@dataclasses.dataclass
class ScreenResult:
    """What a screener returns for a stage's candidate sites.

    Attributes
    ----------
    scores : list of float
        One score per candidate (higher = more important), in candidate order.
    keep : list of bool
        Which candidates survive (for every variable).
    threshold : float or None
        The threshold applied.
    rule : str
        The rule in words (for reports).
    info : dict
        Anything else worth reporting (score definition, data used, timings).
    keep_by_variable : dict of str to list of bool, optional
        Per-variable survival (overrides ``keep`` for that variable), for screeners that score
        sites per variable.
    """

    scores: list
    keep: list
    threshold: float | None = None
    rule: str = ""
    info: dict = dataclasses.field(default_factory=dict)
    keep_by_variable: dict | None = None


#: ``name -> screener``, called as ``fn(model, sites, bank, *, variables, threshold, readout, bases,
#: seed)`` and returning a :class:`ScreenResult`. The built-in ``"oa"`` and ``"mean"``
#: (:mod:`pyvene_plot.methods.ablation`) and ``"attribution"`` (:mod:`pyvene_plot.methods.attribution`)
#: register themselves when imported, which ``import pyvene_plot`` does.
SCREENERS: dict[str, Any] = {}


def register_screener(name: str, fn: Any, overwrite: bool = False) -> None:
    """Register a screener for ``Stage(screen=name)``.

    Parameters
    ----------
    name : str
    fn : callable
        ``fn(model, sites, bank, *, variables, threshold, readout, bases, seed) -> ScreenResult``;
        ``sites`` are the stage's candidates (union over variables), ``bank`` the fit bank,
        ``threshold`` the stage's ``screen_threshold`` (None: the screener's default rule).
    overwrite : bool
        Replace an existing registration.
    """
    if not callable(fn):
        raise PlotError(f"screener {name!r} must be callable")
    if name in SCREENERS and not overwrite:
        raise PlotError(f"screener {name!r} is already registered; pass overwrite=True to replace it")
    SCREENERS[name] = fn


def screener_names() -> list[str]:
    """Registered screener names."""
    return sorted(SCREENERS)


def get_screener(name: str) -> Any:
    if name not in SCREENERS:
        raise PlotError(f"unknown screener {name!r}; registered: {sorted(SCREENERS)} (see register_screener)")
    return SCREENERS[name]
