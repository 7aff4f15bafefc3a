"""Transport solvers between abstract variables (rows) and candidate sites (columns), backed by POT.

=================  =====================================================================================
method             solver
=================  =====================================================================================
``"ot"``           balanced entropic OT, POT ``ot.bregman.sinkhorn_log`` (log-domain: no kernel underflow),
                   warm-started along a geometric ε path
``"uot"``          unbalanced entropic OT, POT ``ot.unbalanced.sinkhorn_unbalanced``. One-sided by default:
                   the variables' marginal is exact (``reg_m=(inf, beta)``) and the sites' marginal is
                   KL-relaxed, so each variable's mass goes where *its own* cost is low instead of being
                   spread over every site (balanced OT misplaces a variable's best site when there are far
                   fewer variables than sites). ``sided="two"`` relaxes both marginals (``reg_m=(beta, beta)``).
``"gw"``           entropic Gromov-Wasserstein, POT ``ot.gromov.entropic_gromov_wasserstein``
                   (compares the geometry among variables with the geometry among sites; both
                   geometries are cosine distances scaled to [0, 1], so ε is relative to 1)
``"fgw"``          entropic fused GW, POT ``ot.gromov.entropic_fused_gromov_wasserstein``
``"cosine"``       baseline: row-softmax of cosine similarity between signatures (temperature ε)
``"bruteforce"``   baseline: row-softmax of each site's own full-swap score (temperature ε)
=================  =====================================================================================

Numerics. With exact row marginals, subtracting a constant from each row of the cost does not
change the one-sided UOT plan (``<C - r 1ᵀ, P> = <C, P> - Σ r_i a_i``), so rows are shifted to a
zero minimum before solving; POT's unbalanced scaling iterations are then warm-started along a
geometric ε path (ε-continuation), continued in the log domain from the first ε at which POT's
kernel underflows (small ε against a far-off column). ``epsilon="auto"`` measures ε against
:func:`cost_spread`, the robust within-row spread of the cost; :func:`row_contrast` says how far each
row of a plan is from uniform. Every plan is checked: non-finite entries, violated marginals
or a uniform plan on a non-constant cost raise :class:`~pyvene_plot.errors.TransportError`
naming ε and the cost scale. Convergence (iterations, marginal errors) is recorded on every plan.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
import ot

from ..errors import TransportError

logger = logging.getLogger(__name__)


METHODS = ("ot", "uot", "gw", "fgw", "cosine", "bruteforce")


@dataclasses.dataclass
class TransportPlan:
    """A coupling with its diagnostics.

    Attributes
    ----------
    coupling : ndarray, shape (V, S)
    method : str
    epsilon : float
        Absolute regularisation used.
    beta : float or None
        Marginal relaxation (UOT only).
    n_iter : int
    converged : bool
    row_marginal_error, col_marginal_error : float
        Max absolute deviation from the target marginals (the column error is informative only for
        balanced OT; UOT relaxes it by design).
    transport_mass : float
    normalized_entropy : float
        Mean over rows of the entropy of the row-normalised plan divided by log(S): 1 = uniform.
    """

    coupling: np.ndarray
    method: str
    epsilon: float
    beta: float | None
    n_iter: int
    converged: bool
    row_marginal_error: float
    col_marginal_error: float
    transport_mass: float
    normalized_entropy: float
    underflow_fraction: float = 0.0

    def diagnostics(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("coupling")
        return d


def row_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def intra_geometry(X: np.ndarray) -> np.ndarray:
    """Cosine-distance matrix among rows of X, NaN -> 0, symmetric, zero diagonal, scaled to max 1."""
    n = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = X / np.maximum(n, 1e-12)
    D = 1.0 - Xn @ Xn.T
    D = np.nan_to_num(0.5 * (D + D.T))
    np.fill_diagonal(D, 0.0)
    D = np.maximum(D, 0.0)
    m = D.max()
    return D / m if m > 0 else D


def _normalized_entropy(P: np.ndarray) -> float:
    S = P.shape[1]
    if S <= 1:
        return 0.0
    R = P / np.maximum(P.sum(1, keepdims=True), 1e-300)
    H = -(R * np.log(np.maximum(R, 1e-300))).sum(1)
    return float(np.mean(H) / np.log(S))


#: max/median ratios are capped here, so that a row with zero median weight stays a finite JSON number
ROW_CONTRAST_CAP = 1e12
#: 1.4826 x MAD estimates the standard deviation of Gaussian data
_MAD_TO_STD = 1.4826


def cost_spread(C: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """Robust, pooled within-row spread of a cost matrix: the scale of ``epsilon="auto"``.

    Each row is centred on its own median and ``1.4826 x`` the median absolute deviation of all
    centred entries is returned (pooled MAD, equal to the standard deviation for Gaussian costs).

    Why this statistic: the entropic plan depends on the cost only through within-row differences
    divided by ε (one-sided UOT is exactly invariant to a per-row shift, see the module notes), so ε
    must be measured against how much costs differ *within* a row. The median absolute deviation
    ignores the few extreme columns that set the cost *range* (sites given the worst cost by the
    magnitude floor, a handful of very disruptive sites), which made range-scaled ε too large for
    the differences among a row's good sites and left the rows nearly flat. Multiplying ``C`` by
    ``c`` multiplies the spread by ``c``; adding a constant (or a constant per row) leaves it unchanged.

    Parameters
    ----------
    C : ndarray, shape (V, S)
    exclude : ndarray of bool, shape (S,), optional
        Columns left out (e.g. floored sites, whose cost is set to the matrix maximum).

    Returns
    -------
    float
        The pooled MAD; if it is 0 up to float noise (1e-9 of the cost scale: more than half of the
        entries of every row equal), the pooled within-row standard deviation; if that is 0 too, the cost range; 1.0 for a constant cost.
    """
    C = np.asarray(C, dtype=np.float64)
    if exclude is not None and not np.all(exclude):
        C = C[:, ~np.asarray(exclude, dtype=bool)]
    centred = C - np.median(C, axis=1, keepdims=True)
    value_range = float(C.max() - C.min())
    # a spread below float noise of the costs counts as 0 (e.g. costs taking a few distinct values,
    # where the MAD is ~1e-17 and would collapse ε to nothing)
    noise = 1e-9 * max(value_range, float(np.abs(C).max()))
    for s in (_MAD_TO_STD * float(np.median(np.abs(centred))),
              float(np.sqrt(np.mean(np.var(C, axis=1)))),
              value_range):
        if s > noise and np.isfinite(s):
            return s
    return 1.0


def row_contrast(P: np.ndarray, supports: list | None = None) -> dict[str, list[float]]:
    """How much each coupling row prefers some sites: normalised entropy and max/median weight.

    Parameters
    ----------
    P : ndarray, shape (V, S)
    supports : list of (sequence of int or None), optional
        Per row, the columns the row may use (progressive masking); None: every column.

    Returns
    -------
    dict
        ``"entropy"``: per row, the entropy of the row-normalised weights over its support divided
        by log(support size) (1 = uniform, 0 = one site; 0 for a one-site support).
        ``"max_over_median"``: per row, largest weight / median weight over its support
        (1 = flat), capped at :data:`ROW_CONTRAST_CAP`.
    """
    P = np.asarray(P, dtype=np.float64)
    ent, ratio = [], []
    for r in range(P.shape[0]):
        cols = None if supports is None or supports[r] is None else np.asarray(sorted(set(supports[r])), dtype=int)
        row = P[r] if cols is None else P[r, cols]
        w = row / max(float(row.sum()), 1e-300)
        n = w.size
        h = -float(np.sum(w * np.log(np.maximum(w, 1e-300))))
        ent.append(h / np.log(n) if n > 1 else 0.0)
        top = float(w.max())
        ratio.append(min(top / max(float(np.median(w)), top / ROW_CONTRAST_CAP, 1e-300), ROW_CONTRAST_CAP))
    return {"entropy": ent, "max_over_median": ratio}


def _check_plan(
    P: np.ndarray, C: np.ndarray, method: str, eps: float, row_target: np.ndarray | None,
    col_target: np.ndarray | None = None,
) -> None:
    scale = float(C.max() - C.min())
    if not np.all(np.isfinite(P)):
        raise TransportError(
            f"{method} plan is non-finite at epsilon={eps:.3g} (cost range {scale:.3g}): the solver "
            "under/overflowed. Use a larger epsilon (e.g. epsilon='auto', which scales with the cost)"
        )
    if P.sum() <= 0:
        raise TransportError(f"{method} plan carries no mass at epsilon={eps:.3g}; use a larger epsilon")
    if row_target is not None:
        err = float(np.abs(P.sum(1) - row_target).max())
        if err > 1e-6 * max(1.0, float(row_target.sum())):
            raise TransportError(
                f"{method} plan violates the variables' marginal by {err:.2e} at epsilon={eps:.3g} "
                f"(cost range {scale:.3g}); the solver did not converge — use a larger epsilon"
            )
    if col_target is not None:
        err = float(np.abs(P.sum(0) - col_target).max())
        if err > 1e-6:
            raise TransportError(
                f"{method} plan violates the sites' marginal by {err:.2e} at epsilon={eps:.3g} (cost range "
                f"{scale:.3g}): the solver did not converge — use a larger epsilon or more iterations"
            )
    if P.shape[1] > 1:
        row_spread = C.max(1) - C.min(1)
        if np.any(row_spread > 1e-12):
            R = P / np.maximum(P.sum(1, keepdims=True), 1e-300)
            dev = np.abs(R - 1.0 / P.shape[1]).max()
            if dev < 1e-6 / P.shape[1]:
                raise TransportError(
                    f"{method} plan is degenerate (uniform over all {P.shape[1]} sites) at epsilon={eps:.3g} "
                    f"although the cost varies (range {scale:.3g}); epsilon is too large for this cost — "
                    "use a smaller epsilon or epsilon='auto'"
                )


def solve_transport(
    C: np.ndarray,
    method: str = "uot",
    epsilon: float = 0.05,
    beta: float | None = 0.1,
    sided: str = "one",
    max_iter: int = 5000,
    tol: float = 1e-9,
    A_sig: np.ndarray | None = None,
    N_sig: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    alpha: float = 0.5,
) -> TransportPlan:
    """Solve one transport problem.

    Parameters
    ----------
    C : ndarray, shape (V, S)
        Cost between variables and sites.
    method : str
        One of :data:`METHODS`.
    epsilon : float
        Entropic regularisation (> 0), in the units of ``C`` (temperature for the baselines).
    beta : float, optional
        KL marginal relaxation for ``uot`` (> 0).
    sided : {"one", "two"}
        ``uot`` only: relax the sites' marginal (``"one"``) or both.
    A_sig, N_sig : ndarray, optional
        Signatures (V, D) and (S, D); needed by ``gw``, ``fgw`` and ``cosine``.
    scores : ndarray, shape (V, S), optional
        Per-variable site scores (higher is better); needed by ``bruteforce``.
    alpha : float
        ``fgw`` trade-off between feature cost and structure.
    """
    if method not in METHODS:
        raise TransportError(f"unknown transport method {method!r}; choose one of {METHODS}")
    eps = float(epsilon)
    if not np.isfinite(eps) or eps <= 0:
        raise TransportError(f"epsilon must be a positive number, got {epsilon!r}")
    C = np.asarray(C, dtype=np.float64)
    if C.ndim != 2 or C.size == 0:
        raise TransportError(f"cost must be a non-empty (variables x sites) matrix, got shape {C.shape}")
    if not np.all(np.isfinite(C)):
        raise TransportError("cost matrix holds NaN or inf; check the signatures")
    V, S = C.shape
    a, b = ot.unif(V), ot.unif(S)
    n_iter, converged = 0, True
    underflow = float(np.mean(C - C.min(1, keepdims=True) > 700.0 * eps))
    row_target: np.ndarray | None = a
    col_target: np.ndarray | None = None
    beta_used = None
    if method == "ot":
        P, n_iter, converged = _ot_continuation(a, b, C, eps, max_iter, tol)
        col_target = b
    elif method == "uot":
        P, n_iter, converged, beta_used, relaxed_rows = _solve_uot(a, b, C, eps, beta, sided, max_iter, tol)
        if relaxed_rows:
            row_target = None
    elif method in ("gw", "fgw"):
        P, n_iter, converged = _solve_gw(method, a, b, C, eps, A_sig, N_sig, alpha, max_iter, tol)
        col_target = b
    elif method == "cosine":
        if A_sig is None or N_sig is None:
            raise TransportError("cosine needs the abstract and neural signatures")
        An = A_sig / np.maximum(np.linalg.norm(A_sig, axis=1, keepdims=True), 1e-12)
        Nn = N_sig / np.maximum(np.linalg.norm(N_sig, axis=1, keepdims=True), 1e-12)
        P = row_softmax(An @ Nn.T, eps) / V
    else:  # bruteforce
        if scores is None:
            raise TransportError("bruteforce needs per-site scores")
        P = row_softmax(np.asarray(scores, dtype=np.float64), eps) / V
    P = np.asarray(P, dtype=np.float64)
    if method in ("cosine", "bruteforce"):
        _check_plan(P, -np.asarray(scores if method == "bruteforce" else P), method, eps, a)
    else:
        _check_plan(P, C, method, eps, row_target, col_target)
    return TransportPlan(
        coupling=P,
        method=method,
        epsilon=eps,
        beta=beta_used,
        n_iter=n_iter,
        converged=bool(converged),
        row_marginal_error=float(np.abs(P.sum(1) - a).max()),
        col_marginal_error=float(np.abs(P.sum(0) - b).max()),
        transport_mass=float(P.sum()),
        normalized_entropy=_normalized_entropy(P),
        underflow_fraction=underflow,
    )


def _solve_uot(a: np.ndarray, b: np.ndarray, C: np.ndarray, eps: float, beta: float | None, sided: str,
               max_iter: int, tol: float) -> tuple[np.ndarray, int, bool, float, bool]:
    """Unbalanced OT (KL relaxation ``beta``) of the sites' marginal (``sided="one"``) or of both.

    Returns the plan (V, S), iterations, convergence, the β used and whether the rows were relaxed too.
    """
    if beta is None or not np.isfinite(beta) or beta <= 0:
        raise TransportError(f"uot needs a positive beta (marginal relaxation), got {beta!r}")
    if sided not in ("one", "two"):
        raise TransportError(f"sided must be 'one' or 'two', got {sided!r}")
    beta_used = float(beta)
    if sided == "one":
        reg_m = (float("inf"), beta_used)
        Cw = C - C.min(1, keepdims=True)  # exact invariance with exact row marginals
    else:
        reg_m = (beta_used, beta_used)
        Cw = C - C.min()
    P, n_iter, converged = _uot_continuation(a, b, Cw, eps, reg_m, max_iter, tol)
    return P, n_iter, converged, beta_used, sided == "two"


def _solve_gw(method: str, a: np.ndarray, b: np.ndarray, C: np.ndarray, eps: float, A_sig: np.ndarray | None,
              N_sig: np.ndarray | None, alpha: float, max_iter: int, tol: float) -> tuple[np.ndarray, int, bool]:
    """Entropic (fused) Gromov-Wasserstein between the signatures' intra-geometries; returns (plan, iterations, converged)."""
    if A_sig is None or N_sig is None:
        raise TransportError(f"{method} needs the abstract and neural signatures")
    C1, C2 = intra_geometry(A_sig), intra_geometry(N_sig)
    # The product plan a bᵀ is a stationary point of (entropic) GW for symmetric geometries, so a
    # uniform start can stay there; start from the feature-cost OT plan instead (POT's G0).
    Cn = C / C.max() if C.max() > 0 else C
    G0 = ot.bregman.sinkhorn_log(a, b, Cn, reg=max(eps, 0.05), numItermax=max_iter, stopThr=tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == "gw":
            P, log = ot.gromov.entropic_gromov_wasserstein(
                C1, C2, a, b, loss_fun="square_loss", epsilon=eps, max_iter=max_iter, tol=tol, log=True, G0=G0,
            )
        else:
            M = C / C.max() if C.max() > 0 else C
            P, log = ot.gromov.entropic_fused_gromov_wasserstein(
                M, C1, C2, a, b, loss_fun="square_loss", epsilon=eps, alpha=alpha, max_iter=max_iter,
                tol=tol, log=True, G0=G0,
            )
    n_iter = len(log.get("err", [])) * 10
    converged = not any("did not converge" in str(w.message) for w in caught)
    return P, n_iter, converged

def _ot_continuation(
    a: np.ndarray, b: np.ndarray, C: np.ndarray, eps: float, max_iter: int, tol: float, factor: float = 2.0
) -> tuple[np.ndarray, int, bool]:
    """POT log-domain Sinkhorn (``sinkhorn_log``) warm-started along a geometric ε path ending at ``eps``."""
    start = max(float(C.max() - C.min()), eps)
    path = [start]
    while path[-1] > eps:
        path.append(max(path[-1] / factor, eps))
    ws, prev, total, converged, P = None, None, 0, True, None
    for e in path:
        if ws is not None:
            ws = (ws[0] * prev / e, ws[1] * prev / e)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            P, log = ot.bregman.sinkhorn_log(a, b, C, reg=e, numItermax=max_iter, stopThr=tol, log=True,
                                             warn=True, warmstart=ws)
        total += int(log.get("niter", 0))
        converged = not any("did not converge" in str(w.message) for w in caught)
        ws = (log["log_u"], log["log_v"])
        prev = e
    return P, total, converged


def _uot_continuation(
    a: np.ndarray, b: np.ndarray, C: np.ndarray, eps: float, reg_m: tuple, max_iter: int, tol: float,
    factor: float = 2.0,
) -> tuple[np.ndarray, int, bool]:
    """POT unbalanced Sinkhorn warm-started along a geometric ε path ending at ``eps``.

    POT only: where its scaling iterations under/overflow at a small ε (POT's log-stabilised
    unbalanced solver fails the same way on such costs, at its first iteration), the plan is left
    non-finite and :func:`solve_transport` raises a :class:`TransportError` naming ε; an ``"auto"``
    sweep records that setting as failed and goes on with the others.
    """
    start = max(float(C.max()), eps)
    path = [start]
    while path[-1] > eps:
        path.append(max(path[-1] / factor, eps))
    ws = None
    total, converged = 0, True
    P = None
    prev = None
    for e in path:
        if ws is not None:
            ws = (ws[0] * prev / e, ws[1] * prev / e)  # same potentials, new ε
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            P, log = ot.unbalanced.sinkhorn_unbalanced(
                a, b, C, reg=e, reg_m=reg_m, method="sinkhorn", reg_type="entropy", warmstart=ws,
                numItermax=max_iter, stopThr=tol, log=True,
            )
        errs = log.get("err", [])
        total += len(errs)
        converged = not any("did not converge" in str(w.message) or "Numerical" in str(w.message) for w in caught)
        ws = (log["logu"], log["logv"])
        prev = e
        if not np.all(np.isfinite(P)):
            break
    return P, total, converged
