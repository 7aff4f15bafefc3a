"""Local Loss Landscape Decomposition (L3D): sparse, low-rank subnetworks in parameter space.

L3D (Chrisman, Bushnaq & Sharkey 2025, arXiv 2504.00194) asks which *directions in parameter space*
a model uses on which inputs. For every sample ``x_i`` it takes the gradient, at the trained parameters
``W0``, of a divergence between the model's output and a reference output ``y_r = f(x_r)`` of a random
other sample of the batch (``reference="random"``, the paper's choice; ``"mean"`` and ``"zero"`` are
offered as variants)::

    g_i = ∇_W D(f(x_i; W), y_r) |_{W = W0}                           (one vector of n_w numbers)

and learns ``n_v`` parameter directions whose *sparse* combinations reconstruct those gradients:

* an encoder ``V_in`` (n_v × n_w) gives coefficients ``c_i = V_in g_i``;
* **batch top-k** keeps the ``⌈k · B · n_v⌉`` largest ``|c|`` of a batch of ``B`` samples (k = 0.1);
* a decoder ``V_out`` (n_w × n_v) reconstructs ``ĝ_i = V_out (c_i ⊙ mask_i)``;
* the loss is the normalised L2 error ``Σ_i ‖g_i − ĝ_i‖² / Σ_i ‖g_i‖²``, and after every step each
  subnetwork (a column of ``V_out`` across all parameter tensors) is renormalised to unit norm.

Each subnetwork's slice of each parameter tensor is low rank: a Tucker product
``G ×_1 U⁽¹⁾ ×_2 … ×_N U⁽ᴺ⁾`` with core ``G`` of shape ``R_1 × … × R_N`` (rank 1 for toy models,
about a tenth of each dimension for real ones); encoder and decoder are separate Tucker
parametrisations, initialised identically.

What you get back (:class:`L3D`):

* :attr:`L3D.subnetworks` — ``v_k``, parameter-shaped, unit norm over all decomposed tensors (the sign
  is arbitrary: ``v_k`` and ``−v_k`` are the same subnetwork);
* :attr:`L3D.p_act` — how often each subnetwork survives the top-k (0 = dead subnetwork);
* :meth:`L3D.attributions` — the impact ``I(x_i, v_k) = mean_j |V_in[k] · ∇_W D(f(x_i), y_j)|`` over
  ``n_j`` random references;
* :meth:`L3D.perturb` — a copy of the model moved to ``W0 + δ v_k``;
  :meth:`L3D.output_derivative` — ``∂_δ f(x; W0 + δ v_k)`` at ``δ = 0`` (which outputs a subnetwork
  drives);
* :meth:`L3D.evaluate` / :meth:`L3D.reconstruction_error` — the training objective on given inputs.

How this relates to PLOT: PLOT localises *variables of a causal model* in *activation space* with
interchange interventions; L3D finds *mechanisms* in *parameter space* and intervenes by moving
weights, with no base/source counterfactual semantics. It answers a different question (which weights
implement the computation used on these inputs) and is offered next to PLOT, not inside its pipeline.

Cost: every step needs ``B`` per-sample gradients (memory ``O(B · n_w)``, computed with
:func:`torch.func.vmap` over :func:`torch.func.grad` of a :func:`torch.func.functional_call`, in groups of
``chunk_size`` samples); encoding and decoding materialise the ``n_v`` subnetworks (``O(n_v · n_w)``).
This is cheap for toy models and single blocks; decompose one block of a large model, not all of it.

Implementation notes: Adam on the encoder and decoder Tucker factors with a StepLR schedule; the
unit-norm renormalisation after each step rescales the Tucker cores (the factors are rebalanced to
unit-norm columns once per epoch, which leaves the tensors unchanged); the top-k mask is a constant in
the backward pass (gradients flow through the kept coefficients only); ``W0`` of the decomposed tensors is
snapshotted at :meth:`L3D.fit`. :meth:`L3D.perturb` returns a perturbed deep copy;
:meth:`L3D.perturbed` is the in-place context manager for models too large to copy.

Reimplemented from the paper's description; no code from the authors' repository is used.

Modules: :mod:`._config` (:class:`L3DConfig`, errors, rank specs), :mod:`._parametrization` (Tucker
directions), :mod:`._oracle` (per-sample gradients, batches, batch top-k), :mod:`._fit` (the
:class:`L3D` estimator and its JSON I/O), :mod:`._analysis` (what a fitted decomposition answers),
:mod:`._alignment` (comparison with known directions).
"""

from __future__ import annotations

from ._alignment import match_subnetworks, subnetwork_alignment
from ._config import (
    DIVERGENCES,
    L3D_FORMAT_VERSION,
    REFERENCES,
    SCHEMA,
    Inputs,
    L3DConfig,
    L3DConfigError,
    L3DError,
    L3DInputError,
    L3DNotFittedError,
    RankSpec,
)
from ._fit import L3D
from ._oracle import batch_topk_mask

__all__ = ['SCHEMA', 'DIVERGENCES', 'REFERENCES', 'Inputs', 'RankSpec', 'L3DError', 'L3DConfigError', 'L3DInputError',
           'L3DNotFittedError', 'L3DConfig', 'batch_topk_mask', 'L3D', 'subnetwork_alignment', 'match_subnetworks',
           'L3D_FORMAT_VERSION']
