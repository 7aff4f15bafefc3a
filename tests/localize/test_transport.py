"""Transport solvers (``pyvene_plot.localize.solve_transport``): marginals, small-ε behaviour,
determinism, one-sided UOT vs balanced OT on a toy, baselines and bad ε.

All marginals are recomputed from the returned coupling; the plan's own diagnostics are only
cross-checked against them.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyvene_plot as pp
from pyvene_plot.localize import METHODS, solve_transport


def _random_cost(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape)


def _row_err(P):
    V = P.shape[0]
    return float(np.abs(P.sum(1) - 1.0 / V).max())


def _col_err(P):
    S = P.shape[1]
    return float(np.abs(P.sum(0) - 1.0 / S).max())


def _smooth_profile_cost(preferred=(10, 20), n_sites=26):
    """The lessons doc's smooth layer profile: cost_v(l) = clip(((l - p_v) / 8)^2, 0, 4)."""
    layers = np.arange(n_sites, dtype=np.float64)
    return np.stack([np.clip(((layers - p) / 8.0) ** 2, 0.0, 4.0) for p in preferred])


def _assert_valid(P, shape):
    assert P.shape == shape
    assert np.all(np.isfinite(P)), "plan holds NaN/inf"
    assert np.all(P >= 0), "plan holds negative mass"
    assert P.sum() > 0


# ------------------------------------------------------------------------------ balanced OT
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2])
def test_ot_marginals_within_tolerance(eps):
    C = _random_cost((4, 24), seed=1)
    plan = solve_transport(C, "ot", eps)
    P = plan.coupling
    _assert_valid(P, C.shape)
    assert _row_err(P) <= 1e-6
    assert _col_err(P) <= 1e-6
    # diagnostics agree with the plan
    assert plan.row_marginal_error == pytest.approx(_row_err(P), abs=1e-12)
    assert plan.col_marginal_error == pytest.approx(_col_err(P), abs=1e-12)
    assert plan.method == "ot" and plan.epsilon == eps and plan.beta is None


@pytest.mark.parametrize("shape", [(3, 10), (4, 24)])
def test_ot_no_collapse_at_small_epsilon(shape):
    """ε = 1e-4 on a cost of order 1: finite plan, both marginals OK, rows not uniform.

    A log-domain solver handles this ε; what must never happen is a plan returned silently with
    violated marginals (``converged=False`` is not an error signal a caller checks).
    """
    C = _random_cost(shape, seed=0)
    plan = solve_transport(C, "ot", 1e-4)
    P = plan.coupling
    _assert_valid(P, C.shape)
    assert _row_err(P) <= 1e-6, f"row marginal violated by {_row_err(P):.2e}"
    assert _col_err(P) <= 1e-6, f"column marginal violated by {_col_err(P):.2e} (converged={plan.converged})"
    R = P / P.sum(1, keepdims=True)
    for r in range(R.shape[0]):
        assert np.abs(R[r] - 1.0 / R.shape[1]).max() > 1e-2, f"row {r} is (nearly) uniform"


# ------------------------------------------------------------------------------ unbalanced OT
@pytest.mark.parametrize("eps_factor", [0.01, 0.03, 0.1])
def test_uot_one_sided_row_marginal_exact_and_column_relaxed(eps_factor):
    C = _random_cost((3, 12), seed=2)
    eps = eps_factor * float(C.max() - C.min())
    plan = solve_transport(C, "uot", eps, beta=0.1, sided="one")
    P = plan.coupling
    _assert_valid(P, C.shape)
    assert _row_err(P) <= 1e-8, f"variables' marginal off by {_row_err(P):.2e}"
    assert _col_err(P) > 1e-3, "the sites' marginal is not relaxed (plan looks balanced)"
    assert plan.beta == 0.1
    assert plan.transport_mass == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("eps", [1e-3, 3e-4, 1e-4, 1e-6, 1e-9])
@pytest.mark.parametrize("sided", ["one", "two"])
def test_uot_small_epsilon_correct_or_error(eps, sided):
    """Never a silently wrong plan: either a valid plan or a TransportError."""
    C = _random_cost((3, 10), seed=0)
    try:
        plan = solve_transport(C, "uot", eps, beta=0.1, sided=sided)
    except pp.TransportError as exc:
        assert "epsilon" in str(exc)
        return
    P = plan.coupling
    _assert_valid(P, C.shape)
    if sided == "one":
        assert _row_err(P) <= 1e-8


