"""PairBank: labels from a pyvene CausalModel (checked directly against the causal model and in
closed form), splits, ``changed`` and validation of malformed banks.
"""

from __future__ import annotations

import random

import pytest
import torch
from pyvene.data_generators.causal_model import CausalModel

import pyvene_plot as pp

VALS = [0, 1, 2]
OUT_VALUES = sorted({(a + b) * c for a in VALS for b in VALS for c in VALS})  # output classes


def _sum_times_causal_model(with_inert: bool = False) -> CausalModel:
    """O = (A + B) * C with the intermediate S = A + B (and optionally an inert T = B * C)."""
    variables = ["A", "B", "C", "S", "O"] + (["T"] if with_inert else [])
    values = {"A": list(VALS), "B": list(VALS), "C": list(VALS), "S": list(range(5)), "O": list(OUT_VALUES)}
    parents = {"A": [], "B": [], "C": [], "S": ["A", "B"], "O": ["S", "C"]}
    functions = {"A": lambda: 0, "B": lambda: 0, "C": lambda: 0,
                 "S": lambda a, b: a + b, "O": lambda s, c: s * c}
    if with_inert:
        values["T"] = sorted({b * c for b in VALS for c in VALS})
        parents["T"] = ["B", "C"]
        functions["T"] = lambda b, c: b * c
    return CausalModel(variables, values, parents, functions, pos={})


def _to_inputs(setting: dict) -> torch.Tensor:
    return torch.tensor([[float(setting["A"]), float(setting["B"]), float(setting["C"])]])


def _decode(x: torch.Tensor) -> list[dict]:
    return [{"A": int(r[0]), "B": int(r[1]), "C": int(r[2])} for r in x[:, 0].round().long()]


@pytest.fixture(scope="module")
def cm():
    return _sum_times_causal_model()


@pytest.fixture(scope="module")
def bank(cm):
    return pp.PairBank.from_causal_model(cm, _to_inputs, n=300, variables=["S"], seed=3, name="all")


def test_from_causal_model_labels_match_causal_model_and_closed_form(cm, bank):
    assert len(bank) == 300 and bank.variables == ["S"]
    assert bank.num_classes == len(OUT_VALUES)
    bases, sources = _decode(bank.base), _decode(bank.source)
    for i, (b, s) in enumerate(zip(bases, sources)):
        # closed form
        base_out = (b["A"] + b["B"]) * b["C"]
        cf_out = (s["A"] + s["B"]) * b["C"]
        assert int(bank.base_labels[i]) == OUT_VALUES.index(base_out)
        assert int(bank.labels("S")[i]) == OUT_VALUES.index(cf_out)
        # straight from the causal model
        assert OUT_VALUES[int(bank.base_labels[i])] == cm.run_forward(b)["O"]
        assert OUT_VALUES[int(bank.labels("S")[i])] == cm.run_interchange(b, {"S": s})["O"]


def test_from_causal_model_default_variables_and_balance(cm, bank):
    auto = pp.PairBank.from_causal_model(cm, _to_inputs, n=60, seed=0)
    assert auto.variables == ["S"]  # every non-input, non-output variable
    # balance=True reserves n // (V + 1) changed pairs per variable
    assert int(bank.changed("S").sum()) >= 300 // 2
    assert bank.meta["reserved_per_variable"] == 150 and bank.meta["balance"] is True
    assert bank.meta["draws"] >= 300 and bank.meta["output_var"] == "O"
    free = pp.PairBank.from_causal_model(cm, _to_inputs, n=300, variables=["S"], seed=3, balance=False)
    assert free.meta["reserved_per_variable"] == 0 and free.meta["draws"] == 300
    # the recorded settings are the rows' own settings
    assert [_decode(bank.base[i : i + 1])[0] for i in range(5)] == bank.settings[0][:5]
    # same seed, same bank; different seed, different bank
    again = pp.PairBank.from_causal_model(cm, _to_inputs, n=300, variables=["S"], seed=3)
    assert torch.equal(again.base, bank.base) and torch.equal(again.source, bank.source)
    assert torch.equal(again.labels("S"), bank.labels("S"))
    other = pp.PairBank.from_causal_model(cm, _to_inputs, n=300, variables=["S"], seed=4)
    assert not torch.equal(other.base, bank.base)


def test_changed_is_cf_differs_from_base(bank):
    bases, sources = _decode(bank.base), _decode(bank.source)
    expected = torch.tensor([
        (s["A"] + s["B"]) * b["C"] != (b["A"] + b["B"]) * b["C"] for b, s in zip(bases, sources)
    ])
    assert torch.equal(bank.changed("S"), expected)
    assert bank.changed("S").dtype == torch.bool
    assert 0 < int(expected.sum()) < len(bank)


