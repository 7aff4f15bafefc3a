"""What a fitted L3D answers: reconstruction error, activation frequency, attributions, output
derivatives, perturbations and alignment with known directions.

:class:`SubnetworkAnalysis` is the part of :class:`~pyvene_plot.methods.l3d.L3D` that uses a fitted
decomposition; it relies on the fitted state (``config_``, ``param_names_``, ``encoder_``,
``decoder_``, ...) and on ``_require_fit`` / ``_require_model`` / ``_flat`` of the estimator.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import jvp

from ...errors import ModelError
from ._alignment import subnetwork_alignment
from ._config import Inputs, L3DConfigError, L3DInputError
from ._oracle import batch_topk_mask, check_output, gradient_batches, n_samples, take_samples


class SubnetworkAnalysis:
    """Methods of :class:`~pyvene_plot.methods.l3d.L3D` that use the fitted subnetworks (a mixin)."""

    # ------------------------------------------------------------------ analysis
    def evaluate(self, inputs: Inputs, seed: int | None = None, top_k: float | None = None) -> dict[str, Any]:
        """The training objective on ``inputs``, without updates.

        Batches of ``config.batch_size`` in a seeded random order, one random other sample of the same
        batch as each sample's reference, batch top-k with fraction ``top_k`` (default
        ``config.top_k``).

        Parameters
        ----------
        inputs : Tensor (N, ...), dict or tuple of Tensors
        seed : int, optional
            Seed of batch order and references (default ``config.seed + 1``).
        top_k : float, optional
            Top-k fraction (1.0 gives the dense reconstruction error).

        Returns
        -------
        dict
            ``reconstruction_error`` (float, ``Σ‖g−ĝ‖² / Σ‖g‖²``), ``p_act`` (Tensor (n_v,)),
            ``coefficients`` (Tensor (N, n_v), ``V_in g`` before the top-k, rows in input order),
            ``mask`` (BoolTensor (N, n_v)), ``n_samples``.
        """
        oracle = self._require_model()
        n = n_samples(inputs)
        if n < 2:
            raise L3DInputError(f"need at least 2 samples (references are other samples), got {n}")
        frac = self.config_.top_k if top_k is None else float(top_k)
        if not 0.0 < frac <= 1.0:
            raise L3DConfigError(f"top_k={top_k!r} is invalid: use a fraction in (0, 1]")
        gen = torch.Generator().manual_seed(int(self.config_.seed + 1 if seed is None else seed))
        v_in = self._flat(self.encoder_, oracle.device)  # type: ignore[arg-type]
        v_out = self._flat(self.decoder_, oracle.device)  # type: ignore[arg-type]
        k = self.config_.n_subnetworks
        coef = torch.zeros(n, k)
        mask_all = torch.zeros(n, k, dtype=torch.bool)
        err = tot = 0.0
        with torch.no_grad():
            for g, idx in gradient_batches(oracle, self.config_, inputs, n, gen, shuffle=True, keep_index=True):
                c = g @ v_in.T
                mask = batch_topk_mask(c, frac)
                g_hat = (c * mask) @ v_out
                err += float((g - g_hat).pow(2).sum())
                tot += float(g.pow(2).sum())
                coef[idx] = c.cpu()
                mask_all[idx] = mask.cpu()
        return {"reconstruction_error": err / tot if tot > 0 else float("nan"),
                "p_act": mask_all.float().mean(0), "coefficients": coef, "mask": mask_all, "n_samples": n}

    def reconstruction_error(self, inputs: Inputs, seed: int | None = None, top_k: float | None = None) -> float:
        """Normalised L2 reconstruction error ``Σ‖g−ĝ‖² / Σ‖g‖²`` on ``inputs`` (see :meth:`evaluate`)."""
        return float(self.evaluate(inputs, seed=seed, top_k=top_k)["reconstruction_error"])

    def activation_frequency(self, inputs: Inputs, seed: int | None = None) -> torch.Tensor:
        """``P_act`` (n_v,) on ``inputs``: fraction of samples on which each subnetwork is in the top-k."""
        return self.evaluate(inputs, seed=seed)["p_act"]

    def attributions(self, inputs: Inputs, n_references: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Impact of each subnetwork on each sample: ``I(x_i, v_k) = mean_j |V_in[k] · ∇_W D(f(x_i), f(x_j))|``.

        Parameters
        ----------
        inputs : Tensor (N, ...), dict or tuple of Tensors
            ``N >= 2``; references ``x_j`` are drawn uniformly among the *other* samples of ``inputs``.
        n_references : int, optional
            ``n_j`` (default ``config.n_references``).
        seed : int, optional
            Seed of the reference draw (default ``config.seed + 2``).

        Returns
        -------
        Tensor, shape (N, n_subnetworks)
            Non-negative; large where the sample's loss landscape moves along ``v_k``.
        """
        oracle = self._require_model()
        n = n_samples(inputs)
        if n < 2:
            raise L3DInputError(f"need at least 2 samples (references are other samples), got {n}")
        n_ref = self.config_.n_references if n_references is None else int(n_references)
        if n_ref < 1:
            raise L3DConfigError(f"n_references={n_references!r} is invalid: use an int >= 1")
        gen = torch.Generator().manual_seed(int(self.config_.seed + 2 if seed is None else seed))
        v_in = self._flat(self.encoder_, oracle.device)  # type: ignore[arg-type]
        out = torch.zeros(n, self.config_.n_subnetworks)
        step = self.config_.chunk_size
        for _ in range(n_ref):
            ref_idx = (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n
            for a in range(0, n, step):
                idx = torch.arange(a, min(n, a + step))
                x = take_samples(inputs, idx, oracle.device)
                y_ref = oracle.outputs(take_samples(inputs, ref_idx[idx], oracle.device))
                check_output(y_ref, "reference outputs")
                g = oracle.grads(x, y_ref)
                out[idx] += (g @ v_in.T).abs().cpu()
        return out / n_ref

    def output_derivative(self, inputs: Inputs, index: int) -> torch.Tensor:
        """``∂_δ f(x; W0 + δ v_k)`` at ``δ = 0`` (a Jacobian-vector product), shape (N, *output).

        The outputs with the largest ``|·|`` are the ones subnetwork ``index`` drives on each sample.
        """
        oracle = self._require_model()
        k = self._check_index(index)
        n = n_samples(inputs)
        tangent = {nm: self.decoder_[nm][k].to(oracle.device) for nm in self.param_names_}  # type: ignore[index]
        outs = []
        for a in range(0, n, self.config_.chunk_size):
            x = take_samples(inputs, torch.arange(a, min(n, a + self.config_.chunk_size)), oracle.device)
            _, d = jvp(lambda p, x=x: oracle.call(p, x), (oracle.params0,), (tangent,))
            outs.append(d.detach().cpu())
        return torch.cat(outs)

    def _check_index(self, index: int) -> int:
        """``index`` as a subnetwork index in ``[0, n_v)`` (negative indices count from the end)."""
        self._require_fit()
        k = self.config_.n_subnetworks
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -k <= index < k:
            raise L3DConfigError(f"subnetwork index {index!r} is out of range: use an int in [0, {k})")
        return int(index) % k

    def _direction(self, index: int | Sequence[int], delta: float | Sequence[float]) -> dict[str, torch.Tensor]:
        """``Σ δ_k v_k`` per decomposed tensor."""
        idx = [index] if isinstance(index, (int, np.integer)) else list(index)
        if not idx:
            raise L3DConfigError("index is empty: give a subnetwork index or a non-empty list of them")
        deltas = [float(delta)] * len(idx) if isinstance(delta, (int, float)) else [float(d) for d in delta]
        if len(deltas) != len(idx):
            raise L3DConfigError(f"got {len(idx)} subnetwork indices but {len(deltas)} deltas; give one delta per index")
        ks = [self._check_index(i) for i in idx]
        return {n: sum(d * self.decoder_[n][k] for k, d in zip(ks, deltas)) for n in self.param_names_}  # type: ignore[index]

    def perturb(self, model: nn.Module, index: int | Sequence[int], delta: float | Sequence[float]) -> nn.Module:
        """A deep copy of ``model`` with its decomposed parameters moved to ``W + Σ δ_k v_k``.

        Parameters
        ----------
        model : nn.Module
            The model to start from (normally the fitted one; the decomposed tensors must match by name
            and shape). It is not modified.
        index : int or sequence of int
            Subnetwork(s) ``k``.
        delta : float or sequence of float
            Step(s) ``δ`` (the subnetworks are unit norm, so ``δ`` is the Euclidean length of the move;
            the sign of ``v_k`` is arbitrary, so try both signs).

        Returns
        -------
        nn.Module
            The perturbed copy. For large models use :meth:`perturbed`, which edits in place and restores.
        """
        self._require_fit()
        direction = self._direction(index, delta)
        named = dict(model.named_parameters())
        self._check_match(named)
        clone = copy.deepcopy(model)
        cnamed = dict(clone.named_parameters())
        with torch.no_grad():
            for n, d in direction.items():
                cnamed[n].add_(d.to(device=cnamed[n].device, dtype=cnamed[n].dtype))
        return clone

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, index: int | Sequence[int], delta: float | Sequence[float]) -> Iterator[nn.Module]:
        """Context manager: ``model`` moved in place to ``W + Σ δ_k v_k`` inside the block, restored on exit.

        >>> with l3d.perturbed(model, 0, 0.5) as m:   # doctest: +SKIP
        ...     y = m(x)
        """
        self._require_fit()
        direction = self._direction(index, delta)
        named = dict(model.named_parameters())
        self._check_match(named)
        saved = {n: named[n].detach().clone() for n in direction}
        try:
            with torch.no_grad():
                for n, d in direction.items():
                    named[n].add_(d.to(device=named[n].device, dtype=named[n].dtype))
            yield model
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    named[n].copy_(v)

    def _check_match(self, named: Mapping[str, torch.Tensor]) -> None:
        """Refuse a model whose decomposed tensors differ in name or shape from the fitted ones."""
        for n, s in zip(self.param_names_, self.param_shapes_):
            if n not in named or tuple(named[n].shape) != s:
                got = tuple(named[n].shape) if n in named else "missing"
                raise ModelError(f"model does not match the decomposition: parameter {n!r} expected shape {s}, got {got}")

    def alignment(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``|cos|`` between every subnetwork and every reference direction (see :func:`subnetwork_alignment`)."""
        return subnetwork_alignment(self.subnetworks, directions)
