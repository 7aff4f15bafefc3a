"""Training and evaluation of the constants of a chunk of targets (AdamW in parallel; loss and flip rates).

Each function works on an :class:`~._runner.AblationRunner` whose targets are trained or evaluated
together: the batch is replicated once per target and copy ``t`` is ablated at target ``t`` only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from ...data import index_inputs, inputs_len
from ...errors import ModelError, SiteError
from ._config import OptimalAblationConfig
from ._forward import check_finite, per_row_loss
from ._runner import AblationRunner


def _pack_saved(t: torch.Tensor) -> torch.Tensor:
    """Saved-tensor hook: copy activations that depend on the constants (see :func:`train_chunk`)."""
    return t.clone() if t.grad_fn is not None else t


def _unpack_saved(t: torch.Tensor) -> torch.Tensor:
    """Saved-tensor hook: hand the saved copy back unchanged."""
    return t


def restart_examples(label: str, seed: int, n: int, n_tr: int) -> list[int]:
    """Training examples whose activations start the restarts of a site (depends on the site and seed only)."""
    if n <= 0:
        return []
    gen = torch.Generator().manual_seed((zlib.crc32(label.encode("utf-8")) * 1_000_003 + int(seed)) % (2**63))
    return [int(i) for i in torch.randint(0, n_tr, (n,), generator=gen)]


def train_chunk(
    runner: AblationRunner,
    cfg: OptimalAblationConfig,
    st: list[list[dict]],
    init_v: Mapping[tuple[int, int], torch.Tensor],
    kw_tr: Mapping[str, torch.Tensor],
    pos_tr: Mapping[tuple, torch.Tensor],
    ref_tr: torch.Tensor,
    n_tr: int,
    b: int,
    bar: Any,
) -> tuple[dict, list[float]]:
    """AdamW on every constant of the chunk at once (batch replicated once per target).

    Every chunk draws the same mini-batch sequence (seeded by ``cfg.seed``), so a site's training
    does not depend on which other sites share its chunk.

    Parameters
    ----------
    runner : AblationRunner
        Over the chunk's targets (one per training copy).
    cfg : OptimalAblationConfig
    st : list of list of dict
        Per target and unit: ``"lr"`` and ``"step_scale"`` (k,) (whitened steps).
    init_v : dict of (t, j) to Tensor (k,)
        Initial constant of unit ``j`` of target ``t``.
    kw_tr, pos_tr, ref_tr
        Training inputs (on the device), hook positions ``(n_tr,)`` and loss references.
    n_tr, b : int
        Training examples and mini-batch size (``b >= n_tr``: full batch).
    bar : tqdm or None
        Advanced once per step.

    Returns
    -------
    fitted : dict of (t, j) to Tensor (k,)
        The trained constants.
    last : list of float
        The last mini-batch loss per target (NaN with ``steps=0``).
    """
    g = torch.Generator().manual_seed(int(cfg.seed) + 1)
    T = len(runner.targets)
    units = list(init_v)
    if int(cfg.steps) == 0:
        return {u: v.detach().clone() for u, v in init_v.items()}, [float("nan")] * T
    # a = a0 + s * z, z trained (s = 1 and lr = lr for an explicit lr; whitened steps for "auto")
    zs = {u: torch.zeros_like(init_v[u], requires_grad=True) for u in units}
    steps = int(cfg.steps)
    opt, sched = _optimizer(zs, st, steps)

    def values() -> dict:
        return {(t, j): init_v[(t, j)] + st[t][j]["step_scale"] * zs[(t, j)] for (t, j) in units}

    target_of_row = torch.arange(T).repeat_interleave(b).to(runner.device)
    full = b >= n_tr
    last = [float("nan")] * T
    for step in range(steps):
        idx = torch.arange(n_tr) if full else torch.randperm(n_tr, generator=g)[:b]
        rows = idx.repeat(T).to(runner.device)
        per_target = _batch_loss(runner, cfg.loss, kw_tr, pos_tr, ref_tr, rows, target_of_row, values(), b, step)
        opt.zero_grad(set_to_none=True)
        total = per_target.sum()
        if total.requires_grad:
            total.backward()
        if step == 0:
            _check_gradients(runner, zs)
        opt.step()
        sched.step()
        last = per_target.detach().cpu().tolist()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        fitted = {u: v.detach().clone() for u, v in values().items()}
    return fitted, last


def _optimizer(zs: Mapping[tuple[int, int], torch.Tensor], st: list[list[dict]], steps: int) -> tuple[Any, Any]:
    """AdamW over the whitened coordinates ``zs`` (one parameter group per learning rate) and its cosine decay to 0."""
    by_lr: dict[float, list] = {}
    for (t, j) in zs:
        by_lr.setdefault(st[t][j]["lr"], []).append(zs[(t, j)])
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in by_lr.items()], weight_decay=0.0, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def _batch_loss(runner: AblationRunner, loss: str, kw_tr: Mapping[str, torch.Tensor], pos_tr: Mapping[tuple, torch.Tensor],
                ref_tr: torch.Tensor, rows: torch.Tensor, target_of_row: torch.Tensor, values: Mapping, b: int,
                step: int) -> torch.Tensor:
    """Mean loss per target ``(T,)`` of one mini-batch (``rows``: the batch replicated once per target)."""
    T = len(runner.targets)
    kw = index_inputs(kw_tr, rows)
    pos = {r: p[rows] for r, p in pos_tr.items()}
    # pyvene writes interventions *in place* into module outputs; when a later site's hook
    # overwrites a tensor that an earlier op saved for its backward (e.g. a ReLU's output),
    # autograd refuses. Saving copies of the activations that depend on the constants (never
    # of weights or inputs) keeps every site's gradient exact.
    with torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved):
        logits = runner.logits(kw, pos, target_of_row, values)
        per_row = per_row_loss(loss, logits, ref_tr[rows])
    per_target = per_row.view(T, b).mean(1)
    if not torch.isfinite(per_target).all():
        bad = [runner.targets[t].label for t in range(T) if not torch.isfinite(per_target[t])]
        raise ModelError(
            f"optimal ablation loss became non-finite (NaN or inf) at step {step} for {bad[:5]}; "
            "check the model for NaN outputs or lower lr= / lr_scale="
        )
    return per_target


def _check_gradients(runner: AblationRunner, zs: Mapping[tuple[int, int], torch.Tensor]) -> None:
    """Raise :class:`~pyvene_plot.SiteError` for targets whose constant received no gradient (after step 0)."""
    # a constant off the autograd graph does not reach the read-out (an exactly zero gradient is
    # legitimate: a site the output does not depend on has Δ = 0)
    dead = [runner.targets[t].label for t in range(len(runner.targets))
            if any(zs[(t, j)].grad is None for j in range(len(runner.targets[t].units)))]
    if dead:
        raise SiteError(
            f"site(s) {dead[:5]} receive no gradient: their constant is not on the path to the read-out "
            "(the hooked module's output is discarded, or its hook did not fire when intervening). Choose "
            "a component whose output feeds the model's output"
        )


@torch.no_grad()
def evaluate_constants(runner: AblationRunner, loss: str, kw: Mapping[str, torch.Tensor], pos: Mapping[tuple, torch.Tensor],
                       ref: torch.Tensor, pred: torch.Tensor, max_rows: int, values: Mapping) -> dict:
    """Mean per-target loss and flip rate on ``kw`` (each target ablated on its own copy of the data).

    ``pos`` holds each hook's positions ``(n,)``, ``ref`` the loss references, ``pred`` the clean
    argmax ``(n,)`` and ``values[(t, j)]`` the constant ``(k,)`` of unit ``j`` of target ``t``.
    Returns ``{"loss": [T floats], "flip": [T floats]}``.
    """
    T = len(runner.targets)
    n = inputs_len(kw)
    tables = runner.tables(values)
    sums = torch.zeros(T, dtype=torch.float64)
    flips = torch.zeros(T, dtype=torch.float64)
    total = T * n
    step = max(1, int(max_rows))
    for s in range(0, total, step):
        flat = torch.arange(s, min(s + step, total))
        t_of = flat // n
        ex = (flat % n).to(runner.device)
        logits = runner.logits(index_inputs(kw, ex), {r: p[ex] for r, p in pos.items()}, t_of.to(runner.device),
                               values, tables=tables)
        check_finite(logits, "an ablated forward pass")
        sums.index_add_(0, t_of, per_row_loss(loss, logits, ref[ex]).double().cpu())
        flips.index_add_(0, t_of, (logits.argmax(-1) != pred[ex]).double().cpu())
    return {"loss": (sums / n).tolist(), "flip": (flips / n).tolist()}


@torch.no_grad()
def evaluate_resample(runner: AblationRunner, loss: str, kw: Mapping[str, torch.Tensor], pos: Mapping[tuple, torch.Tensor],
                      ref: torch.Tensor, pred: torch.Tensor, max_rows: int, acts_tr: Mapping[tuple, torch.Tensor],
                      src: torch.Tensor) -> dict:
    """Resample ablation: each evaluation example gets the site's activation of ``R`` training examples.

    Arguments as in :func:`evaluate_constants`; ``acts_tr[hook]`` holds the training activations
    ``(n_tr, d)`` and ``src`` ``(R, n)`` the training example resampled for each draw and
    evaluation example.
    """
    T = len(runner.targets)
    R, n = src.shape
    sums = torch.zeros(T, dtype=torch.float64)
    flips = torch.zeros(T, dtype=torch.float64)
    total = T * R * n
    step = max(1, int(max_rows))
    src_flat = src.reshape(-1)  # (R*n,), index r*n + i
    for s in range(0, total, step):
        flat = torch.arange(s, min(s + step, total))
        t_of = flat // (R * n)
        rem = flat % (R * n)
        ex = (rem % n).to(runner.device)
        sx = src_flat[rem]
        row_acts = {h: acts_tr[h][sx.to(acts_tr[h].device)].to(runner.device) for h in runner.hooks}
        logits = runner.logits(index_inputs(kw, ex), {r: p[ex] for r, p in pos.items()}, t_of.to(runner.device),
                               row_acts=row_acts)
        check_finite(logits, "a resample-ablated forward pass")
        sums.index_add_(0, t_of, per_row_loss(loss, logits, ref[ex]).double().cpu())
        flips.index_add_(0, t_of, (logits.argmax(-1) != pred[ex]).double().cpu())
    return {"loss": (sums / (R * n)).tolist(), "flip": (flips / (R * n)).tolist()}