def test_split_is_a_disjoint_partition(bank):
    parts = bank.split([0.5, 0.25, 0.25], seed=7)
    assert [p.name for p in parts] == ["fit", "calibration", "test"]
    assert [len(p) for p in parts] == [150, 75, 75]
    # identify rows by their full (base, source, labels) content and the original row index
    key = lambda b, i: (tuple(b.base[i].flatten().tolist()), tuple(b.source[i].flatten().tolist()),
                        int(b.base_labels[i]), int(b.labels("S")[i]))
    original = sorted(key(bank, i) for i in range(len(bank)))
    pieces = [sorted(key(p, i) for i in range(len(p))) for p in parts]
    assert sorted(sum(pieces, [])) == original  # covers every pair exactly once
    # disjoint as multisets of row indices: use a bank whose rows are all distinct
    n = 40
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    distinct = pp.PairBank(x, x + 100, torch.zeros(n, dtype=torch.long), {"V": torch.arange(n) % 2})
    a, b, c = distinct.split([0.5, 0.25, 0.25], seed=1)
    ids = [set(p.base.flatten().long().tolist()) for p in (a, b, c)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(n))
    # rows stay paired with their labels
    for p in (a, b, c):
        assert torch.equal(p.source, p.base + 100)
        assert torch.equal(p.labels("V"), p.base.flatten().long() % 2)
    # deterministic in the seed, different across seeds
    a2, _, _ = distinct.split([0.5, 0.25, 0.25], seed=1)
    a3, _, _ = distinct.split([0.5, 0.25, 0.25], seed=2)
    assert torch.equal(a.base, a2.base) and not torch.equal(a.base, a3.base)


def test_split_rejects_bad_fractions(bank):
    with pytest.raises(pp.BankError, match="fractions"):
        bank.split([0.5, 0.6])
    with pytest.raises(pp.BankError, match="fractions"):
        bank.split([1.2, -0.2])
    tiny = bank.subset([0, 1])
    with pytest.raises(pp.BankError, match="non-empty"):
        tiny.split([0.4, 0.3, 0.3])


def test_from_causal_model_inert_variable_is_reported():
    cm = _sum_times_causal_model(with_inert=True)
    with pytest.raises(pp.BankError, match="output_var"):
        pp.PairBank.from_causal_model(cm, _to_inputs, n=10, variables=["S"])  # two outputs: O and T
    with pytest.raises(pp.BankError, match="inert"):
        pp.PairBank.from_causal_model(cm, _to_inputs, n=10, variables=["S", "T"], output_var="O",
                                      max_tries=50)
    with pytest.raises(pp.BankError, match="unknown variable"):
        pp.PairBank.from_causal_model(cm, _to_inputs, n=10, variables=["Q"], output_var="O")


def test_custom_sampler_is_used(cm):
    def sampler(rng: random.Random) -> dict:
        return {"A": rng.choice([1, 2]), "B": 0, "C": 2}

    bank = pp.PairBank.from_causal_model(cm, _to_inputs, n=20, variables=["S"], seed=0, sampler=sampler)
    for s in _decode(bank.base) + _decode(bank.source):
        assert s["A"] in (1, 2) and s["B"] == 0 and s["C"] == 2


def test_heq_causal_model_banks_match_direct_labels():
    """The HEQ causal model used by the built-in tasks, labelled row by row with run_interchange."""
    from pyvene_plot.tasks.heq import balanced_sampler, heq_causal_model

    cm = heq_causal_model(6)

    def to_inputs(s):
        return torch.tensor([[float(s[v]) for v in "WXYZ"]])

    bank = pp.PairBank.from_causal_model(cm, to_inputs, n=120, variables=["WX", "YZ"], seed=1,
                                         sampler=balanced_sampler(6))
    ids_b = bank.base[:, 0].long()
    ids_s = bank.source[:, 0].long()
    for i in range(len(bank)):
        b = dict(zip("WXYZ", ids_b[i].tolist()))
        s = dict(zip("WXYZ", ids_s[i].tolist()))
        for v in ("WX", "YZ"):
            assert int(bank.labels(v)[i]) == int(cm.run_interchange(b, {v: s})["O"])
        bwx, byz = b["W"] == b["X"], b["Y"] == b["Z"]
        swx, syz = s["W"] == s["X"], s["Y"] == s["Z"]
        assert int(bank.base_labels[i]) == int(bwx == byz)
        assert int(bank.labels("WX")[i]) == int(swx == byz)
        assert int(bank.labels("YZ")[i]) == int(bwx == syz)


def test_pair_sampler_and_dict_inputs(cm):
    """Related pairs from a pair_sampler; dict model inputs are stacked key by key."""
    def pair_sampler(rng: random.Random) -> tuple[dict, dict]:
        a = rng.choice(VALS)
        return {"A": a, "B": 1, "C": 2}, {"A": (a + 1) % 3, "B": 1, "C": 2}

    def to_inputs(setting: dict) -> dict:
        x = _to_inputs(setting)
        return {"inputs_embeds": x, "mask": torch.ones(1, dtype=torch.long)}

    bank = pp.PairBank.from_causal_model(cm, to_inputs, n=30, variables=["S"], seed=2, pair_sampler=pair_sampler,
                                         balance=False)
    assert set(bank.base) == {"inputs_embeds", "mask"}
    assert bank.base["inputs_embeds"].shape == (30, 1, 3) and bank.base["mask"].shape == (30, 1)
    assert bank.meta["sampling"] == "pair_sampler"
    for b, s in zip(_decode(bank.base["inputs_embeds"]), _decode(bank.source["inputs_embeds"])):
        assert s["A"] == (b["A"] + 1) % 3 and (b["B"], b["C"]) == (s["B"], s["C"]) == (1, 2)
    # S always changes here (A moves, B fixed, C = 2), so every pair is sensitive
    assert bool(bank.changed("S").all())
    with pytest.raises(pp.BankError, match="pair_sampler"):
        pp.PairBank.from_causal_model(cm, to_inputs, n=5, variables=["S"], pair_sampler="not callable")


