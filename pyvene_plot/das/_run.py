""":func:`run_das`: train DAS for every (spec, k, variable), select the best per variable on calibration.

The intervention of a candidate with support basis ``P`` (m, d) (orthonormal rows; identity rows
for native coordinates) and rotation ``W`` (m, k) (orthonormal columns, learned) is::

    Q = P.T @ W                                   # (d, k), orthonormal columns
    h  <-  h + ((h_src - h) @ Q) @ Q.T            # swap the k-dim subspace span(Q), nothing else

For the whole vector (``P = I``) this is pyvene's own ``LowRankRotatedSpaceIntervention``
(householder-parametrised ``W``); restricted supports use :class:`SupportRotatedSpaceIntervention`.
Both store the token position as a buffer (``position``), so :func:`pyvene_plot.run_intervenable`
and ``IntervenableModel.save`` / ``load`` work on them.

Training (default ``trainer="auto"``; the trainers live in :mod:`pyvene_plot.das._train`): Adam on
the cross-entropy of the intervened readout logits against the variable's counterfactual labels,
the model frozen. Early stopping: stop when the epoch's mean training loss has not improved on the
best by a relative ``rel_tol`` for ``patience`` epochs (and at least ``min_epochs`` epochs ran).
Every candidate's initialisation and batch order is seeded and recorded.

The steps of :func:`run_das`, in order: check the arguments (:func:`_check_arguments`), resolve the
variables and the trainer (:func:`_resolve_variables`, :func:`_choose_trainer`), collect source
activations and positions once per bank (:func:`_collect_banks`), build the work list
(:func:`_work_list`), train and score each candidate (:func:`_train_candidate`), keep the best per
variable on calibration (:func:`_update_best`), and assemble the :class:`DASResult`
(:func:`_assemble_result`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data import PairBank, as_model_kwargs
from ..errors import PlotError, SiteError
from ..localize import SELECTION_RULES, InterchangeEngine, iia_scores
from ..models import Readout, model_device, model_spec
from ._result import DASBest, DASHandle, DASResult
from ._spec import DASSpec
from ._train import (
    TrainSite,
    auto_lr,
    predict_cached,
    pyvene_trainer_problem,
    train_loop,
    train_pyvene,
)

logger = logging.getLogger(__name__)

TRAINERS = ("auto", "loop", "pyvene")
#: the fields of a candidate row copied into the selected handle's ``meta``
_META_KEYS = ("seed", "lr", "epochs", "final_loss", "best_loss", "loss_history", "train_s", "calibration", "trainer",
              "support_width", "spec_index")


# =============================================================================== small rules
def _candidate_seed(seed: int, spec_index: int, k: int, variable_index: int) -> int:
    """The seed of one candidate, derived from (seed, spec index, k, variable index)."""
    return int(np.random.SeedSequence([int(seed) % (2**32), spec_index, k, variable_index]).generate_state(1)[0])


def _better(score: float, k: int, spec_index: int, current: tuple | None) -> bool:
    """Selection order: higher calibration score; ties (within 1e-12) go to smaller k, then earlier spec."""
    score = -math.inf if math.isnan(score) else float(score)
    if current is None:
        return True
    best = current[0]
    if score > best + 1e-12:
        return True
    return abs(score - best) <= 1e-12 and (k, spec_index) < (current[1], current[2])


# =============================================================================== steps
def _check_arguments(specs: Sequence[DASSpec] | None, fit_bank: PairBank, calibration_bank: PairBank, trainer: str,
                     selection: str, epochs: int, min_epochs: int, patience: int, rel_tol: float, lr: float | str,
                     batch_size: int, eval_batch_size: int) -> list[DASSpec]:
    """Validate :func:`run_das`'s arguments (raises :class:`PlotError`); return the specs as a list."""
    specs = list(specs) if specs is not None else []
    if not specs:
        raise PlotError("run_das needs at least one DASSpec (see pp.full_das_specs or loc.das_specs())")
    for s in specs:
        if not isinstance(s, DASSpec):
            raise PlotError(f"run_das expects DASSpec objects, got {type(s).__name__}")
    for b, what in ((fit_bank, "fit_bank"), (calibration_bank, "calibration_bank")):
        if not isinstance(b, PairBank):
            raise PlotError(f"{what} must be a PairBank, got {type(b).__name__}")
    if trainer not in TRAINERS:
        raise PlotError(f"unknown trainer {trainer!r}; choose one of {TRAINERS}")
    if selection not in SELECTION_RULES:
        raise PlotError(f"unknown selection rule {selection!r}; choose one of {SELECTION_RULES}")
    if int(epochs) < 1 or int(min_epochs) < 1 or int(patience) < 1:
        raise PlotError(f"epochs, min_epochs and patience must be >= 1 (got {epochs}, {min_epochs}, {patience})")
    if not (lr == "auto" or (isinstance(lr, (int, float)) and not isinstance(lr, bool)
                             and float(lr) > 0 and math.isfinite(float(lr)))):
        raise PlotError(f"lr must be a positive number or 'auto', got {lr!r}")
    if int(batch_size) < 1 or int(eval_batch_size) < 1:
        raise PlotError("batch sizes must be >= 1")
    if float(rel_tol) < 0:
        raise PlotError(f"rel_tol must be >= 0, got {rel_tol}")
    return specs


