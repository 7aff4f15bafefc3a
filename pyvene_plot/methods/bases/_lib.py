"""The Local Interaction Basis (LIB) of a site, and the shared story of PLOT's span bases.

PLOT's fine stages can search over *bands of a basis* at a kept site instead of native neurons
(``Site(..., dims=band, basis=key)``). This module builds such bases from a model, a site and a bank:

* :func:`pca_basis` — centred principal components of the activations (the baseline);
* :func:`lib_basis` — the Local Interaction Basis of Bushnaq et al. (2024, arXiv 2405.10928), built
  from the activations *and* the Jacobian of what comes downstream of the site.

Both return a :class:`Basis`: direction rows ``(r, d)``, an encoder ``(r, d)``, per-direction
importances ``(r,)``, the mean ``(d,)`` and an ``info`` dict.

LIB in one screen
-----------------
Write ``f`` for the activations at the site (``d`` wide), ``μ = E[f]`` and ``J(x) = ∂y/∂f`` for the
Jacobian of a downstream quantity ``y``. In float64:

1. **Centre and whiten.** ``G = E[(f-μ)(f-μ)ᵀ] = U D Uᵀ``; drop eigenvalues ``D <= ε·max D``;
   whitened activations ``f' = D^{-1/2} Uᵀ (f-μ)`` have identity covariance.
2. **Jacobian Gram.** ``M' = E[JᵀJ]`` (``d × d``), summed over the outputs of ``y``.
3. **Rotate.** ``M = D^{1/2} Uᵀ M' U D^{1/2} = V Λ Vᵀ``: ``V`` holds the right singular vectors of the
   Jacobian w.r.t. the whitened activations, ``Λ`` their mean squared singular values. Drop
   ``Λ <= ε·max Λ``, sort descending.
4. **Scale.** ``C = U D^{-1/2} V Λ^{1/2}`` (``d × r``) and ``C⁺ = Λ^{-1/2} Vᵀ D^{1/2} Uᵀ`` (``r × d``).
   Features ``f̂ = Cᵀ (f-μ)``; reconstruction ``f ≈ μ + C⁺ᵀ f̂``.

In this module's row convention ``Basis.encoder = Cᵀ`` and ``Basis.rows = C⁺``, so
``features = (f - mean) @ encoder.T`` and ``f ≈ mean + features @ rows``. Identities that hold on
the data the basis was built on (and are tested): ``Cov(f̂) = Λ`` (a feature's variance is its
importance), ``E[Ĵᵀ Ĵ] = I`` for ``Ĵ = ∂y/∂f̂``, and the features are invariant (up to signs and
rotations inside degenerate eigenspaces) to any invertible linear re-parametrisation of ``f``,
which PCA features are not. For a linear map ``y = A f`` with isotropic ``f`` the LIB directions are
``A``'s right singular vectors and ``Λ = σ²``.

Two choices of ``y`` (``lib_basis(method=...)``):

* ``"output_jacobian"`` (default, "LIB-lite"): ``y`` = the readout logits (or ``output_fn`` of them,
  e.g. log-probabilities or a logit difference). One site, one Jacobian, works on any model pyvene
  can hook; the directions are ranked by how strongly they move the output PLOT's cost is built from.
* ``"lib"`` (faithful, layer-recursive): ``y`` = the next node layer's LIB features, computed
  backwards from the output through a chain of modules (:func:`lib_chain_bases`). Available for
  pyvene MLPs (the chain is derived with :func:`mlp_chain`) or any model given as ``chain=``.
  Directly before the output both variants coincide. When everything after the next node layer is
  linear, the faithful metric ``C^{l+1} C^{l+1 T}`` equals the output metric on that layer's data span,
  so the variants agree there too up to that projection (they did to three decimals on the
  modular-addition MLP of ``benchmarks/lib_modadd.py``).

Centring: the mean is kept separately (``Basis.mean``) and never rotated; this is the reference
implementation's "constant direction kept first" with the bias folded out. Node ablation
(:meth:`Basis.reconstruct`) keeps the top-``n`` features and replaces the others by their mean
(zero), so rib's count "n features" corresponds to ``n - 1`` here (rib counts the constant direction).

LIB is not an orthonormal basis
-------------------------------
Because of whitening, the rows ``C⁺`` are not orthogonal: interchanging LIB features ``S`` from a
source is the *oblique* projection ``f <- f + C⁺_Sᵀ (f̂_src,S - f̂_base,S)``, which leaves every other
LIB feature unchanged. :class:`~pyvene_plot.interventions.ObliqueSpanInterchangeIntervention`
(see :meth:`Basis.intervention`) implements exactly that and saves / loads like PLOT's other
interventions. PLOT's engine, handles and DAS specs, however, work with orthonormal spans; the
progressive scheduler's ``lib`` stage therefore uses :meth:`Basis.orthonormal_rows`: a Gram–Schmidt
(QR) orthonormalisation of the *encoder* rows ``Cᵀ`` in importance order, with nested spans
(``span(Q[:k]) = span(C[:, :k])`` for every ``k``). Interchanging the top ``k`` directions is then the
orthogonal projection onto the directions the top LIB features read: it has the same kernel as the
oblique projection (nothing moves unless those features differ between base and source) and sets
those features exactly to the source's, but it writes into ``span(Cᵀ_S)`` rather than ``span(C⁺_S)``,
so other features can move. Orthonormalising ``span(C⁺_S)`` instead (``side="rows"``) keeps the
range but not the kernel, and measurably loses LIB's advantage (see ``benchmarks/lib_modadd.py``).

References
----------
L. Bushnaq, S. Heimersheim, N. Goldowsky-Dill, D. Braun, J. Mendel, K. Hänni, A. Griffin,
J. Stöhler, M. Wache, M. Hobbhahn. "The Local Interaction Basis: Identifying
Computationally-Relevant and Sparsely Interacting Features in Neural Networks." arXiv 2405.10928
(2024). Reference implementation: ``ApolloResearch/rib`` (not a dependency).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...data import Inputs, PairBank
from ...errors import ModelError, PlotError, SiteError
from ...models import Readout, Site, model_spec
from ._activations import site_activations, whole_site
from ._basis import ArrayLike, Basis, to_numpy64
from ._jacobian import accumulate_jacobian_gram, output_jacobian_gram
from ._linalg import check_rank, check_states, check_width, eigh_desc, fix_signs, keep_mask

logger = logging.getLogger(__name__)


def _checked_jacobian_gram(jacobian_gram: ArrayLike, d: int) -> np.ndarray:
    """``M'`` as float64 ``(d, d)``; refuse a wrong shape, NaN/inf, or an all-zero Gram (no gradient path)."""
    Mp = to_numpy64(jacobian_gram)
    if Mp.shape != (d, d):
        raise PlotError(f"jacobian_gram must be ({d}, {d}) to match activations of width {d}, got {Mp.shape}")
    if not np.all(np.isfinite(Mp)):
        raise ModelError("the Jacobian Gram contains NaN or inf; check the model (and the output function)")
    if not np.any(Mp != 0):
        raise ModelError(
            "the downstream output does not depend on the activations at this site (zero Jacobian): no "
            "gradient path — choose a site upstream of the read-out (earlier layer / position) or another output"
        )
    return Mp