def test_uot_one_sided_recovers_row_argmin_where_balanced_ot_does_not():
    """V=2, S=26 smooth layer profiles preferring layers 10 and 20 (lessons doc, C2 (f))."""
    C = _smooth_profile_cost((10, 20))
    assert list(C.argmin(1)) == [10, 20]
    eps = 0.01 * float(C.max() - C.min())
    uot = solve_transport(C, "uot", eps, beta=0.1, sided="one").coupling
    ot_ = solve_transport(C, "ot", eps).coupling
    assert list(uot.argmax(1)) == [10, 20]
    assert _row_err(uot) <= 1e-8
    # balanced OT must cover every column and drifts away from the preferred layers
    assert list(ot_.argmax(1)) != [10, 20]
    assert _col_err(ot_) <= 1e-6


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("method", METHODS)
def test_solves_are_deterministic(method):
    rng = np.random.default_rng(3)
    C = rng.uniform(size=(3, 15))
    A, N = rng.normal(size=(3, 40)), rng.normal(size=(15, 40))
    scores = rng.uniform(size=(3, 15))
    kw = dict(A_sig=A, N_sig=N, scores=scores)
    eps = 0.05
    p1 = solve_transport(C, method, eps, **kw).coupling
    p2 = solve_transport(C.copy(), method, eps, **kw).coupling
    assert np.array_equal(p1, p2)


# ------------------------------------------------------------------------------ other methods
@pytest.mark.parametrize("method", ["gw", "fgw"])
@pytest.mark.parametrize("eps", [0.005, 0.05])
def test_gw_fgw_return_valid_balanced_plans(method, eps):
    rng = np.random.default_rng(4)
    A, N = rng.normal(size=(3, 40)), rng.normal(size=(10, 40))
    C = rng.uniform(size=(3, 10))
    plan = solve_transport(C, method, eps, A_sig=A, N_sig=N)
    P = plan.coupling
    _assert_valid(P, (3, 10))
    assert _row_err(P) <= 1e-6
    assert _col_err(P) <= 1e-6
    # mean row entropy of the row-normalised plan over log(S), by hand
    R = P / P.sum(1, keepdims=True)
    H = -(R * np.log(np.where(R > 0, R, 1.0))).sum(1)
    assert plan.normalized_entropy == pytest.approx(float(H.mean() / np.log(P.shape[1])), abs=1e-9)


def test_cosine_baseline_valid_and_follows_similarity():
    rng = np.random.default_rng(5)
    A = rng.normal(size=(2, 30))
    N = rng.normal(size=(8, 30))
    N[3] = 2.0 * A[0] + 0.01 * rng.normal(size=30)  # site 3 points along variable 0
    N[6] = 0.5 * A[1]  # site 6 along variable 1
    C = rng.uniform(size=(2, 8))
    P = solve_transport(C, "cosine", 0.05, A_sig=A, N_sig=N).coupling
    _assert_valid(P, (2, 8))
    assert _row_err(P) <= 1e-10
    assert list(P.argmax(1)) == [3, 6]


def test_bruteforce_baseline_valid_and_follows_scores():
    rng = np.random.default_rng(6)
    scores = rng.uniform(size=(3, 9))
    C = rng.uniform(size=(3, 9))
    P = solve_transport(C, "bruteforce", 0.05, scores=scores).coupling
    _assert_valid(P, (3, 9))
    assert _row_err(P) <= 1e-10
    assert np.array_equal(P.argmax(1), scores.argmax(1))
    # a softmax: ordering of each row follows the scores
    for r in range(3):
        assert np.array_equal(np.argsort(P[r]), np.argsort(scores[r]))


@pytest.mark.parametrize("method", ["gw", "fgw", "cosine"])
def test_signature_methods_need_signatures(method):
    with pytest.raises(pp.TransportError, match="signature"):
        solve_transport(np.ones((2, 3)) + np.eye(2, 3), method, 0.05)


def test_bruteforce_needs_scores():
    with pytest.raises(pp.TransportError, match="scores"):
        solve_transport(np.ones((2, 3)) + np.eye(2, 3), "bruteforce", 0.05)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan"), float("-inf")])
def test_nonpositive_epsilon_raises(method, eps):
    rng = np.random.default_rng(7)
    with pytest.raises(pp.TransportError, match="epsilon"):
        solve_transport(rng.uniform(size=(2, 5)), method, eps, A_sig=rng.normal(size=(2, 4)),
                        N_sig=rng.normal(size=(5, 4)), scores=rng.uniform(size=(2, 5)))


def test_unknown_method_and_bad_cost_raise():
    with pytest.raises(pp.TransportError, match="unknown transport method"):
        solve_transport(np.ones((2, 3)), "sinkhorn", 0.1)
    with pytest.raises(pp.TransportError, match="NaN or inf"):
        solve_transport(np.array([[0.0, np.nan]]), "ot", 0.1)
    with pytest.raises(pp.TransportError, match="non-empty"):
        solve_transport(np.zeros((0, 3)), "ot", 0.1)
    with pytest.raises(pp.TransportError, match="beta"):
        solve_transport(np.random.default_rng(0).uniform(size=(2, 3)), "uot", 0.1, beta=0.0)
