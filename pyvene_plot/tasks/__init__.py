"""Built-in tasks: a causal model, a network trained in-process (no download) and pair banks.

>>> import pyvene_plot as pp
>>> pp.tasks.names()                                      # doctest: +SKIP
>>> task = pp.tasks.load("heq", seed=0)                   # doctest: +SKIP
>>> task.model, task.variables, task.fit, task.calibration, task.test   # doctest: +SKIP

Loading is cached per process by ``(name, seed, options)``: training happens once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..data import PairBank
from ..errors import PlotError
from ..models import Readout, Site

logger = logging.getLogger(__name__)

__all__ = ["Task", "register", "names", "load", "task_signatures"]


@dataclasses.dataclass
class Task:
    """A ready-to-localise problem.

    Attributes
    ----------
    name : str
        Registry name.
    model : torch.nn.Module
        The trained network (eval mode, frozen).
    variables : list of str
        Abstract variables to localise.
    fit, calibration, test : PairBank
        Disjoint banks: signatures/DAS training, hyper-parameter selection, reporting only.
    sites : list of Site
        Default candidate sites for a single-stage search.
    default_stages : list of Stage
        The stage list the progressive scheduler uses for this task.
    readout : Readout
        How outputs become class logits (shared by every method).
    causal_model : object
        The high-level pyvene ``CausalModel`` (or None when labels are computed directly).
    info : dict
        Training accuracy, training time, sizes, seeds: what the task builder measured.
    """

    name: str
    model: torch.nn.Module
    variables: list[str]
    fit: PairBank
    calibration: PairBank
    test: PairBank
    sites: list[Site]
    default_stages: list[Any]
    readout: Readout = dataclasses.field(default_factory=Readout)
    causal_model: Any = None
    info: dict = dataclasses.field(default_factory=dict)
    #: defaults for :func:`pyvene_plot.comparison` on this task (e.g. a smaller DAS grid for a real LM on CPU);
    #: explicit arguments to ``compare`` override them
    compare_options: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "model": type(self.model).__name__,
            "variables": list(self.variables),
            "banks": {b.name: b.summary() for b in (self.fit, self.calibration, self.test)},
            "n_sites": len(self.sites),
            "info": self.info,
        }


def task_signatures(task) -> tuple[str, ...]:
    """Signature modes swept on calibration for a task.

    ``prob_delta`` plus the two-class margin (binary outputs) or the logit delta (more classes), and
    ``family_mean`` when the fit bank carries counterfactual families (see :class:`PairBank`); which
    one is used is chosen on the calibration bank, never here.
    """
    labels = set(task.fit.base_labels.tolist())
    for v in task.variables:
        labels |= set(task.fit.labels(v).tolist())
    modes = ("prob_delta", "margin_delta") if labels <= {0, 1} else ("prob_delta", "logit_delta")
    return modes + (("family_mean",) if task.fit.family is not None else ())


_REGISTRY: dict[str, Callable[..., Task]] = {}
_CACHE: dict[tuple, Task] = {}


def register(name: str, builder: Callable[..., Task], overwrite: bool = False) -> None:
    """Register a task builder ``builder(seed=..., **options) -> Task``."""
    if name in _REGISTRY and not overwrite:
        raise PlotError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = builder


def names() -> list[str]:
    """Registered task names."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def load(name: str, seed: int = 0, cache: bool = True, **options: Any) -> Task:
    """Build (train) a task; cached per process by ``(name, seed, options)``."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise PlotError(f"unknown task {name!r}; available: {sorted(_REGISTRY)}")
    key = (name, int(seed), tuple(sorted(options.items())))
    if cache and key in _CACHE:
        return _CACHE[key]
    task = _REGISTRY[name](seed=int(seed), **options)
    for bank in (task.fit, task.calibration, task.test):
        if getattr(bank, "readout", None) is None:
            bank.readout = task.readout  # so searchers / run_das pick the task's readout by default
    if cache:
        _CACHE[key] = task
    return task


_BUILTIN_LOADED = False


def _ensure_builtin() -> None:
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import importlib

    for mod in ("heq", "planted", "binary_addition", "gpt2_lookup", "ioi", "country_facts"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a task module not written yet
            if exc.name != f"{__name__}.{mod}":
                raise
