"""Optimal ablation of many sites at once: :func:`optimal_ablation` and its named steps.

The steps, in the order :func:`optimal_ablation` runs them:

1. :func:`_resolve_config`: settings and keyword overrides; the targets (:func:`~._targets.build_targets`);
2. :func:`_split_data`: training / evaluation examples (the first draw of the seeded generator);
3. :func:`_prepare_data`: clean read-outs, loss references, activations and positions;
4. :func:`_unit_statistics` and :func:`_resample_sources` (the generator's second draw);
5. per chunk of targets (:func:`_run_chunks`): :func:`_fit_chunk` (train every copy, keep the best
   constant), :func:`_evaluate_chunk` (all gaps on the evaluation data), :func:`_chunk_records`;
6. :func:`_assemble_result`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...data import Inputs, PairBank, as_model_kwargs, index_inputs, inputs_len
from ...errors import BankError, ModelError, PlotError, SiteError
from ...localize import InterchangeEngine
from ...models import Readout, model_device
from ._config import ABLATION_KINDS, OptimalAblationConfig
from ._forward import clean_logits, loss_reference, per_row_loss
from ._result import OptimalAblationResult
from ._runner import AblationRunner
from ._targets import AblationTarget, SiteLike, build_targets
from ._train import evaluate_constants, evaluate_resample, restart_examples, train_chunk

logger = logging.getLogger(__name__)


def optimal_ablation(
    model: torch.nn.Module,
    sites: Sequence[SiteLike],
    bank: PairBank | Inputs,
    *,
    readout: Readout | None = None,
    eval_bank: PairBank | Inputs | None = None,
    bases: Mapping[str, Any] | None = None,
    config: OptimalAblationConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> OptimalAblationResult:
    """Optimal-ablation gap Δ_opt of every site, next to the zero-, mean- and resample-ablation gaps.

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook (frozen; only the constants are trained).
    sites : sequence of Site, or of lists of Site
        One record per element. A list of sites is ablated *jointly* (one constant per hook, the
        union of their coordinates / basis rows; e.g. all sites of a PLOT handle).
    bank : PairBank or model inputs
        Examples ``x ~ D``: the bank's base inputs (``PairBank.base``), or raw model inputs
        (Tensor ``(N, ...)`` or dict of Tensors). ``loss="ce"`` needs a PairBank (its
        ``base_labels``).
    readout : Readout, optional
        Output -> logits ``(B, C)``; default the bank's readout, else :class:`Readout` (last
        token's logits for LMs).
    eval_bank : PairBank or model inputs, optional
        Evaluate every gap on these examples (then all of ``bank`` is used for training).
    bases : dict of str to array (r, d), optional
        Orthonormal bases of span sites (``Site(basis=...)``).
    config : OptimalAblationConfig, optional
        Settings; keyword ``overrides`` replace its fields (e.g. ``steps=500, loss="ce"``).
    progress : bool
        tqdm bar over training steps.

    Returns
    -------
    OptimalAblationResult
        ``records``: one dict per site with ``delta_opt``, ``delta_zero``, ``delta_mean``,
        ``delta_resample`` (evaluation data; see ``evaluated_on``), flip rates, training losses,
        steps, learning rates, sizes; ``constants``: the fitted ``a*`` per site.

    Raises
    ------
    SiteError
        Sites outside the model, or whose constant receives no gradient (the hook never fires or
        the read-out does not depend on the site).
    BankError
        Empty banks, too few examples for the held-out split, ``loss="ce"`` without labels.
    ModelError
        NaN / inf outputs or activations.
    PlotError
        Unknown loss or invalid settings.

    Notes
    -----
    Parallel training: sites are processed in chunks of ``max(1, max_rows // batch_size)``. In a
    chunk the mini-batch is replicated once per site and copy ``t`` is ablated at site ``t`` only
    (one pyvene intervention per hook holds the constants of every site at that hook). The summed
    loss separates over sites and AdamW is per-coordinate, so this equals training each site alone
    on the same mini-batches.
    """
    t0 = time.perf_counter()
    cfg = _resolve_config(config, overrides)
    if readout is None:
        readout = getattr(bank, "readout", None) if isinstance(bank, PairBank) else None
        readout = readout or Readout()
    targets = build_targets(model, sites, bases)
    g = torch.Generator().manual_seed(int(cfg.seed))
    split = _split_data(bank, eval_bank, cfg, g)
    data = _prepare_data(model, targets, split, readout, cfg)
    stats = _unit_statistics(targets, data.acts_tr, cfg, data.device)
    src = _resample_sources(cfg, data.n_tr, data.n_ev, split.same, g)
    records, constants = _run_chunks(model, targets, stats, data, src, readout, cfg, progress)
    runtime = time.perf_counter() - t0
    res = _assemble_result(model, targets, records, constants, cfg, readout, runtime, split, bases)
    logger.info("optimal ablation of %d site(s) in %.2fs (%s)", len(targets), runtime, split.evaluated_on)
    return res


# ============================================================================ step 1: settings
def _resolve_config(config: OptimalAblationConfig | None, overrides: Mapping[str, Any]) -> OptimalAblationConfig:
    """``config`` (default :class:`OptimalAblationConfig`) with keyword ``overrides`` applied and validated."""
    cfg = config or OptimalAblationConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(OptimalAblationConfig)})
        if unknown:
            raise PlotError(f"unknown optimal_ablation option(s) {unknown}; see OptimalAblationConfig")
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


# ============================================================================ step 2: data split
@dataclasses.dataclass
class _Split:
    """Training and evaluation inputs and labels (CPU), and which examples were evaluated."""

    kw_tr: dict
    y_tr: torch.Tensor | None
    kw_ev: dict
    y_ev: torch.Tensor | None
    eval_index: torch.Tensor | None  # rows of the bank evaluated (None with eval_bank)
    evaluated_on: str
    same: bool  # evaluation examples are the training examples (holdout=0)


def _as_inputs_and_labels(bank: Any, what: str) -> tuple[dict, torch.Tensor | None, str]:
    """Model kwargs, labels (PairBank only) and a name of a bank or of raw model inputs."""
    if isinstance(bank, PairBank):
        return as_model_kwargs(bank.base), bank.base_labels, bank.name
    if isinstance(bank, (torch.Tensor, Mapping)):
        kw = as_model_kwargs(bank)
        if not kw or any(not isinstance(v, torch.Tensor) for v in kw.values()):
            raise BankError(f"{what} must be a PairBank or model inputs (a Tensor or a dict of Tensors)")
        if any(v.dim() == 0 or v.shape[0] == 0 for v in kw.values()):
            raise BankError(f"{what} is empty (no examples); pass at least two examples")
        return kw, None, "inputs"
    raise BankError(f"{what} must be a PairBank or model inputs (a Tensor or a dict of Tensors), got {type(bank).__name__}")


def _split_data(bank: PairBank | Inputs, eval_bank: PairBank | Inputs | None, cfg: OptimalAblationConfig,
                g: torch.Generator) -> _Split:
    """Training / evaluation examples: ``eval_bank``, else a seeded held-out split (draws ``g``), else the same rows."""
    kw_all, labels_all, bank_name = _as_inputs_and_labels(bank, "bank")
    n_all = inputs_len(kw_all)
    if eval_bank is not None:
        kw_ev, y_ev, ev_name = _as_inputs_and_labels(eval_bank, "eval_bank")
        split = _Split(kw_all, labels_all, kw_ev, y_ev, None,
                       f"eval_bank {ev_name!r} ({inputs_len(kw_ev)} examples); trained on {bank_name!r}", False)
    elif cfg.holdout > 0:
        n_ev = round(cfg.holdout * n_all)
        if n_ev < 1 or n_all - n_ev < 1:
            raise BankError(
                f"bank {bank_name!r} has {n_all} example(s): too few for a held-out split with holdout="
                f"{cfg.holdout}; pass more examples, eval_bank=, or holdout=0 (evaluate on the training data)"
            )
        perm = torch.randperm(n_all, generator=g)
        eval_index, train_index = perm[:n_ev].sort().values, perm[n_ev:].sort().values
        split = _Split(
            index_inputs(kw_all, train_index), labels_all[train_index] if labels_all is not None else None,
            index_inputs(kw_all, eval_index), labels_all[eval_index] if labels_all is not None else None,
            eval_index, (f"held-out {cfg.holdout:.0%} of bank {bank_name!r} ({n_ev} examples; constants and "
                         f"statistics from the other {n_all - n_ev})"), False)
    else:
        split = _Split(kw_all, labels_all, kw_all, labels_all, torch.arange(n_all),
                       f"the training examples themselves (bank {bank_name!r}, {n_all} examples; holdout=0)", True)
    if cfg.loss == "ce" and (split.y_tr is None or split.y_ev is None):
        raise BankError("loss='ce' needs labels: pass a PairBank (its base_labels are the targets) or use loss='kl'")
    return split


# ============================================================================ step 3: clean runs
@dataclasses.dataclass
class _Data:
    """What every chunk shares (on the model's device): inputs, positions, loss references, activations."""

    kw_tr: dict
    kw_ev: dict
    pos_tr: dict  # hook -> LongTensor (n_tr,)
    pos_ev: dict  # hook -> LongTensor (n_ev,)
    ref_tr: torch.Tensor
    ref_ev: torch.Tensor
    pred_tr: torch.Tensor  # clean argmax (n_tr,)
    pred_ev: torch.Tensor  # clean argmax (n_ev,)
    acts_tr: dict  # hook -> (n_tr, d) training activations (float32)
    base_loss_tr: float  # clean model's loss (0 unless loss="ce")
    base_loss_ev: float
    n_tr: int
    n_ev: int
    device: torch.device


def _prepare_data(model: torch.nn.Module, targets: Sequence[AblationTarget], split: _Split, readout: Readout,
                  cfg: OptimalAblationConfig) -> _Data:
    """Clean read-outs and loss references, training activations and hook positions of both splits."""
    raw_units = list(dict.fromkeys(u.raw for t in targets for u in t.units))
    engine = InterchangeEngine(model, [(*r, None) for r in raw_units], readout)
    device = model_device(model)
    clean_tr = clean_logits(model, split.kw_tr, readout, cfg.max_rows).to(device)
    clean_ev = clean_logits(model, split.kw_ev, readout, cfg.max_rows).to(device)
    y_tr, y_ev = split.y_tr, split.y_ev
    if cfg.loss == "ce":
        nc = clean_tr.shape[1]
        mx = int(torch.cat([y_tr, y_ev]).max())
        if mx >= nc:
            raise BankError(f"label {mx} is outside the read-out's {nc} classes; labels must index the read-out logits")
    try:
        acts_tr = {r: a.float() for r, a in engine.collect(split.kw_tr).items()}
    except KeyError as exc:  # pyvene's collect hook never fired
        raise SiteError(
            f"pyvene's hook {exc} never fired during a forward pass: that component is not computed by this model "
            "under the current transformers version / settings (e.g. GPT-2 'attention_weight' needs eager "
            "attention); choose another component"
        ) from exc
    for r, a in acts_tr.items():
        if not torch.isfinite(a).all():
            raise ModelError(f"non-finite activations (NaN or inf) at layer {r[0]} {r[1]} position {r[2]}")
    pos_tr = {r: p.to(device) for r, p in engine.positions(split.kw_tr).items()}
    pos_ev = {r: p.to(device) for r, p in engine.positions(split.kw_ev).items()}
    del engine
    ref_tr = loss_reference(cfg.loss, clean_tr, y_tr.to(device) if y_tr is not None else None)
    ref_ev = loss_reference(cfg.loss, clean_ev, y_ev.to(device) if y_ev is not None else None)
    base_loss_ev = per_row_loss(cfg.loss, clean_ev, ref_ev).mean().item() if cfg.loss == "ce" else 0.0
    base_loss_tr = per_row_loss(cfg.loss, clean_tr, ref_tr).mean().item() if cfg.loss == "ce" else 0.0
    return _Data(
        kw_tr={k: v.to(device) for k, v in split.kw_tr.items()}, kw_ev={k: v.to(device) for k, v in split.kw_ev.items()},
        pos_tr=pos_tr, pos_ev=pos_ev, ref_tr=ref_tr, ref_ev=ref_ev, pred_tr=clean_tr.argmax(-1),
        pred_ev=clean_ev.argmax(-1), acts_tr=acts_tr, base_loss_tr=base_loss_tr, base_loss_ev=base_loss_ev,
        n_tr=inputs_len(split.kw_tr), n_ev=inputs_len(split.kw_ev), device=device,
    )


# ============================================================================ step 4: statistics
def _unit_statistics(targets: Sequence[AblationTarget], acts_tr: Mapping[tuple, torch.Tensor],
                     cfg: OptimalAblationConfig, device: torch.device) -> list[list[dict]]:
    """Per target and unit, on the training examples: ``mean`` (k,), ``lr``, ``step_scale`` (k,), ``rms_std``."""
    stats: list[list[dict]] = []
    for t in targets:
        row = []
        for u in t.units:
            c = u.coords(acts_tr[u.raw])
            mean = c.mean(0)
            std = c.std(0, unbiased=False) if c.shape[0] > 1 else torch.zeros_like(mean)
            rms = float(std.pow(2).mean().sqrt())
            if cfg.lr == "auto":
                # whitened steps: a = a0 + s * z with z trained at lr = lr_scale (in standard deviations);
                # coordinates that never vary get a floor of 10 % of the unit's RMS spread
                floor = 0.1 * rms if rms > 0 else 0.1 * (float(mean.pow(2).mean().sqrt()) or 1.0)
                s_vec, lr = (std.pow(2) + floor**2).sqrt(), float(cfg.lr_scale)
            else:
                s_vec, lr = torch.ones_like(mean), float(cfg.lr)
            row.append({"mean": mean.to(device), "lr": lr, "step_scale": s_vec.to(device), "rms_std": rms})
        stats.append(row)
    return stats


def _resample_sources(cfg: OptimalAblationConfig, n_tr: int, n_ev: int, same: bool, g: torch.Generator) -> torch.Tensor:
    """Training example ``(R, n_ev)`` resampled for each draw and evaluation example (never itself when ``same``)."""
    R = int(cfg.resample_draws)
    src = torch.randint(0, n_tr, (R, n_ev), generator=g)
    if same and n_tr > 1:
        clash = src == torch.arange(n_ev).unsqueeze(0)
        src[clash] = (src[clash] + 1) % n_tr
    return src


# ============================================================================ step 5: chunks of targets
@dataclasses.dataclass
class _ChunkFit:
    """The constants kept for a chunk's targets and their training record."""

    fitted: dict  # (t, j) -> constant (k,)
    chosen: list[str]  # "trained", "trained:restart<c>", "mean" or "init:<init>"
    final_loss: list[float]  # last mini-batch loss of the kept copy (NaN without training)
    tr_best: list[float] | None  # training loss of the kept constant
    tr_mean: dict | None  # training loss / flips of the mean constant
    restart_deltas: list[list[float]]  # training gap of every copy


def _run_chunks(model: torch.nn.Module, targets: Sequence[AblationTarget], stats: list[list[dict]], data: _Data,
                src: torch.Tensor, readout: Readout, cfg: OptimalAblationConfig,
                progress: bool) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
    """Fit and evaluate the targets chunk by chunk; the records and fitted constants (per label), in order."""
    b = min(int(cfg.batch_size), data.n_tr)
    copies = 1 + int(cfg.restarts) if cfg.steps > 0 else 1
    per_chunk = max(1, int(cfg.max_rows) // (b * copies))
    records: list[dict] = []
    constants: dict[str, list[np.ndarray]] = {}
    total_steps = int(cfg.steps) * math.ceil(len(targets) / per_chunk)
    bar = None
    if progress and total_steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=f"optimal ablation ({len(targets)} sites)", leave=False)
    try:
        for c0 in range(0, len(targets), per_chunk):
            tg = list(targets[c0:c0 + per_chunk])
            st = stats[c0:c0 + per_chunk]
            runner = AblationRunner(model, tg, readout)  # one copy per site: evaluation
            units = [(t, j) for t in range(len(tg)) for j in range(len(tg[t].units))]
            mean_v = {(t, j): st[t][j]["mean"] for t, j in units}
            zero_v = {(t, j): torch.zeros_like(st[t][j]["mean"]) for t, j in units}
            t_chunk = time.perf_counter()
            fit = _fit_chunk(model, runner, tg, st, mean_v, zero_v, data, readout, cfg, b, copies, bar)
            train_s = time.perf_counter() - t_chunk
            ev = _evaluate_chunk(runner, cfg, data, fit.fitted, mean_v, zero_v, src)
            records += _chunk_records(tg, st, fit, ev, data, cfg, copies, train_s)
            for t in range(len(tg)):
                constants[tg[t].label] = [fit.fitted[(t, j)].detach().cpu().numpy().copy()
                                          for j in range(len(tg[t].units))]
            del runner
    finally:
        if bar is not None:
            bar.close()
    return records, constants


def _fit_chunk(model: torch.nn.Module, runner: AblationRunner, tg: list[AblationTarget], st: list[list[dict]],
               mean_v: dict, zero_v: dict, data: _Data, readout: Readout, cfg: OptimalAblationConfig, b: int,
               copies: int, bar: Any) -> _ChunkFit:
    """Train ``copies`` constants per target and keep, per target, the one with the lowest training loss.

    Copy 0 starts at ``cfg.init``, copies ``c >= 1`` at the site's activation on a random training
    example (on-distribution restarts). The mean is kept instead when its training loss is lower
    (beyond float noise). Without training (``steps=0``) the initial constant is kept.
    """
    if not cfg.steps > 0:
        return _ChunkFit(fitted=dict(mean_v if cfg.init == "mean" else zero_v), chosen=[f"init:{cfg.init}"] * len(tg),
                         final_loss=[float("nan")] * len(tg), tr_best=None, tr_mean=None,
                         restart_deltas=[[] for _ in tg])
    cp = [(t, c) for t in range(len(tg)) for c in range(copies)]
    trainer = AblationRunner(model, [tg[t] for t, _ in cp], readout)
    init_v, st_cp = {}, []
    starts = {t: restart_examples(tg[t].label, cfg.seed, copies - 1, data.n_tr) for t in range(len(tg))}
    for q, (t, c) in enumerate(cp):
        st_cp.append(st[t])
        ex = starts[t][c - 1] if c > 0 else None
        for j, u in enumerate(tg[t].units):
            if c == 0:
                init_v[(q, j)] = (mean_v if cfg.init == "mean" else zero_v)[(t, j)]
            else:
                init_v[(q, j)] = u.coords(data.acts_tr[u.raw][ex : ex + 1])[0].to(data.device)
    fitted_cp, final_cp = train_chunk(trainer, cfg, st_cp, init_v, data.kw_tr, data.pos_tr, data.ref_tr, data.n_tr,
                                      b, bar)
    tr_cp = evaluate_constants(trainer, cfg.loss, data.kw_tr, data.pos_tr, data.ref_tr, data.pred_tr, cfg.max_rows,
                               fitted_cp)
    del trainer
    tr_mean = evaluate_constants(runner, cfg.loss, data.kw_tr, data.pos_tr, data.ref_tr, data.pred_tr, cfg.max_rows,
                                 mean_v)
    return _choose_constants(tg, cp, fitted_cp, final_cp, tr_cp, tr_mean, mean_v, data.base_loss_tr)


def _choose_constants(tg: list[AblationTarget], cp: list[tuple[int, int]], fitted_cp: dict, final_cp: list[float],
                      tr_cp: dict, tr_mean: dict, mean_v: dict, base_loss_tr: float) -> _ChunkFit:
    """Per target, the trained copy with the lowest training loss, or the mean when that is lower still."""
    fitted, chosen, final_loss, tr_best = {}, [], [], []
    restart_deltas: list[list[float]] = [[] for _ in tg]
    for t in range(len(tg)):
        qs = [q for q, (tt, _c) in enumerate(cp) if tt == t]
        losses = [tr_cp["loss"][q] for q in qs]
        restart_deltas[t] = [x - base_loss_tr for x in losses]
        best = qs[int(np.argmin(losses))]
        # keep the best trained constant unless the mean has a lower *training* loss
        # (beyond float noise: ties keep the trained constant)
        if tr_mean["loss"][t] < min(losses) - 1e-6 * abs(min(losses)):
            tag, best_loss = "mean", tr_mean["loss"][t]
            fitted.update({(t, j): mean_v[(t, j)] for j in range(len(tg[t].units))})
        else:
            c = cp[best][1]
            tag = "trained" if c == 0 else f"trained:restart{c}"
            best_loss = min(losses)
            fitted.update({(t, j): fitted_cp[(best, j)] for j in range(len(tg[t].units))})
        chosen.append(tag)
        final_loss.append(final_cp[best])
        tr_best.append(best_loss)
    return _ChunkFit(fitted=fitted, chosen=chosen, final_loss=final_loss, tr_best=tr_best, tr_mean=tr_mean,
                     restart_deltas=restart_deltas)


def _evaluate_chunk(runner: AblationRunner, cfg: OptimalAblationConfig, data: _Data, fitted: dict, mean_v: dict,
                    zero_v: dict, src: torch.Tensor) -> dict[str, dict]:
    """Loss and flip rate of every ablation kind (``"opt"`` and the baselines) on the evaluation data."""
    args_ev = (runner, cfg.loss, data.kw_ev, data.pos_ev, data.ref_ev, data.pred_ev, cfg.max_rows)
    ev: dict[str, dict] = {}
    if "mean" in cfg.baselines:
        ev["mean"] = evaluate_constants(*args_ev, mean_v)
    if "zero" in cfg.baselines:
        ev["zero"] = evaluate_constants(*args_ev, zero_v)
    if cfg.steps == 0 and cfg.init in ev:  # the constant is still its initial value
        ev["opt"] = ev[cfg.init]
    else:
        ev["opt"] = evaluate_constants(*args_ev, fitted)
    if "resample" in cfg.baselines:
        ev["resample"] = evaluate_resample(*args_ev, data.acts_tr, src)
    return ev


def _chunk_records(tg: list[AblationTarget], st: list[list[dict]], fit: _ChunkFit, ev: dict[str, dict], data: _Data,
                   cfg: OptimalAblationConfig, copies: int, train_s: float) -> list[dict]:
    """One record per target of the chunk (see :class:`OptimalAblationResult`)."""
    records = []
    for t in range(len(tg)):
        rec: dict[str, Any] = {
            "site": tg[t].label,
            "sites": [s.to_dict() for s in tg[t].sites],
            "width": int(sum(u.width for u in tg[t].units)),
            "loss": cfg.loss,
            "delta_opt": ev["opt"]["loss"][t] - data.base_loss_ev,
        }
        for kind in ABLATION_KINDS:
            rec[f"delta_{kind}"] = (ev[kind]["loss"][t] - data.base_loss_ev) if kind in ev else None
        rec["flip_opt"] = ev["opt"]["flip"][t]
        for kind in ABLATION_KINDS:
            rec[f"flip_{kind}"] = ev[kind]["flip"][t] if kind in ev else None
        rec.update({
            "train_delta_opt": None if fit.tr_best is None else fit.tr_best[t] - data.base_loss_tr,
            "train_delta_mean": None if fit.tr_mean is None else fit.tr_mean["loss"][t] - data.base_loss_tr,
            "train_delta_restarts": fit.restart_deltas[t],
            "chosen": fit.chosen[t],
            "final_batch_loss": fit.final_loss[t],
            "steps": int(cfg.steps),
            "restarts": copies - 1,
            "lr": [s["lr"] for s in st[t]],
            "n_train": data.n_tr,
            "n_eval": data.n_ev,
            "chunk_seconds": train_s,
            "parallel_sites": len(tg),
        })
        records.append(rec)
    return records


# ============================================================================ step 6: the result
def _assemble_result(model: torch.nn.Module, targets: Sequence[AblationTarget], records: list[dict],
                     constants: dict[str, list[np.ndarray]], cfg: OptimalAblationConfig, readout: Readout,
                     runtime: float, split: _Split, bases: Mapping[str, Any] | None) -> OptimalAblationResult:
    """The :class:`OptimalAblationResult` (bases kept only where a site uses them)."""
    bases_np = {k: np.asarray(v, dtype=np.float32) for k, v in (bases or {}).items()
                if any(s.basis == k for t in targets for s in t.sites)}
    return OptimalAblationResult(
        records=records,
        sites=[t.sites for t in targets],
        constants=constants,
        config={**cfg.to_dict(), "readout": readout.to_dict() if hasattr(readout, "to_dict") else str(readout)},
        runtime_s=runtime,
        evaluated_on=split.evaluated_on,
        bases=bases_np,
        eval_index=None if split.eval_index is None else split.eval_index.tolist(),
        model=model,
    )
