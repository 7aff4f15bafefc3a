"""Pair banks: (base, source) input pairs with the causal model's counterfactual labels.

A :class:`PairBank` holds ``N`` pairs. For every abstract variable ``Z`` it stores the label the
high-level causal model predicts when ``Z`` is interchanged from the source into the base
(``counterfactual_labels[Z]``), next to the label on the base itself (``base_labels``). Everything
downstream (signatures, calibration, evaluation, DAS) reads banks, so they are validated on
construction: equal ``N`` everywhere, integer labels in range, at least one variable.

A bank may also carry a per-pair **family** (the kind of counterfactual: e.g. which variables
differ between base and source, or a task's own source families such as one-bit flips). Families
are metadata only: no label or input depends on them. They are stored as ``bank.family``, a list
of ``N`` str (``None`` when the bank has none); ``bank.families`` is their fixed order (sorted
distinct labels), the block order of the ``family_mean`` signature.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

from ..errors import BankError
from ._families import check_family, derive_families
from ._inputs import Inputs, index_inputs, inputs_len, inputs_to, same_structure

logger = logging.getLogger(__name__)


def _as_labels(x: Any, what: str) -> torch.Tensor:
    if x is None:
        raise BankError(f"{what} is None; pass a LongTensor of shape (N,)")
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point:
        if not torch.all(t == t.round()):
            raise BankError(f"{what} must hold integer class indices, got non-integer floats")
        t = t.round()
    if t.dtype == torch.bool:
        t = t.long()
    return t.long()


class PairBank:
    """A bank of ``N`` (base, source) pairs with counterfactual labels per abstract variable.

    Parameters
    ----------
    base : Tensor or dict of Tensor
        Model inputs for the base examples, first dimension ``N``. A tensor of integer dtype is
        passed to the model as ``input_ids``, a floating tensor as ``inputs_embeds``; a dict is
        passed as keyword arguments (e.g. ``{"input_ids": ..., "attention_mask": ...}``).
    source : Tensor or dict of Tensor
        Model inputs for the source examples; same structure and ``N`` as ``base``.
    base_labels : LongTensor, shape (N,)
        The causal model's output class on each base.
    counterfactual_labels : dict of str to LongTensor, shape (N,)
        For each variable, the output class when that variable is interchanged from source into base.
    name : str, default "bank"
        Used in messages and reports.
    num_classes : int, optional
        If given, every label must lie in ``[0, num_classes)``.
    meta : dict, optional
        Free-form provenance (how the bank was built, counts of skipped examples, ...).
    readout : Readout, optional
        How the model's outputs become the classes these labels index. Searchers and DAS use it
        when they are not given a readout (tasks set it on their banks).
    family : sequence of hashable, length N, optional
        The family (kind of counterfactual) of each pair, e.g. ``"WX+YZ"`` or ``"flip_A0"``. Stored
        as ``bank.family``, a list of str; kept by :meth:`subset`, :meth:`split`, :meth:`to` and
        :meth:`select_variables`; needed by the ``family_mean`` signature.

    Raises
    ------
    BankError
        On empty banks, mismatched lengths, missing variables, labels out of range, or a family
        whose length is not N.
    """

    def __init__(
        self,
        base: Inputs,
        source: Inputs,
        base_labels: torch.Tensor,
        counterfactual_labels: Mapping[str, torch.Tensor],
        name: str = "bank",
        num_classes: int | None = None,
        meta: dict | None = None,
        readout: Any = None,
        family: Sequence[Hashable] | Any = None,
    ) -> None:
        self.name = str(name)
        self.readout = readout
        n_base = inputs_len(base)
        n_src = inputs_len(source)
        if n_base == 0:
            raise BankError(f"bank {self.name!r} is empty (N=0); build it with at least one pair")
        if n_base != n_src:
            raise BankError(
                f"bank {self.name!r}: base has N={n_base} rows but source has N={n_src}; "
                "base and source must be paired row by row"
            )
        if not same_structure(base, source):
            raise BankError(
                f"bank {self.name!r}: base and source inputs differ in structure "
                "(dict keys, trailing tensor shape, or integer ids vs float embeddings); they must be built the same way"
            )
        base_labels = _as_labels(base_labels, f"bank {self.name!r} base_labels")
        if base_labels.dim() != 1 or base_labels.shape[0] != n_base:
            raise BankError(
                f"bank {self.name!r}: base_labels has shape {tuple(base_labels.shape)}, expected ({n_base},)"
            )
        if not isinstance(counterfactual_labels, Mapping) or len(counterfactual_labels) == 0:
            raise BankError(
                f"bank {self.name!r} has no counterfactual labels; pass a dict "
                "{variable_name: LongTensor[N]} with at least one variable"
            )
        cf: dict[str, torch.Tensor] = {}
        for var, lab in counterfactual_labels.items():
            if lab is None or torch.as_tensor(lab).numel() == 0:
                raise BankError(
                    f"bank {self.name!r}: variable {var!r} has no counterfactual labels; "
                    f"pass a LongTensor of shape ({n_base},) or drop the variable"
                )
            t = _as_labels(lab, f"bank {self.name!r} counterfactual_labels[{var!r}]")
            if t.dim() != 1 or t.shape[0] != n_base:
                raise BankError(
                    f"bank {self.name!r}: counterfactual_labels[{var!r}] has shape {tuple(t.shape)}, "
                    f"expected ({n_base},) to match the {n_base} pairs"
                )
            cf[str(var)] = t
        all_labels = torch.cat([base_labels, *cf.values()])
        if int(all_labels.min()) < 0:
            raise BankError(f"bank {self.name!r} holds negative labels; labels are class indices >= 0")
        if num_classes is not None and int(all_labels.max()) >= num_classes:
            raise BankError(
                f"bank {self.name!r} holds label {int(all_labels.max())} but num_classes={num_classes}; "
                "labels must index the model's output classes"
            )
        self.base = base
        self.source = source
        self.base_labels = base_labels
        self.counterfactual_labels = cf
        self.num_classes = num_classes
        self.meta = dict(meta or {})
        self.family = check_family(family, n_base, self.name)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.base_labels.shape[0])

    @property
    def variables(self) -> list[str]:
        """Names of the abstract variables, in insertion order."""
        return list(self.counterfactual_labels)

    def __repr__(self) -> str:
        ch = ", ".join(f"{v}: {int(self.changed(v).sum())}" for v in self.variables)
        return f"PairBank(name={self.name!r}, N={len(self)}, variables={self.variables}, changed={{{ch}}})"

    def check_variables(self, variables: Sequence[str]) -> None:
        """Raise if any of ``variables`` is not in the bank."""
        unknown = [v for v in variables if v not in self.counterfactual_labels]
        if unknown:
            raise BankError(
                f"unknown variable(s) {unknown} for bank {self.name!r}; it has {self.variables}"
            )

    def changed(self, variable: str) -> torch.Tensor:
        """BoolTensor[N]: pairs where interchanging ``variable`` changes the output."""
        self.check_variables([variable])
        return self.counterfactual_labels[variable] != self.base_labels

    def labels(self, variable: str) -> torch.Tensor:
        """Counterfactual labels of ``variable``, LongTensor[N]."""
        self.check_variables([variable])
        return self.counterfactual_labels[variable]

    @property
    def families(self) -> list[str]:
        """Distinct family labels in their fixed (sorted) order; ``[]`` when the bank has none."""
        return sorted(set(self.family)) if self.family is not None else []

    def family_counts(self) -> dict[str, int]:
        """Pairs per family, in :attr:`families` order; ``{}`` when the bank has none."""
        if self.family is None:
            return {}
        counts = {f: 0 for f in self.families}
        for f in self.family:
            counts[f] += 1
        return counts

    def max_label(self) -> int:
        """Largest label anywhere in the bank."""
        return int(torch.cat([self.base_labels, *self.counterfactual_labels.values()]).max())

    def summary(self) -> dict:
        """Counts for reports: N, changed pairs per variable, provenance, and pairs per family
        (``family_counts``, only when the bank has families)."""
        out = {
            "name": self.name,
            "n": len(self),
            "variables": self.variables,
            "n_changed": {v: int(self.changed(v).sum()) for v in self.variables},
            "meta": {k: v for k, v in self.meta.items() if isinstance(v, (int, float, str, dict, list))},
        }
        if self.family is not None:
            out["family_counts"] = self.family_counts()
        return out

    # ---------------------------------------------------------------- selection
    def subset(self, idx: torch.Tensor | Sequence[int], name: str | None = None) -> "PairBank":
        """A new bank with the rows ``idx`` (families follow their pairs)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        family = None if self.family is None else [self.family[i] for i in idx.tolist()]
        return PairBank(
            index_inputs(self.base, idx),
            index_inputs(self.source, idx),
            self.base_labels[idx],
            {v: t[idx] for v, t in self.counterfactual_labels.items()},
            name=name or self.name,
            num_classes=self.num_classes,
            meta=dict(self.meta),
            readout=self.readout,
            family=family,
        )

    def select_variables(self, variables: Sequence[str]) -> "PairBank":
        """A bank restricted to some variables (same pairs)."""
        self.check_variables(variables)
        return PairBank(
            self.base, self.source, self.base_labels,
            {v: self.counterfactual_labels[v] for v in variables},
            name=self.name, num_classes=self.num_classes, meta=dict(self.meta), readout=self.readout,
            family=self.family,
        )

    def split(
        self, fractions: Sequence[float], seed: int = 0, names: Sequence[str] | None = None
    ) -> tuple["PairBank", ...]:
        """Randomly partition the pairs.

        Parameters
        ----------
        fractions : sequence of float
            Positive fractions summing to 1 (within 1e-6), e.g. ``[0.5, 0.25, 0.25]``.
        seed : int
            Permutation seed (a local generator; global RNG state is untouched).
        names : sequence of str, optional
            Names of the parts; defaults to ``fit, calibration, test`` for three parts.

        Returns
        -------
        tuple of PairBank
            Disjoint banks covering every pair once; each part has at least one pair.
        """
        fr = [float(f) for f in fractions]
        if not fr or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise BankError(f"split fractions must be positive and sum to 1, got {fractions}")
        n = len(self)
        if n < len(fr):
            raise BankError(f"cannot split {n} pairs into {len(fr)} non-empty parts")
        if names is None:
            names = ["fit", "calibration", "test"] if len(fr) == 3 else [f"{self.name}_{i}" for i in range(len(fr))]
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=g)
        bounds = [0]
        acc = 0.0
        for f in fr[:-1]:
            acc += f
            bounds.append(int(round(acc * n)))
        bounds.append(n)
        parts = []
        for i in range(len(fr)):
            lo, hi = bounds[i], bounds[i + 1]
            if hi <= lo:
                raise BankError(f"split part {i} ({names[i]}) would be empty with N={n} and fractions {fr}")
            parts.append(self.subset(perm[lo:hi], name=names[i]))
        return tuple(parts)

    def to(self, device: torch.device | str) -> "PairBank":
        """A copy with inputs moved to ``device`` (labels stay on CPU)."""
        out = PairBank(inputs_to(self.base, device), inputs_to(self.source, device), self.base_labels,
                       self.counterfactual_labels, name=self.name, num_classes=self.num_classes, meta=self.meta,
                       readout=self.readout, family=self.family)
        return out

    # --------------------------------------------------------- causal models
    @classmethod
    def from_causal_model(
        cls,
        causal_model: Any,
        to_model_inputs: Callable[[dict], Inputs],
        n: int = 1000,
        variables: Sequence[str] | None = None,
        seed: int = 0,
        sampler: Callable[[random.Random], dict] | None = None,
        pair_sampler: Callable[[random.Random], tuple[dict, dict]] | None = None,
        output_var: str | None = None,
        label_of: Callable[[Any], int] | None = None,
        balance: bool = True,
        max_tries: int = 2000,
        name: str = "bank",
        family: bool | Callable[[dict, dict], Hashable] = True,
    ) -> "PairBank":
        """Sample (base, source) pairs from a pyvene ``CausalModel`` and label them.

        Parameters
        ----------
        causal_model : pyvene.data_generators.causal_model.CausalModel
            The high-level model. Counterfactual labels come from ``causal_model.run_interchange``.
        to_model_inputs : callable
            Maps one input setting (dict of input-variable values) to the model inputs of one
            example: a Tensor without batch dimension, or a dict of such Tensors.
        n : int
            Number of pairs.
        variables : sequence of str, optional
            Variables to label; default: every non-input, non-output variable.
        seed : int
            Seed of the local RNG used for sampling.
        sampler : callable, optional
            ``sampler(rng) -> dict`` of input-variable values, called once for the base and once
            for the source of each pair. Default: each input uniform over ``causal_model.values[var]``.
        pair_sampler : callable, optional
            ``pair_sampler(rng) -> (base_setting, source_setting)`` for related pairs (e.g. sources
            that differ from the base in one bit); overrides ``sampler``.
        output_var : str, optional
            The output variable; required when the causal model has several.
        label_of : callable, optional
            Maps an output value to a class index; default: its index in
            ``causal_model.values[output_var]``.
        balance : bool, default True
            Reserve ``n // (V + 1)`` pairs per variable in which interchanging that variable
            changes the output (rejection sampling, at most ``max_tries`` draws per pair), so every
            variable has well-represented sensitive pairs. The rest is sampled freely.
        max_tries : int
            Rejection-sampling budget per reserved pair.
        name : str
            Bank name.
        family : bool or callable, default True
            Per-pair families (:attr:`family`). ``True``: derived from the causal model, the
            labelled ``variables`` whose value differs between base and source, joined by ``"+"`` in
            ``variables`` order (e.g. ``"WX+YZ"``, ``"WX"``), or ``"none"``. A callable
            ``family_fn(base_setting, source_setting) -> label`` sets them instead; ``False``
            builds a bank without families. Families never change the sampled pairs or labels
            (they are computed after sampling, without the sampling RNG).
        """
        if n <= 0:
            raise BankError(f"n must be positive to build a bank, got n={n}")
        cm = causal_model
        output_var, variables = _check_causal_variables(cm, output_var, variables)
        out_values = list(cm.values[output_var])
        if label_of is None:
            label_of = _index_in(out_values, output_var)
        rng = random.Random(int(seed))
        if sampler is None:
            sampler = _uniform_sampler(cm)
        if pair_sampler is not None and not callable(pair_sampler):
            raise BankError("pair_sampler must be a callable rng -> (base_setting, source_setting)")

        def draw_pair() -> tuple:
            b, s = pair_sampler(rng) if pair_sampler is not None else (sampler(rng), sampler(rng))
            base_out = cm.run_forward(b)[output_var]
            cfs = {v: cm.run_interchange(b, {v: s})[output_var] for v in variables}
            return b, s, base_out, cfs

        quota = (n // (len(variables) + 1)) if balance else 0
        rows, tries_total = _sample_rows(draw_pair, variables, n, quota, max_tries, output_var, rng)
        base_inputs = _stack_inputs([to_model_inputs(r[0]) for r in rows])
        source_inputs = _stack_inputs([to_model_inputs(r[1]) for r in rows])
        base_labels = torch.tensor([label_of(r[2]) for r in rows], dtype=torch.long)
        cf = {v: torch.tensor([label_of(r[3][v]) for r in rows], dtype=torch.long) for v in variables}
        # ``sampler`` is never None here (the uniform default was filled in above), so a bank without
        # a pair_sampler records "sampler" even when it was sampled uniformly; kept as it was
        sampling = "pair_sampler" if pair_sampler is not None else ("sampler" if sampler is not None else "uniform")
        meta = {"built_from": "causal_model", "seed": int(seed), "sampling": sampling, "balance": bool(balance),
                "reserved_per_variable": quota, "draws": tries_total, "output_var": output_var}
        fam = derive_families(cm, rows, variables, family)
        if fam is not None:
            meta["family"] = "custom" if callable(family) else "differing_variables"
        bank = cls(base_inputs, source_inputs, base_labels, cf, name=name, num_classes=len(out_values), meta=meta,
                   family=fam)
        bank.settings = ([r[0] for r in rows], [r[1] for r in rows])  # type: ignore[attr-defined]
        logger.info("built %r", bank)
        return bank


# ------------------------------------------------------------------ steps of PairBank.from_causal_model
def _check_causal_variables(cm: Any, output_var: str | None, variables: Sequence[str] | None) -> tuple[str, list[str]]:
    """Resolve and check the output variable and the variables to label (default: every intermediate one)."""
    inputs = list(cm.inputs)
    if output_var is None:
        if len(cm.outputs) != 1:
            raise BankError(f"causal model has outputs {cm.outputs}; pass output_var= to choose one")
        output_var = cm.outputs[0]
    elif output_var not in cm.variables:
        raise BankError(f"output_var {output_var!r} is not a variable of the causal model {cm.variables}")
    if variables is None:
        variables = [v for v in cm.variables if v not in inputs and v not in cm.outputs]
    variables = list(variables)
    unknown = [v for v in variables if v not in cm.variables]
    if unknown:
        raise BankError(f"unknown variable(s) {unknown}; the causal model has {cm.variables}")
    if not variables:
        raise BankError("no variables to label; pass variables=[...] naming intermediate variables")
    return output_var, variables


def _index_in(out_values: list, output_var: str) -> Callable[[Any], int]:
    """The default ``label_of``: an output value's index in ``causal_model.values[output_var]``."""
    def label_of(value: Any) -> int:
        try:
            return out_values.index(value)
        except ValueError as exc:
            raise BankError(
                f"output value {value!r} is not in causal_model.values[{output_var!r}]; "
                "pass label_of= to map outputs to class indices"
            ) from exc
    return label_of


def _uniform_sampler(cm: Any) -> Callable[[random.Random], dict]:
    """The default ``sampler``: each input variable uniform over ``causal_model.values[var]``."""
    inputs = list(cm.inputs)

    def sampler(r: random.Random) -> dict:
        return {v: r.choice(list(cm.values[v])) for v in inputs}
    return sampler


def _sample_rows(draw_pair: Callable[[], tuple], variables: list[str], n: int, quota: int, max_tries: int,
                 output_var: str, rng: random.Random) -> tuple[list[tuple], int]:
    """Draw ``n`` labelled pairs: first ``quota`` per variable where it changes the output, then freely; shuffled.

    Each row is ``(base setting, source setting, base output, {variable: counterfactual output})``.
    Returns the rows and the number of draws.
    """
    rows: list[tuple] = []
    tries_total = 0
    for v in variables:
        got = 0
        while got < quota:
            for _ in range(max_tries):
                tries_total += 1
                b, s, bo, cfs = draw_pair()
                if cfs[v] != bo:
                    rows.append((b, s, bo, cfs))
                    got += 1
                    break
            else:
                raise BankError(
                    f"could not find a pair where interchanging {v!r} changes {output_var!r} in "
                    f"{max_tries} draws; the variable may be causally inert under this sampler "
                    "(pass a sampler= that makes it matter, or balance=False)"
                )
    while len(rows) < n:
        tries_total += 1
        rows.append(draw_pair())
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[i] for i in order], tries_total


def _stack_inputs(items: list[Inputs]) -> Inputs:
    """Stack per-example model inputs (tensors or dicts of tensors) along a new batch dimension."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items, 0)
    if isinstance(items[0], Mapping):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items], 0) for k in items[0]}
    return torch.stack([torch.as_tensor(it) for it in items], 0)