def lib_from_activations(
    acts: ArrayLike,
    jacobian_gram: ArrayLike,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    mean: ArrayLike | None = None,
) -> Basis:
    """LIB basis from activations and the Jacobian Gram ``M' = E[JᵀJ]`` (steps 1 and 3–5, float64).

    Parameters
    ----------
    acts : Tensor or ndarray, shape (n, d)
        Activations at the site.
    jacobian_gram : Tensor or ndarray, shape (d, d)
        ``E_x[J(x)ᵀ J(x)]`` over the same states, ``J(x) = ∂y/∂f`` (outputs x site width), summed
        over the outputs of ``y``.
    center : bool, default True
        Centre the activations (the mean is kept separately and never rotated).
    rank : int, optional
        Keep at most this many directions.
    truncation_threshold : float, default 1e-10
        Relative threshold for both eigen-truncations: whitening drops ``D <= ε·max D``, the
        rotation drops ``Λ <= ε·max Λ``.
    mean : array, shape (d,), optional
        Use this mean instead of the sample mean (with ``center=True``).

    Returns
    -------
    Basis
        ``kind="lib"``, ``encoder = Cᵀ``, ``rows = C⁺``, ``importances = Λ``.

    Raises
    ------
    BankError, SiteError
        As :func:`pca_from_activations`.
    ModelError
        ``M'`` is zero (the downstream quantity does not depend on the site) or not finite.
    """
    t0 = time.perf_counter()
    X = to_numpy64(acts)
    check_states(X, center, "LIB")
    n, d = X.shape
    Mp = _checked_jacobian_gram(jacobian_gram, d)
    check_rank(rank, n, d, center, "LIB")
    mu = (to_numpy64(mean).reshape(d) if mean is not None else X.mean(0)) if center else np.zeros(d)
    Xc = X - mu
    G = Xc.T @ Xc / n
    D, U = eigh_desc(G)
    keep = keep_mask(D, truncation_threshold)
    if not keep.any():
        raise SiteError("activations at this site do not vary on the given states; a LIB basis cannot be fitted")
    D, U = D[keep], U[:, keep]
    sqrtD = np.sqrt(D)
    M = (U * sqrtD).T @ ((Mp + Mp.T) / 2.0) @ (U * sqrtD)  # D^{1/2} Uᵀ M' U D^{1/2}
    lam, V = eigh_desc(M)
    lkeep = keep_mask(lam, truncation_threshold)
    if not lkeep.any():
        raise ModelError(
            "the downstream Jacobian is zero on every direction the activations vary in: no gradient path "
            "from this site to the output — choose another site or output"
        )
    lam, V = lam[lkeep], V[:, lkeep]
    if rank is not None:
        lam, V = lam[: int(rank)], V[:, : int(rank)]
    sl = np.sqrt(lam)
    C = (U / sqrtD) @ V * sl  # (d, r) = U D^{-1/2} V Λ^{1/2}
    Cp = (V / sl[None, :]).T @ (U * sqrtD).T  # (r, d) = Λ^{-1/2} Vᵀ D^{1/2} Uᵀ
    rows, enc = fix_signs(Cp, C.T.copy())
    info = {"method": "lib", "n_states": n, "center": bool(center), "truncation_threshold": float(truncation_threshold),
            "whitened_rank": int(keep.sum()), "numerical_rank": int(lkeep.sum()), "requested_rank": rank,
            "runtime_s": time.perf_counter() - t0}
    return Basis(rows, enc, lam, mu, "lib", info)


