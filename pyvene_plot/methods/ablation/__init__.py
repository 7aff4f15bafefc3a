"""Optimal ablation (OA; Li & Janson 2024) as pyvene interventions, and ablation-gap reports.

Ablating a component ``A`` (a site: a layer's activation at a token position, a subset of its
coordinates, or the span of an orthonormal basis) replaces it by a value ``a`` that carries no
information about the input. The *ablation loss gap* is::

    Δ(A; a) = E_x L(M_{A←a}(x)) − E_x L(M(x))

with ``L`` by default the KL divergence ``KL(p_M(x) ‖ p_{M, A←a}(x))`` between the clean and the
ablated read-out distributions (so ``E_x L(M(x)) = 0``). The classical choices of ``a`` are zero,
the dataset mean, and a resampled activation ``A(x')`` of an independent input ``x'``. *Optimal*
ablation learns the constant::

    a* = argmin_a E_x L(M_{A←a}(x)),        Δ_opt = Δ(A; a*)

so ``Δ_opt ≤ Δ_zero``, ``Δ_opt ≤ Δ_mean`` and ``Δ_opt ≤ Δ_resample`` (population quantities): OA
removes the component's information while choosing the least misleading value for the rest of the
network (no "spoofing" by off-distribution values such as 0 or the mean).

What is here:

* :class:`~pyvene_plot.interventions.OptimalAblationIntervention` (defined in
  :mod:`pyvene_plot.interventions`, re-exported here): a trainable, *sourceless* pyvene intervention holding the
  constant ``a`` (``nn.Parameter``). Modes: the whole vector (``h ← a``), selected coordinates
  (``h[..., dims] ← a``) or the span of orthonormal rows ``V`` (``h ← h + (a − h Vᵀ) V``). It saves
  and loads with ``IntervenableModel.save`` / ``pyvene.IntervenableModel.load`` (shapes, mode,
  coordinates, basis and position all live in the ``state_dict``).
* :func:`optimal_ablation`: Δ_opt next to Δ_zero, Δ_mean and Δ_resample for many sites, training
  every site's constant *in parallel* (the batch is replicated once per site and each copy is
  ablated at one site only; the joint loss is a sum of independent terms, and AdamW is
  per-coordinate, so this is exactly independent training).
* :func:`necessity_check`: Δ_opt of the sites of PLOT handles (a deletion-style test that needs no
  counterfactual pairs) next to the exact optimal ablation of the variable in the causal model
  (pass a dict or list of handles, or an ``AlignmentResult``).
* :func:`screen_mean` / :func:`screen_oa`: site screeners for
  :class:`~pyvene_plot.progressive.ProgressiveScheduler` stages (``Stage(..., screen="oa")``);
  importing this package registers them as ``"mean"`` and ``"oa"``.

Which data the gaps are measured on: by default the bank's base inputs are split once (seeded):
constants and the mean/resample statistics come from the *training* part, and all four gaps are
evaluated on the *held-out* part (``holdout=0.5``), so Δ_opt is not flattered by fitting the
evaluation data. ``holdout=0`` evaluates on the training examples themselves (then the recorded
``evaluated_on`` says so), and ``eval_bank=`` evaluates on another bank.

Modules: ``_config`` (losses, :class:`OptimalAblationConfig`), ``_targets`` (sites -> per-hook
units), ``_forward`` (:func:`run_ablated`, clean read-outs, losses), ``_runner`` (one pyvene model
ablating many targets), ``_train`` (AdamW and evaluation of a chunk), ``_fit``
(:func:`optimal_ablation` and its steps), ``_result`` (:class:`OptimalAblationResult`),
``_necessity`` (:func:`necessity_check`, :class:`NecessityResult`), ``_screen`` (the screeners).
"""

from __future__ import annotations

from ...interventions import OptimalAblationIntervention
from ._config import ABLATION_KINDS, ABLATION_LOSSES, OptimalAblationConfig
from ._fit import optimal_ablation
from ._forward import (
    check_finite,
    clean_logits,
    loss_reference,
    per_row_loss,
    row_locations,
    run_ablated,
)
from ._necessity import NecessityResult, necessity_check
from ._result import FORMAT_VERSION, OptimalAblationResult, restore_nonfinite
from ._runner import AblationRunner
from ._screen import (  # registers "mean" and "oa"
    SCREEN_ABS_TOL,
    SCREEN_REL_TOL,
    screen_mean,
    screen_oa,
)
from ._targets import AblationTarget, AblationUnit, SiteLike, build_targets
from ._train import evaluate_constants, evaluate_resample, restart_examples, train_chunk

__all__ = [
    "ABLATION_LOSSES", "ABLATION_KINDS", "SCREEN_ABS_TOL", "SCREEN_REL_TOL", "FORMAT_VERSION",
    "OptimalAblationIntervention", "run_ablated", "OptimalAblationConfig", "SiteLike", "optimal_ablation",
    "OptimalAblationResult", "NecessityResult", "necessity_check", "screen_mean", "screen_oa",
    # building blocks (used across the modules of this package)
    "AblationUnit", "AblationTarget", "build_targets", "AblationRunner", "row_locations", "clean_logits",
    "check_finite", "per_row_loss", "loss_reference", "train_chunk", "evaluate_constants", "evaluate_resample",
    "restart_examples", "restore_nonfinite",
]
