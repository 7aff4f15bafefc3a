"""The :class:`L3D` estimator: parameters (scikit-learn style), fitting, fitted state and JSON I/O.

The analysis methods of a fitted decomposition live in :mod:`._analysis` (:class:`SubnetworkAnalysis`,
a base class of :class:`L3D`).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._params import ParamsMixin
from ..._utils import resolve_device
from ...errors import ModelError
from ...models import raw_logits
from ._analysis import SubnetworkAnalysis
from ._config import (
    Inputs,
    L3DConfig,
    L3DConfigError,
    L3DInputError,
    L3DNotFittedError,
    RankSpec,
    resolve_ranks,
)
from ._oracle import GradientOracle, batch_topk_mask, gradient_batches, n_samples
from ._parametrization import Directions, split_directions
from ._serialization import FittedStateIO

logger = logging.getLogger(__name__)


class L3D(ParamsMixin, SubnetworkAnalysis, FittedStateIO):
    """Local Loss Landscape Decomposition of a model into sparse, low-rank parameter-space subnetworks.

    scikit-learn conventions: every constructor parameter is stored unchanged as an attribute of the
    same name, :meth:`get_params` is derived from this signature, ``set_params(**get_params())``
    round-trips, and :meth:`fit` returns ``self``.

    Parameters
    ----------
    config : L3DConfig or dict, optional
        Hyper-parameters (see :class:`L3DConfig`).
    n_subnetworks, ranks, top_k, warm_start_k, warm_start_epochs, epochs, batch_size, lr, lr_step_epochs, \
