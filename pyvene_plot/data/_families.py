"""Per-pair families of a :class:`PairBank`: validation and derivation from a causal model.

A family is the kind of counterfactual a pair is (e.g. which variables differ between base and
source). Families are metadata: they never change inputs or labels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..errors import BankError


def check_family(family: Any, n: int, name: str) -> list[str] | None:
    """Validate a per-pair family: ``None`` or ``N`` hashable labels, stored as a list of str."""
    if family is None:
        return None
    if isinstance(family, (str, bytes)):
        raise BankError(
            f"bank {name!r}: family must be a sequence of {n} labels (one per pair), got a single string"
        )
    if hasattr(family, "tolist"):  # tensor / ndarray
        if getattr(family, "ndim", 1) != 1:
            raise BankError(f"bank {name!r}: family must be 1-d with {n} labels, got shape {tuple(family.shape)}")
        family = family.tolist()
    try:
        items = list(family)
    except TypeError as exc:
        raise BankError(f"bank {name!r}: family must be a sequence of {n} labels, got {type(family).__name__}") from exc
    if len(items) != n:
        raise BankError(
            f"bank {name!r}: family has {len(items)} labels but the bank has N={n} pairs; "
            "pass one family label per pair"
        )
    bad = [i for i, f in enumerate(items) if f is None or not isinstance(f, Hashable)]
    if bad:
        raise BankError(
            f"bank {name!r}: family label at pair {bad[0]} is {items[bad[0]]!r}; labels must be hashable and not None "
            "(e.g. 'WX+YZ', 'flip_A0')"
        )
    return [str(f) for f in items]


def differing_variables_family(cm: Any, variables: Sequence[str]) -> Callable[[dict, dict], str]:
    """The default ``family_fn`` of :meth:`PairBank.from_causal_model`.

    Returns ``family_fn(base_setting, source_setting)``: the ``variables`` whose value (from
    ``cm.run_forward``) differs between base and source, joined by ``"+"`` in ``variables`` order,
    or ``"none"`` when they all agree.
    """
    variables = list(variables)

    def family_fn(base: dict, source: dict) -> str:
        bv, sv = cm.run_forward(base), cm.run_forward(source)
        diff = [v for v in variables if bv[v] != sv[v]]
        return "+".join(diff) if diff else "none"
    return family_fn


def derive_families(cm: Any, rows: list[tuple], variables: list[str], family: Any) -> list[Hashable] | None:
    """Per-row family labels for :meth:`PairBank.from_causal_model` (``None`` when turned off).

    ``rows`` are ``(base setting, source setting, ...)`` tuples; ``family`` is ``True`` (derive with
    :func:`differing_variables_family`), ``False``/``None``, or a ``family_fn(base, source)``.
    """
    if family is False or family is None:
        return None
    if family is True:
        family_fn = differing_variables_family(cm, variables)
    elif callable(family):
        family_fn = family
    else:
        raise BankError(
            f"family must be True, False or a callable family_fn(base_setting, source_setting) -> str, got {family!r}"
        )
    return [family_fn(r[0], r[1]) for r in rows]