# ----------------------------------------------------------------------------- families
def _distinct_bank(n: int = 40, family=None) -> pp.PairBank:
    """Rows identified by their base value ``i``; the family of row ``i`` defaults to ``f{i % 3}``."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    fam = [f"f{i % 3}" for i in range(n)] if family is None else family
    return pp.PairBank(x, x + 100, torch.zeros(n, dtype=torch.long), {"V": torch.arange(n) % 2}, family=fam)


def test_family_is_validated_and_stored_as_str():
    bank = _distinct_bank(6, family=torch.tensor([0, 1, 0, 1, 2, 2]))
    assert bank.family == ["0", "1", "0", "1", "2", "2"]
    assert bank.families == ["0", "1", "2"] and bank.family_counts() == {"0": 2, "1": 2, "2": 2}
    assert bank.summary()["family_counts"] == {"0": 2, "1": 2, "2": 2}
    plain = pp.PairBank(bank.base, bank.source, bank.base_labels, bank.counterfactual_labels)
    assert plain.family is None and plain.families == [] and "family_counts" not in plain.summary()
    with pytest.raises(pp.BankError, match="family has 5 labels but the bank has N=6"):
        _distinct_bank(6, family=["a"] * 5)
    with pytest.raises(pp.BankError, match="single string"):
        _distinct_bank(6, family="aaaaaa")
    with pytest.raises(pp.BankError, match="not None"):
        _distinct_bank(3, family=["a", None, "b"])
    with pytest.raises(pp.BankError, match="1-d"):
        _distinct_bank(4, family=torch.zeros(2, 2))


def test_split_subset_to_and_select_keep_families_with_their_pairs():
    bank = _distinct_bank(40)
    parts = bank.split([0.5, 0.25, 0.25], seed=1)
    sub = bank.subset([5, 3, 3, 10])
    for p in (*parts, sub, bank.to("cpu"), bank.select_variables(["V"])):
        ids = p.base.flatten().long().tolist()
        assert p.family == [f"f{i % 3}" for i in ids]
    assert sub.family == ["f2", "f0", "f0", "f1"]
    assert sum(sum(p.family_counts().values()) for p in parts) == 40


def test_from_causal_model_derives_families_from_differing_variables(cm, bank):
    # variables=["S"]: the family is "S" when A + B differs between base and source, else "none"
    bases, sources = _decode(bank.base), _decode(bank.source)
    expected = ["S" if b["A"] + b["B"] != s["A"] + s["B"] else "none" for b, s in zip(bases, sources)]
    assert bank.family == expected and set(expected) == {"S", "none"}
    assert bank.meta["family"] == "differing_variables"
    # two variables: "+"-joined in variables order
    cm2 = _sum_times_causal_model(with_inert=True)
    two = pp.PairBank.from_causal_model(cm2, _to_inputs, n=80, variables=["S", "T"], output_var="O", seed=0,
                                        balance=False)
    for b, s, f in zip(_decode(two.base), _decode(two.source), two.family):
        diff = [v for v, val in (("S", lambda d: d["A"] + d["B"]), ("T", lambda d: d["B"] * d["C"]))
                if val(b) != val(s)]
        assert f == ("+".join(diff) or "none")
    assert "S+T" in two.family


def test_from_causal_model_families_change_no_number(cm, bank):
    off = pp.PairBank.from_causal_model(cm, _to_inputs, n=300, variables=["S"], seed=3, name="all", family=False)
    assert off.family is None and "family" not in off.meta
    custom = pp.PairBank.from_causal_model(cm, _to_inputs, n=300, variables=["S"], seed=3,
                                           family=lambda b, s: f"C{b['C']}")
    assert custom.family == [f"C{b['C']}" for b in _decode(custom.base)] and custom.meta["family"] == "custom"
    for other in (off, custom):
        assert torch.equal(other.base, bank.base) and torch.equal(other.source, bank.source)
        assert torch.equal(other.base_labels, bank.base_labels) and torch.equal(other.labels("S"), bank.labels("S"))
        assert other.settings == bank.settings and other.meta["draws"] == bank.meta["draws"]
    with pytest.raises(pp.BankError, match="family must be True, False or a callable"):
        pp.PairBank.from_causal_model(cm, _to_inputs, n=5, variables=["S"], family="yes")