lr_gamma, divergence, reference, params, n_references, chunk_size, seed, device : optional
        Individual :class:`L3DConfig` fields, e.g. ``L3D(n_subnetworks=5, epochs=200)``; each one given
        (not ``None``) overrides ``config``; ``None`` takes the value from ``config``, else
        :class:`L3DConfig`'s default. An unknown keyword raises :class:`L3DConfigError`.

    Attributes
    ----------
    resolved_config : L3DConfig
        ``config`` with the given fields applied (validated at construction and by :meth:`set_params`).
    config_ : L3DConfig
        The configuration the decomposition was fitted (or loaded) with.
    param_names_ : list of str
        Decomposed tensors, in order.
    param_shapes_ : list of tuple
        Their shapes.
    ranks_ : dict of str to tuple of int
        Tucker ranks per decomposed tensor.
    decoder_ : dict of str to Tensor (n_v, *shape)
        ``V_out`` per tensor (the subnetworks, unit norm over all tensors jointly).
    encoder_ : dict of str to Tensor (n_v, *shape)
        ``V_in`` per tensor.
    p_act_ : Tensor, shape (n_v,)
        Fraction of samples of the last epoch on which each subnetwork was in the top-k.
    history_ : list of float
        Mean training loss (normalised L2 reconstruction error) of each epoch.
    train_error_ : float
        ``history_[-1]``.
    n_samples_ : int
        Samples the decomposition was fitted on.
    fit_seconds_ : float
        Wall time of :meth:`fit`.

    Examples
    --------
    >>> from pyvene_plot.methods.toys import train_tms
    >>> toy = train_tms(seed=0)
    >>> l3d = L3D(n_subnetworks=5, epochs=100).fit(toy.model, toy.inputs[:1000], progress=False)
    >>> l3d.subnetworks[0]["W"].shape
    torch.Size([2, 5])
    """

    def __init__(
        self,
        config: L3DConfig | Mapping[str, Any] | None = None,
        *,
        n_subnetworks: int | None = None,
        ranks: RankSpec | None = None,
        top_k: float | None = None,
        warm_start_k: float | None = None,
        warm_start_epochs: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        lr_step_epochs: int | None = None,
        lr_gamma: float | None = None,
        divergence: str | None = None,
        reference: str | None = None,
        params: tuple[str, ...] | None = None,
        n_references: int | None = None,
        chunk_size: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            _raise_unknown(unknown)
        self.config = config
        self.n_subnetworks = n_subnetworks
        self.ranks = ranks
        self.top_k = top_k
        self.warm_start_k = warm_start_k
        self.warm_start_epochs = warm_start_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lr_step_epochs = lr_step_epochs
        self.lr_gamma = lr_gamma
        self.divergence = divergence
        self.reference = reference
        self.params = params
        self.n_references = n_references
        self.chunk_size = chunk_size
        self.seed = seed
        self.device = device
        self.resolved_config = self._resolve_config()
        self._model: nn.Module | None = None
        self._oracle: GradientOracle | None = None
        self._output_fn: Callable[[Any], torch.Tensor] = raw_logits
        self.decoder_: dict[str, torch.Tensor] | None = None
        self.encoder_: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ parameters
    #: get_params / set_params come from :class:`~pyvene_plot._params.ParamsMixin`; unknown names raise this
    params_error = L3DConfigError

    def _validate(self) -> None:
        """Re-resolve the configuration after :meth:`set_params` (raises :class:`L3DConfigError`)."""
        self.resolved_config = self._resolve_config()

    def _resolve_config(self) -> L3DConfig:
        """``config`` (an L3DConfig, a dict or None) with every field given to the constructor applied."""
        config = self.config
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, L3DConfig):
            base = config.to_dict()
        elif isinstance(config, Mapping):
            base = dict(config)
        else:
            raise L3DConfigError(f"config must be an L3DConfig, a dict or None, got {type(config).__name__}")
        base.update({k: getattr(self, k) for k in self._param_names() if k != "config" and getattr(self, k) is not None})
        return L3DConfig.from_dict(base)

    # ------------------------------------------------------------------ setup
    def _select(self, model: nn.Module, cfg: L3DConfig) -> list[str]:
        """Names of the tensors to decompose (``cfg.params`` or every trainable parameter), checked."""
        if not isinstance(model, nn.Module):
            raise ModelError(f"L3D needs a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        if cfg.params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ModelError(
                    f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
                    "L3D decomposes gradients with respect to parameters: unfreeze the block to decompose "
                    "(p.requires_grad_(True)) or pass params=[...] naming trainable tensors"
                )
            return names
        unknown = [n for n in cfg.params if n not in named]
        if unknown:
            avail = list(named)
            raise L3DConfigError(
                f"params {unknown} are not parameters of {type(model).__name__}; valid names include "
                f"{avail[:12]}{' ...' if len(avail) > 12 else ''} (see model.named_parameters())"
            )
        frozen = [n for n in cfg.params if not named[n].requires_grad]
        if frozen:
            raise ModelError(
                f"params {frozen} have requires_grad=False, so they have no gradient to decompose; "
                "call .requires_grad_(True) on them or leave them out of params"
            )
        if len(set(cfg.params)) != len(cfg.params):
            raise L3DConfigError(f"params lists a name twice: {list(cfg.params)}")
        return list(cfg.params)

    def _bind(self, model: nn.Module, names: list[str], output_fn: Callable[[Any], torch.Tensor] | None,
              cfg: L3DConfig) -> None:
        """Attach ``model``: the gradient oracle at its current parameters on ``cfg.device``."""
        dev = cfg.device
        if dev == "auto":
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        else:
            device = resolve_device(dev)
        self._model = model
        self._output_fn = output_fn or raw_logits
        self._oracle = GradientOracle(model, names, device, cfg.divergence, self._output_fn)

    def _prepare_fit(self, model: nn.Module, inputs: Inputs, cfg: L3DConfig
                     ) -> tuple[list[str], list[tuple[int, ...]], list[tuple[int, ...]], int]:
        """Check the model, ranks and inputs: decomposed names, their shapes, their Tucker ranks, ``N``."""
        names = self._select(model, cfg)
        named = dict(model.named_parameters())
        shapes = [tuple(named[n].shape) for n in names]
        ranks = [resolve_ranks(cfg.ranks, n, s) for n, s in zip(names, shapes)]
        if isinstance(cfg.ranks, Mapping):
            stray = sorted(set(cfg.ranks) - set(names) - {"*"})
            if stray:
                raise L3DConfigError(f"ranks names {stray}, which are not decomposed parameters {names}")
        n = n_samples(inputs)
        if n < 2:
            raise L3DInputError(f"L3D needs at least 2 samples (each sample's reference is another sample), got {n}")
        if model.training and any(isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm)) for m in model.modules()):
            warnings.warn("model is in training mode and has dropout/batch-norm layers; call model.eval() so the "
                          "gradients at W0 are deterministic", UserWarning, stacklevel=3)
        return names, shapes, ranks, n

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        model: nn.Module,
        inputs: Inputs,
        *,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> L3D:
        """Learn the decomposition of ``model``'s parameters from per-sample gradients on ``inputs``.

        Parameters
        ----------
        model : nn.Module
            The trained model at ``W0``; not modified. Put it in eval mode (dropout and batch norm in
            training mode make the gradients stochastic or break ``vmap``).
        inputs : Tensor (N, ...), dict of Tensors or tuple of Tensors
            Model inputs, first dimension = samples; a dict is passed as keyword arguments, a tuple
            positionally. ``N >= 2``.
        output_fn : callable, optional
            Maps the model's raw output to a Tensor ``(B, ...)`` (default: the output itself, its
            ``.logits`` or its first element).
        progress : bool, default True
            tqdm bar over epochs (postfix: running loss).

        Returns
        -------
        L3D
            ``self``, fitted.

        Raises
        ------
        ModelError
            No trainable parameters selected, a selected tensor with ``requires_grad=False``, NaN/inf
            outputs or gradients, or gradients that are zero on every sample.
        L3DConfigError
            Unknown parameter names, or a rank larger than a tensor dimension.
        L3DInputError
            Empty or inconsistent inputs, or fewer than 2 samples.
        """
        cfg = self.resolved_config
        t0 = time.perf_counter()
        names, shapes, ranks, n = self._prepare_fit(model, inputs, cfg)
        self._bind(model, names, output_fn, cfg)
        assert self._oracle is not None
        device = self._oracle.device
        gen = torch.Generator().manual_seed(int(cfg.seed))
        k = cfg.n_subnetworks
        dec = Directions(k, names, shapes, ranks, gen).to(device)
        enc = copy.deepcopy(dec)
        dec.normalise_(unit=True)
        enc.load_state_dict(dec.state_dict())
        opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=cfg.lr, foreach=True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
        n_w = sum(int(np.prod(s)) if len(s) else 1 for s in shapes)
        logger.info("L3D: %d subnetworks over %d tensors (%d parameters), %d samples, ranks %s",
                    k, len(names), n_w, n, dict(zip(names, ranks)))
        self.config_ = cfg
        self.history_: list[float] = []
        self._train(inputs, n, gen, enc, dec, opt, sched, names, shapes, progress)
        with torch.no_grad():
            self.decoder_ = {n_: t.detach().cpu() for n_, t in split_directions(dec.matrix(), names, shapes).items()}
            self.encoder_ = {n_: t.detach().cpu() for n_, t in split_directions(enc.matrix(), names, shapes).items()}
        self.param_names_ = list(names)
        self.param_shapes_ = [tuple(s) for s in shapes]
        self.ranks_ = {n_: tuple(r) for n_, r in zip(names, ranks)}
        self.n_samples_ = n
        self.train_error_ = self.history_[-1]
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info("L3D fitted in %.1fs: reconstruction error %.4f, %d/%d subnetworks alive", self.fit_seconds_,
                    self.train_error_, int((self.p_act_ > 0).sum()), k)
        return self

    def _train(self, inputs: Inputs, n: int, gen: torch.Generator, enc: Directions, dec: Directions,
               opt: torch.optim.Optimizer, sched: Any, names: list[str], shapes: list[tuple[int, ...]],
               progress: bool) -> None:
        """Every epoch of :meth:`fit`: fills ``history_`` and ``p_act_`` (tqdm bar if ``progress``)."""
        cfg = self.config_
        bar = None
        epochs: Iterator[int] | range = range(cfg.epochs)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, desc="L3D", leave=False)
        tensor_sq = torch.zeros(len(names), dtype=torch.float64)
        sizes = [int(np.prod(s)) if len(s) else 1 for s in shapes]
        try:
            for epoch in epochs:
                ep = self._train_epoch(epoch, inputs, n, gen, enc, dec, opt, tensor_sq, sizes)
                if epoch == 0:
                    self._check_gradient_mass(names, tensor_sq)
                # keep the Tucker factors unit-norm (scale lives in the core); the tensors are unchanged
                dec.normalise_(unit=False)
                enc.normalise_(unit=False)
                sched.step()
                self.history_.append(ep)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{ep:.4f}")
                if epoch % max(1, cfg.epochs // 10) == 0:
                    logger.debug("L3D epoch %d: loss %.4f, live subnetworks %d", epoch, ep, int((self.p_act_ > 0).sum()))
        finally:
            if bar is not None:
                bar.close()

    def _train_epoch(self, epoch: int, inputs: Inputs, n: int, gen: torch.Generator, enc: Directions,
                     dec: Directions, opt: torch.optim.Optimizer, tensor_sq: torch.Tensor, sizes: list[int]) -> float:
        """One pass over the inputs; sets ``p_act_`` and returns the epoch loss ``Σ‖g−ĝ‖² / Σ‖g‖²``.

        In epoch 0 the squared gradient mass per tensor is added to ``tensor_sq`` (len(names),).
        """
        cfg = self.config_
        oracle = self._oracle
        assert oracle is not None
        frac = cfg.warm_start_k if epoch < cfg.warm_start_epochs else cfg.top_k
        losses, weights = [], []
        active = torch.zeros(cfg.n_subnetworks, device=oracle.device)
        seen = 0
        for g in gradient_batches(oracle, cfg, inputs, n, gen, shuffle=True):
            if epoch == 0:
                tensor_sq += torch.stack([c.pow(2).sum().double().cpu() for c in g.split(sizes, dim=1)])
            denom = g.pow(2).sum()
            if denom <= 0:
                continue
            v_in, v_out = enc.matrix(), dec.matrix()
            c = g @ v_in.T
            mask = batch_topk_mask(c, frac)
            g_hat = (c * mask) @ v_out
            loss = (g - g_hat).pow(2).sum() / denom
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dec.normalise_(unit=True, factors=False)  # subnetworks back to unit norm
            losses.append(float(loss.detach()))
            weights.append(float(denom))
            active += mask.sum(0)
            seen += g.shape[0]
        self.p_act_ = (active / max(seen, 1)).cpu()
        # weight batches by their gradient mass: the epoch value is Σ‖g−ĝ‖² / Σ‖g‖²
        return float(np.dot(losses, weights) / max(sum(weights), 1e-300)) if losses else float("nan")

    def _check_gradient_mass(self, names: list[str], tensor_sq: torch.Tensor) -> None:
        """After epoch 0: refuse NaN/inf or all-zero gradients, warn about tensors with zero gradient."""
        if not torch.isfinite(tensor_sq).all():
            raise ModelError("per-sample gradients contain NaN/inf; check the model and inputs for overflow")
        if float(tensor_sq.sum()) == 0.0:
            raise ModelError(
                f"the divergence gradient with respect to {names} is zero on every sample: the outputs do not "
                "depend on these parameters at W0 (unused or dead tensors, or identical outputs for all inputs); "
                "decompose parameters the output depends on"
            )
        dead = [n for n, s in zip(names, tensor_sq.tolist()) if s == 0.0]
        if dead:
            warnings.warn(f"parameters {dead} get zero gradient on every sample of the first epoch; their "
                          "subnetwork slices are not learned", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ fitted state
    def _require_fit(self) -> None:
        if self.decoder_ is None or self.encoder_ is None:
            raise L3DNotFittedError("this L3D is not fitted yet: call fit(model, inputs) first (or L3D.load(path))")

    def _require_model(self) -> GradientOracle:
        self._require_fit()
        if self._oracle is None:
            raise L3DNotFittedError("no model is bound to this L3D: pass model= to L3D.load(path, model=...) "
                                    "or call bind(model)")
        return self._oracle

    def _rows(self, d: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{n: d[n][i] for n in self.param_names_} for i in range(self.config_.n_subnetworks)]

    @property
    def subnetworks(self) -> list[dict[str, torch.Tensor]]:
        """The subnetworks ``v_k`` (rows of ``V_out``): one dict per subnetwork mapping each decomposed
        parameter name to a tensor of that parameter's shape; unit norm over all tensors jointly; the
        sign is arbitrary."""
        self._require_fit()
        return self._rows(self.decoder_)  # type: ignore[arg-type]

    @property
    def encoders(self) -> list[dict[str, torch.Tensor]]:
        """The encoder rows ``V_in[k]`` in the same format as :attr:`subnetworks` (not normalised)."""
        self._require_fit()
        return self._rows(self.encoder_)  # type: ignore[arg-type]

    @property
    def p_act(self) -> torch.Tensor:
        """Activation frequency (n_v,): fraction of samples of the last training epoch on which each
        subnetwork was kept by the top-k (0 = dead). :meth:`evaluate` recomputes it on other inputs."""
        self._require_fit()
        return self.p_act_

    def _flat(self, d: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return torch.cat([d[n].flatten(1) for n in self.param_names_], dim=1).to(device)

    def bind(self, model: nn.Module, output_fn: Callable[[Any], torch.Tensor] | None = None) -> L3D:
        """Attach ``model`` (e.g. after :meth:`load`); its decomposed tensors must match in name and shape."""
        self._require_fit()
        named = dict(model.named_parameters())
        for n, s in zip(self.param_names_, self.param_shapes_):
            if n not in named or tuple(named[n].shape) != s:
                got = tuple(named[n].shape) if n in named else "missing"
                raise ModelError(f"model does not match the decomposition: parameter {n!r} expected shape {s}, got {got}")
        self._bind(model, self.param_names_, output_fn, self.config_)
        return self

    def __repr__(self) -> str:
        c = self.config_ if self.decoder_ is not None else self.resolved_config
        head = f"L3D(n_subnetworks={c.n_subnetworks}, ranks={c.ranks!r}, top_k={c.top_k}, divergence={c.divergence!r}"
        if self.decoder_ is None:
            return head + ", unfitted)"
        alive = int((self.p_act_ > 0).sum())
        return (head + f", params={self.param_names_}, train_error={self.train_error_:.4f}, "
                f"alive={alive}/{c.n_subnetworks})")


def _raise_unknown(unknown: Mapping[str, Any]) -> None:
    """The error for keywords that are neither ``config`` nor an :class:`L3DConfig` field."""
    valid = list(L3D._param_names())
    raise L3DConfigError(f"unknown L3DConfig field(s) {sorted(unknown)}; valid L3D parameters: {valid} "
                         f"(config, or one of L3DConfig's fields)")