def _resolve_variables(specs: Sequence[DASSpec], fit: PairBank, cal: PairBank,
                       variables: Sequence[str] | None) -> list[str]:
    """The variables to train: given, else every bank variable (shared specs) or the specs' variables."""
    if variables is None:
        if any(s.variable is None for s in specs):
            variables = list(fit.variables)
        else:
            variables = list(dict.fromkeys(s.variable for s in specs))
    variables = [str(v) for v in variables]
    if not variables:
        raise PlotError("no variables to train DAS for")
    fit.check_variables(variables)
    cal.check_variables(variables)
    missing = [v for v in variables if not any(s.applies_to(v) for s in specs)]
    if missing:
        raise PlotError(f"no DASSpec applies to variable(s) {missing}; specs name {sorted({str(s.variable) for s in specs})}")
    return variables


def _validate_spec(spec: DASSpec, mspec: Any) -> int:
    """Check a spec against the model; return its support width."""
    if not 0 <= spec.layer < mspec.n_layers:
        raise SiteError(f"DASSpec {spec.label}: layer {spec.layer} does not exist; "
                        f"{mspec.model_type.__name__} has layers 0..{mspec.n_layers - 1}")
    d = mspec.dim(spec.component)
    if mspec.has_positions:
        if spec.position is None:
            raise SiteError(f"DASSpec {spec.label}: {mspec.model_type.__name__} has token positions; give position=")
    elif spec.position not in (None, 0, -1):
        raise SiteError(f"DASSpec {spec.label}: {mspec.model_type.__name__} has no token positions (only -1 / 0)")
    if spec.whole_vector:
        width = d
    else:
        P = spec.support_matrix(d)  # raises on coordinates / basis width outside the component
        width = int(P.shape[0])
    spec._check_sizes(width)
    return width


def _choose_trainer(model: torch.nn.Module, fit_bank: PairBank, trainer: str) -> tuple[str, str | None]:
    """The trainer that runs (``"loop"`` or ``"pyvene"``) and why pyvene's cannot (None when it can or was not asked)."""
    problem = pyvene_trainer_problem(model, fit_bank) if trainer in ("auto", "pyvene") else None
    if trainer == "pyvene" and problem is not None:
        raise PlotError(
            f"trainer='pyvene' cannot run here: {problem}. pyvene's IntervenableModel.train_alignment only "
            "passes input_ids / source_input_ids (no attention_mask, no inputs_embeds) and reads .logits; "
            "use trainer='loop' (the default adapter) instead"
        )
    used = "pyvene" if (trainer == "pyvene" or (trainer == "auto" and problem is None)) else "loop"
    return used, problem


@dataclasses.dataclass
class _Banks:
    """Base kwargs, site positions (N,) and source activations (N, d) per raw unit, collected once per bank."""

    fit_kw: dict
    cal_kw: dict
    fit_bpos: dict
    cal_bpos: dict
    cal_src: dict
    fit_src: dict | None  # loop trainer: cached fit-bank source activations
    fit_spos: dict | None  # pyvene trainer: fit-bank source positions (it runs the source forward itself)
    collect_s: float