def mlp_chain(
    model: torch.nn.Module, site: Site, readout: Readout | None = None
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Downstream module chain of a pyvene MLP site, for the faithful (layer-recursive) LIB.

    Parameters
    ----------
    model : pyvene ``MLPForClassification``
    site : Site
        ``block_output`` / ``mlp_activation`` of layer ``l`` or ``block_input`` of layer ``l``.
    readout : Readout, optional
        Appended to the last module (selects ``label_tokens``).

    Returns
    -------
    list of callable
        ``F_0, F_1, ...`` mapping the site's activations ``(n, d)`` to the next node layer's, the
        last one to the readout logits ``(n, C)``.
    """
    from pyvene.models.mlp.modelings_mlp import MLPForClassification

    if not isinstance(model, MLPForClassification):
        raise ModelError(
            f"the faithful LIB chain is derived automatically only for pyvene MLPForClassification, not "
            f"{type(model).__name__}; pass chain=[module, ...] (callables from the site to the logits) or use "
            "method='output_jacobian'"
        )
    blocks = list(model.mlp.h)
    l = int(site.layer)
    if site.component in ("block_output", "mlp_activation"):
        rest = blocks[l + 1 :]
    elif site.component == "block_input":
        rest = blocks[l:]
    else:
        raise SiteError(
            f"no module chain for component {site.component!r}; use block_input, block_output or mlp_activation"
        )
    ro = readout or Readout()
    score = model.score

    def head(h: torch.Tensor) -> torch.Tensor:
        return ro(score(h))

    chain: list[Callable[[torch.Tensor], torch.Tensor]] = list(rest) + [head]
    if site.component == "mlp_activation":  # the block's dropout sits between the activation and the next step
        drop, first = blocks[l].dropout, chain[0]

        def step(h: torch.Tensor) -> torch.Tensor:
            return first(drop(h))

        chain[0] = step
    return chain


def _chain_activations(
    chain: Sequence[Callable[[torch.Tensor], torch.Tensor]], x0: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], torch.dtype, torch.device]:
    """Activations ``[f^0, ..., f^L]`` of every node layer (each (n, d_l)), and the chain's dtype and device.

    The dtype and device are those of the first parameter of a module in the chain (else of ``x0``).
    """
    try:
        dtype = next(p for m in chain if isinstance(m, torch.nn.Module) for p in m.parameters()).dtype
        device = next(p for m in chain if isinstance(m, torch.nn.Module) for p in m.parameters()).device
    except StopIteration:
        dtype, device = x0.dtype if x0.dtype.is_floating_point else torch.float32, x0.device
    n = int(x0.shape[0])
    acts = [x0.to(device=device, dtype=dtype)]
    with torch.no_grad():
        for F in chain:
            acts.append(torch.cat([F(acts[-1][s : s + batch_size]) for s in range(0, n, batch_size)], 0))
    return acts, dtype, device


def lib_chain_bases(
    chain: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    inputs: ArrayLike,
    *,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    batch_size: int = 512,
    progress: bool = False,
) -> list[Basis]:
    """Faithful LIB: bases at every node layer of a module chain, built backwards from the output.

    Node layers are ``f^0 = inputs`` and ``f^{l+1} = chain[l](f^l)``; the last node ``f^L`` is the
    output and is not rotated. For ``l = L-1, ..., 0`` the Jacobian is taken to the next layer's LIB
    features, ``J_l = ∂f̂^{l+1}/∂f^l = C^{l+1 T} ∂F_l/∂f^l`` (``∂f^L/∂f^{L-1}`` at the output), and
    :func:`lib_from_activations` builds ``C^l``.

    Parameters
    ----------
    chain : sequence of callable
        Modules ``F_0..F_{L-1}``, each mapping a batch ``(B, d_l)`` to ``(B, d_{l+1})`` row by row.
    inputs : Tensor or ndarray, shape (n, d_0)
        Activations at the first node layer.
    center, rank, truncation_threshold :
        As in :func:`lib_from_activations` (``rank`` applies to every layer).
    batch_size : int, default 512
    progress : bool, default False

    Returns
    -------
    list of Basis
        One per node layer ``0..L-1`` (the first is the basis at ``inputs``).
    """
    if len(chain) == 0:
        raise PlotError("the chain is empty; pass at least one module from the site to the output")
    if isinstance(inputs, torch.Tensor):
        x0 = inputs.detach()
    else:
        x0 = torch.as_tensor(to_numpy64(inputs), dtype=torch.float32)
    if x0.dim() != 2:
        raise PlotError(f"inputs must be (n_states, d), got shape {tuple(x0.shape)}")
    acts, dtype, device = _chain_activations(chain, x0, batch_size)
    n = int(x0.shape[0])
    bases: list[Basis | None] = [None] * len(chain)
    enc_next: torch.Tensor | None = None  # encoder of layer l+1 (None at the output: unrotated)
    mean_next: torch.Tensor | None = None
    layers = range(len(chain) - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="LIB layers", leave=False)
    for l in layers:
        F = chain[l]
        d = int(acts[l].shape[1])
        M = torch.zeros(d, d, dtype=torch.float64)
        for s in range(0, n, batch_size):
            f = acts[l][s : s + batch_size].clone().requires_grad_(True)
            with torch.enable_grad():
                y = F(f)
                if enc_next is not None:
                    y = (y - mean_next) @ enc_next.T
                if not y.requires_grad:
                    raise ModelError(f"module {l} of the chain does not depend on its input (no gradient path)")
                M += accumulate_jacobian_gram(y, f, None, None)
        basis = lib_from_activations(acts[l], M / n, center=center, rank=rank,
                                     truncation_threshold=truncation_threshold)
        basis.info.update(method="lib", jacobian_target="next-layer LIB features" if enc_next is not None else "output",
                          node_layer=l, n_node_layers=len(chain))
        bases[l] = basis
        enc_next = torch.tensor(basis.encoder, dtype=dtype, device=device)
        mean_next = torch.tensor(basis.mean, dtype=dtype, device=device)
    return [b for b in bases if b is not None]


LIB_METHODS = ("output_jacobian", "lib")


def _lib_output_jacobian(model: torch.nn.Module, site: Site, bank: PairBank | Inputs, d: int, fit: dict,
                         *, readout: Readout, output_fn, n_stochastic_sources: int | None, batch_size: int,
                         progress: bool, seed: int) -> Basis:
    """``lib_basis(method="output_jacobian")``: LIB on the Jacobian Gram of the readout output.

    ``fit`` holds ``center``, ``rank`` and ``truncation_threshold`` of :func:`lib_from_activations`.
    """
    acts, M = output_jacobian_gram(model, site, bank, readout=readout, output_fn=output_fn,
                                   n_stochastic_sources=n_stochastic_sources, batch_size=batch_size,
                                   progress=progress, seed=seed)
    check_rank(fit["rank"], int(acts.shape[0]), d, fit["center"], "LIB")
    basis = lib_from_activations(acts, M, **fit)
    if output_fn in (None, "logits"):
        target = "readout logits"
    else:
        target = output_fn if isinstance(output_fn, str) else "output_fn"
    basis.info.update(method="output_jacobian", jacobian_target=target, n_stochastic_sources=n_stochastic_sources)
    return basis


def _lib_faithful(model: torch.nn.Module, site: Site, bank: PairBank | Inputs, d: int, fit: dict,
                  chain: list[Callable[[torch.Tensor], torch.Tensor]], *, batch_size: int, progress: bool) -> Basis:
    """``lib_basis(method="lib")``: the first basis of the layer-recursive chain from the site to the logits."""
    acts = site_activations(model, site, bank, batch_size=batch_size)
    check_rank(fit["rank"], int(acts.shape[0]), d, fit["center"], "LIB")
    bases = lib_chain_bases(chain, acts, batch_size=batch_size, progress=progress, **fit)
    basis = bases[0]
    basis.info.update(method="lib", jacobian_target="next-layer LIB features" if len(chain) > 1 else "output",
                      downstream_ranks=[b.rank for b in bases[1:]])
    return basis


def lib_basis(
    model: torch.nn.Module,
    site: Site,
    bank: PairBank | Inputs,
    *,
    method: str = "output_jacobian",
    readout: Readout | None = None,
    output_fn: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    chain: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
    center: bool = True,
    rank: int | None = None,
    truncation_threshold: float = 1e-10,
    n_stochastic_sources: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    seed: int = 0,
) -> Basis:
    """Local Interaction Basis at a site (whitened activations rotated by the downstream Jacobian).

    Parameters
    ----------
    model : torch.nn.Module
        A model pyvene can hook.
    site : Site
        Whole-vector site (no ``dims`` / ``basis``).
    bank : PairBank or inputs
        States the basis is built on: a bank's bases and sources (``2N`` states) or model inputs.
    method : {"output_jacobian", "lib"}, default "output_jacobian"
        ``"output_jacobian"``: Jacobian of the readout output w.r.t. the site (any model).
        ``"lib"``: faithful layer-recursive LIB through the downstream module chain (``chain=`` or a
        pyvene ``MLPForClassification``, see :func:`mlp_chain`); ``output_fn`` and stochastic
        sources do not apply there.
    readout : Readout, optional
        Default: the bank's readout, else :class:`Readout`.
    output_fn : {"logits", "log_probs"} or callable, optional
        The output ``y`` whose Jacobian is used (``output_jacobian`` only); default raw logits.
    chain : sequence of callable, optional
        For ``method="lib"`` on other models: modules from the site's activations to the logits.
    center : bool, default True
    rank : int, optional
        Keep at most this many directions.
    truncation_threshold : float, default 1e-10
        Relative eigenvalue threshold of the whitening and of the rotation.
    n_stochastic_sources : int, optional
        Rademacher estimate of the sum over outputs (large output spaces).
    batch_size : int, default 256
    progress : bool, default False
    seed : int, default 0

    Returns
    -------
    Basis
        ``kind="lib"``: ``rows = C⁺`` (not orthonormal), ``encoder = Cᵀ``, ``importances = Λ``.

    Raises
    ------
    SiteError
        Unknown site, a site with dims/basis, or ``rank`` larger than the site's width.
    BankError
        Too few states for ``rank``.
    ModelError
        No gradient path from the site to the output, or no module chain for ``method="lib"``.

    Examples
    --------
    >>> b = pp.bases.lib_basis(task.model, pp.Site(1), task.fit)          # doctest: +SKIP
    >>> feats = b.transform(acts); b.reconstruct(acts, keep=4)            # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if method not in LIB_METHODS:
        raise PlotError(f"unknown LIB method {method!r}; choose one of {LIB_METHODS}")
    site = whole_site(model, site)
    d = model_spec(model).dim(site.component)
    check_width(rank, d, "LIB")
    readout = readout or getattr(bank, "readout", None) or Readout()
    fit = dict(center=center, rank=rank, truncation_threshold=truncation_threshold)
    if method == "output_jacobian":
        basis = _lib_output_jacobian(model, site, bank, d, fit, readout=readout, output_fn=output_fn,
                                     n_stochastic_sources=n_stochastic_sources, batch_size=batch_size,
                                     progress=progress, seed=seed)
    else:
        if output_fn not in (None, "logits") or n_stochastic_sources is not None:
            raise PlotError("output_fn and n_stochastic_sources apply to method='output_jacobian' only")
        chain = list(chain) if chain is not None else mlp_chain(model, site, readout)
        basis = _lib_faithful(model, site, bank, d, fit, chain, batch_size=batch_size, progress=progress)
    basis.info.update(site=site.to_dict(), runtime_s=time.perf_counter() - t0)
    logger.info("LIB basis at %s (%s): rank %d from %d states in %.2fs", site.label, basis.info["method"],
                basis.rank, basis.info["n_states"], basis.info["runtime_s"])
    return basis