def _collect_banks(model: torch.nn.Module, specs: Sequence[DASSpec], fit_bank: PairBank, calibration_bank: PairBank,
                   readout: Readout, eval_batch_size: int, used: str) -> _Banks:
    """Source activations and positions at every spec's site, once per bank (timed as ``collect_s``)."""
    t0 = time.perf_counter()
    raw_units = list(dict.fromkeys((s.layer, s.component, s.position, None) for s in specs))
    engine = InterchangeEngine(model, raw_units, readout=readout, batch_size=eval_batch_size)
    fit_kw, cal_kw = as_model_kwargs(fit_bank.base), as_model_kwargs(calibration_bank.base)
    fit_bpos = engine.positions(fit_bank.base)
    cal_bpos = engine.positions(calibration_bank.base)
    cal_src = engine.collect(calibration_bank.source)
    if used == "loop":
        fit_src = engine.collect(fit_bank.source)
        fit_spos = None
    else:
        fit_src = None
        fit_spos = engine.positions(fit_bank.source)
    return _Banks(fit_kw, cal_kw, fit_bpos, cal_bpos, cal_src, fit_src, fit_spos, time.perf_counter() - t0)


def _work_list(specs: Sequence[DASSpec], variables: Sequence[str]) -> list[tuple[int, DASSpec, int, int, str]]:
    """Every ``(spec index, spec, k, variable index, variable)`` to train, in training order."""
    jobs = [(si, spec, k, vi, v) for si, spec in enumerate(specs) for k in spec.subspace_sizes
            for vi, v in enumerate(variables) if spec.applies_to(v)]
    if not jobs:
        raise PlotError("no (spec, size, variable) combination to train")
    return jobs


@dataclasses.dataclass
class _Sweep:
    """What every candidate's training shares (the settings of one :func:`run_das` call)."""

    model: torch.nn.Module
    fit_bank: PairBank
    calibration_bank: PairBank
    banks: _Banks
    widths: list[int]
    readout: Readout
    opt_cfg: dict
    seed: int
    used: str
    device: torch.device
    progress: bool
    eval_batch_size: int


def _train_candidate(sw: _Sweep, si: int, spec: DASSpec, k: int, vi: int, v: str) -> tuple[dict, TrainSite]:
    """Train one (spec, k, variable) candidate and score it on calibration; return its row and site."""
    ru = (spec.layer, spec.component, spec.position)
    b, opt_cfg = sw.banks, sw.opt_cfg
    cseed = _candidate_seed(sw.seed, si, k, vi)
    site = TrainSite(sw.model, spec, k, cseed, sw.device)
    cfg = dict(opt_cfg, lr=auto_lr(sw.widths[si]) if opt_cfg["lr"] == "auto" else opt_cfg["lr"])
    t1 = time.perf_counter()
    if sw.used == "loop":
        hist = train_loop(site, b.fit_kw, b.fit_bpos[ru], b.fit_src[ru], sw.fit_bank.labels(v), sw.readout, cfg,
                          cseed, sw.device)
    else:
        hist = train_pyvene(site, sw.fit_bank, b.fit_bpos[ru], b.fit_spos[ru], sw.fit_bank.labels(v), sw.readout,
                            cfg, cseed, sw.device, sw.progress)
    train_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    preds = predict_cached(site, b.cal_kw, b.cal_bpos[ru], b.cal_src[ru], sw.readout, sw.eval_batch_size, sw.device)
    cal = iia_scores(preds, sw.calibration_bank.labels(v), sw.calibration_bank.changed(v))
    cal_s = time.perf_counter() - t2
    row = {
        "variable": v, "spec": spec.label, "spec_index": si, "source": spec.source, "layer": spec.layer,
        "component": spec.component, "position": spec.position, "support_width": sw.widths[si], "k": int(k),
        "seed": cseed, "lr": cfg["lr"], "epochs": len(hist), "final_loss": hist[-1], "best_loss": min(hist),
        "loss_history": hist, "stopped_early": len(hist) < opt_cfg["epochs"], "train_s": train_s,
        "calibration_s": cal_s, "calibration": cal, "trainer": sw.used, "selected": False,
    }
    return row, site


def _update_best(best: dict[str, tuple], row: dict, row_index: int, site: TrainSite, selection: str) -> float:
    """Keep ``row`` as its variable's best when it wins on calibration (:func:`_better`); return its score.

    ``best`` maps a variable to ``(score, k, spec index, row index, site)``; only the winner's site
    is kept alive, so a sweep holds one trained intervention per variable.
    """
    score = row["calibration"][selection]
    score = -math.inf if math.isnan(score) else float(score)
    v, k, si = row["variable"], row["k"], row["spec_index"]
    if _better(score, k, si, best.get(v)):
        best[v] = (score, k, si, row_index, site)
    return score


def _progress_bar(total: int, used: str, progress: bool) -> Any:
    """A tqdm bar over the candidates (None without ``progress`` or without tqdm)."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"DAS ({used})", leave=False)


def _train_all(sw: _Sweep, jobs: list, selection: str) -> tuple[list[dict], dict[str, tuple], float, float]:
    """Train every job in order, keeping the best per variable; return rows, best, train and calibration seconds."""
    candidates: list[dict] = []
    best: dict[str, tuple] = {}  # variable -> (score, k, spec index, row index, TrainSite)
    train_total = cal_total = 0.0
    bar = _progress_bar(len(jobs), sw.used, sw.progress)
    try:
        for si, spec, k, vi, v in jobs:
            row, site = _train_candidate(sw, si, spec, k, vi, v)
            train_total += row["train_s"]
            cal_total += row["calibration_s"]
            candidates.append(row)
            score = _update_best(best, row, len(candidates) - 1, site, selection)
            logger.info("DAS %s %s k=%d: %d epochs, loss %.4f, cal %s %.3f (%.2fs)", v, spec.label, k, row["epochs"],
                        row["final_loss"], selection, score, row["train_s"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"var": v, "site": spec.label, "k": k, "cal": round(score, 3)})
    finally:
        if bar is not None:
            bar.close()
    return candidates, best, train_total, cal_total


def _best_handles(specs: Sequence[DASSpec], variables: Sequence[str], candidates: list[dict],
                  best: dict[str, tuple], readout: Readout, selection: str) -> DASBest:
    """One :class:`DASHandle` per variable from its winning candidate (marked ``selected`` in its row)."""
    handles = DASBest()
    for v in variables:
        _score, k, si, ri, site = best[v]
        candidates[ri]["selected"] = True
        row = candidates[ri]
        handles[v] = DASHandle(variable=v, spec=specs[si], k=k, intervenable=site.im, readout=readout,
                               meta={key: row[key] for key in _META_KEYS} | {"selection": selection})
    return handles


def _assemble_result(sw: _Sweep, handles: DASBest, candidates: list[dict], variables: list[str], n_specs: int,
                     runtime: float, train_total: float, cal_total: float, trainer: str, problem: str | None,
                     selection: str) -> DASResult:
    """The :class:`DASResult`: handles, candidate rows, every setting and the timings."""
    settings = {**sw.opt_cfg, "seed": int(sw.seed), "selection": selection, "trainer_requested": trainer,
                "trainer": sw.used, "pyvene_trainer_unavailable": problem if sw.used == "loop" else None,
                "eval_batch_size": int(sw.eval_batch_size), "readout": sw.readout.to_dict(),
                "n_specs": n_specs, "fit_bank": sw.fit_bank.name, "calibration_bank": sw.calibration_bank.name,
                "n_fit": len(sw.fit_bank), "n_calibration": len(sw.calibration_bank),
                "threads": torch.get_num_threads(), "device": str(sw.device)}
    return DASResult(best=handles, candidates=candidates, runtime_s=runtime, n_trained=len(candidates),
                     trainer=sw.used, variables=variables, settings=settings,
                     timings={"collect_s": sw.banks.collect_s, "train_s": train_total, "calibration_s": cal_total})


# =============================================================================== run_das
def run_das(
    model: torch.nn.Module,
    specs: Sequence[DASSpec],
    fit_bank: PairBank,
    calibration_bank: PairBank,
    variables: Sequence[str] | None = None,
    *,
    readout: Readout | None = None,
    epochs: int = 10,
    min_epochs: int = 2,
    patience: int = 2,
    rel_tol: float = 1e-3,
    lr: float | str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    trainer: str = "auto",
    selection: str = "balanced",
    eval_batch_size: int = 512,
) -> DASResult:
    """Train DAS for every (spec, k, variable), select the best per variable on calibration.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook (frozen here: ``disable_model_gradients``).
    specs : sequence of DASSpec
        Where to look (:func:`full_das_specs` for Full DAS, ``loc.das_specs()`` for PLOT-guided DAS).
    fit_bank : PairBank
        Training pairs.
    calibration_bank : PairBank
        Selection pairs (every candidate is scored here; the test bank is never used).
    variables : sequence of str, optional
        Default: every bank variable when a spec is shared (``variable=None``), else the specs'
        variables. Specs for other variables are skipped.
    readout : Readout, optional
        The same readout as evaluation (loss and IIA share it); default ``Readout()``.
    epochs, min_epochs, patience, rel_tol : early stopping on the epoch's mean training loss.
    lr : float or "auto"
        Adam learning rate (constant). ``"auto"`` (default): ``min(0.03, 0.25 / sqrt(m))`` for a
        support of width ``m`` (0.03 up to m = 69, 0.009 at m = 768): enough to converge in ~10
        epochs on small banks, gentler on wide vectors. The value used is recorded per candidate.
    batch_size : int
        Training batch size.
    seed : int
        Base seed; every candidate's seed is derived from (seed, spec index, k, variable index)
        and recorded.
    progress : bool
        tqdm bar over candidates.
    trainer : {"auto", "loop", "pyvene"}
        ``"loop"``: this package's loop (cached source activations, ``parametrize.cached()``).
        ``"pyvene"``: ``IntervenableModel.train_alignment`` (one call per epoch, constant-lr Adam,
        source forward every step); only for banks of plain ``input_ids`` (all-ones
        ``attention_mask``) and models whose output has ``.logits``. ``"auto"``: ``"pyvene"`` when
        it fits, else ``"loop"``.
    selection : {"balanced", "iia", "sensitive"}
        Calibration criterion; ties go to the smaller ``k``, then to the earlier spec.
    eval_batch_size : int
        Batch size of source collection and calibration scoring.

    Returns
    -------
    DASResult
    """
    t_start = time.perf_counter()
    specs = _check_arguments(specs, fit_bank, calibration_bank, trainer, selection, epochs, min_epochs, patience,
                             rel_tol, lr, batch_size, eval_batch_size)
    readout = readout or getattr(fit_bank, "readout", None) or Readout()
    opt_cfg = {"epochs": int(epochs), "min_epochs": int(min_epochs), "patience": int(patience),
               "rel_tol": float(rel_tol), "lr": lr if lr == "auto" else float(lr),
               "batch_size": int(batch_size)}
    mspec = model_spec(model)
    widths = [_validate_spec(s, mspec) for s in specs]
    variables = _resolve_variables(specs, fit_bank, calibration_bank, variables)
    used, problem = _choose_trainer(model, fit_bank, trainer)
    device = model_device(model)
    banks = _collect_banks(model, specs, fit_bank, calibration_bank, readout, eval_batch_size, used)
    jobs = _work_list(specs, variables)
    sw = _Sweep(model=model, fit_bank=fit_bank, calibration_bank=calibration_bank, banks=banks, widths=widths,
                readout=readout, opt_cfg=opt_cfg, seed=seed, used=used, device=device, progress=progress,
                eval_batch_size=eval_batch_size)
    candidates, best, train_total, cal_total = _train_all(sw, jobs, selection)
    handles = _best_handles(specs, variables, candidates, best, readout, selection)
    runtime = time.perf_counter() - t_start
    return _assemble_result(sw, handles, candidates, variables, len(specs), runtime, train_total, cal_total,
                            trainer, problem, selection)
