"""Bad input: every problem raises a pyvene_plot error whose message names it; nothing half-written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import pyvene_plot as pp
import pyvene_plot._utils

L = torch.long


def _fast_searcher(**kw) -> pp.OTAlignmentSearcher:
    params = dict(method="uot", epsilon=[0.05], beta=[0.1], top_k=(1,), lambdas=(1.0,), progress=False)
    params.update(kw)
    return pp.OTAlignmentSearcher(**params)


def _with_label(bank: pp.PairBank, var: str, row: int, value: int) -> pp.PairBank:
    bad = copy.copy(bank)
    bad.counterfactual_labels = {k: v.clone() for k, v in bank.counterfactual_labels.items()}
    bad.counterfactual_labels[var][row] = value
    return bad


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


# ------------------------------------------------------------------------------ banks
def test_bank_tensors_of_different_lengths():
    x5, x4 = torch.zeros(5, 1, 8), torch.zeros(4, 1, 8)
    z5 = torch.zeros(5, dtype=L)
    with pytest.raises(pp.BankError, match=r"N=5.*N=4"):
        pp.PairBank(x5, x4, z5, {"V": z5})
    with pytest.raises(pp.BankError, match="base_labels"):
        pp.PairBank(x5, x5, torch.zeros(4, dtype=L), {"V": z5})
    with pytest.raises(pp.BankError, match=r"counterfactual_labels\['V'\]"):
        pp.PairBank(x5, x5, z5, {"V": torch.zeros(6, dtype=L)})
    with pytest.raises(pp.BankError, match="different lengths"):
        pp.PairBank({"input_ids": torch.zeros(5, 3, dtype=L), "attention_mask": torch.ones(4, 3)},
                    {"input_ids": torch.zeros(5, 3, dtype=L), "attention_mask": torch.ones(5, 3)}, z5, {"V": z5})


@pytest.mark.parametrize("labels", [torch.zeros(0, dtype=L), None, []])
def test_variable_without_counterfactual_labels(labels):
    x = torch.zeros(5, 1, 8)
    with pytest.raises(pp.BankError, match="no counterfactual labels"):
        pp.PairBank(x, x, torch.zeros(5, dtype=L), {"V": labels})
    with pytest.raises(pp.BankError, match="no counterfactual labels"):
        pp.PairBank(x, x, torch.zeros(5, dtype=L), {})


def test_scalar_counterfactual_labels_are_a_bank_error():
    x = torch.zeros(5, 1, 8)
    with pytest.raises(pp.BankError, match="shape"):
        pp.PairBank(x, x, torch.zeros(5, dtype=L), {"V": torch.tensor(1)})


def test_base_and_source_of_different_kinds():
    """Float inputs go to the model as inputs_embeds, integer ones as input_ids: they cannot be mixed."""
    with pytest.raises(pp.BankError, match="structure|dtype"):
        pp.PairBank(torch.zeros(5, 1, 8), torch.zeros(5, 1, 8, dtype=L), torch.zeros(5, dtype=L),
                    {"V": torch.ones(5, dtype=L)})


def test_labels_out_of_range_and_negative():
    x = torch.zeros(5, 1, 8)
    z = torch.zeros(5, dtype=L)
    with pytest.raises(pp.BankError, match="num_classes"):
        pp.PairBank(x, x, z, {"V": torch.full((5,), 5, dtype=L)}, num_classes=2)
    with pytest.raises(pp.BankError, match="negative"):
        pp.PairBank(x, x, z, {"V": -torch.ones(5, dtype=L)})
    with pytest.raises(pp.BankError, match="integer"):
        pp.PairBank(x, x, z, {"V": torch.tensor([0, 1, 0, 1, 0.5])})


def test_empty_bank():
    x = torch.zeros(0, 1, 8)
    with pytest.raises(pp.BankError, match="empty"):
        pp.PairBank(x, x, torch.zeros(0, dtype=L), {"V": torch.zeros(0, dtype=L)})


def test_label_outside_model_classes_in_fit_bank(heq_task):
    t = heq_task
    bad = _with_label(t.fit, "WX", 0, 5)
    with pytest.raises(pp.BankError, match=r"label 5.*2 classes"):
        _fast_searcher().fit(t.model, t.sites[:8], bad, t.calibration)


def test_label_outside_model_classes_in_calibration_bank(heq_task):
    t = heq_task
    bad = _with_label(t.calibration, "WX", 0, 5)
    with pytest.raises(pp.BankError, match=r"label 5"):
        _fast_searcher().fit(t.model, t.sites[:8], t.fit, bad)


def test_label_outside_model_classes_at_evaluation(planted_task):
    t = planted_task
    handle = pp.Handle("WX", [pp.Site(1, dims=(0,))], [1.0])
    bad = _with_label(t.test, "WX", 0, 5)
    with pytest.raises(pp.PlotError, match=r"label 5"):
        handle.iia(bad, t.model)


def test_fit_bank_without_changed_pairs(planted_task):
    t = planted_task
    unchanged = t.fit.subset(torch.nonzero(~t.fit.changed("WX")).flatten())
    with pytest.raises(pp.BankError, match=r"no pair where interchanging 'WX' changes"):
        _fast_searcher().fit(t.model, t.sites, unchanged, t.calibration)
    unchanged_cal = t.calibration.subset(torch.nonzero(~t.calibration.changed("YZ")).flatten())
    with pytest.raises(pp.BankError, match=r"no pair where interchanging 'YZ' changes"):
        _fast_searcher().fit(t.model, t.sites, t.fit, unchanged_cal)


def test_unknown_variable_passed_to_fit(planted_task):
    t = planted_task
    with pytest.raises(pp.BankError, match=r"unknown variable.*NOPE"):
        _fast_searcher().fit(t.model, t.sites, t.fit, t.calibration, variables=["NOPE"])
    with pytest.raises(pp.BankError, match="unknown variable"):
        t.fit.changed("NOPE")


# ------------------------------------------------------------------------------ sites
def test_site_layer_that_does_not_exist_at_fit(planted_task):
    t = planted_task
    with pytest.raises(pp.SiteError, match=r"layer 7 does not exist"):
        _fast_searcher().fit(t.model, t.sites + [pp.Site(7, dims=(0,))], t.fit, t.calibration)
    with pytest.raises(pp.SiteError, match=r"layer 7 does not exist"):
        pp.layer_sites(t.model, layers=[7])
    with pytest.raises(pp.SiteError, match=r"coordinate 8 is outside"):
        _fast_searcher().fit(t.model, [pp.Site(1, dims=(8,))], t.fit, t.calibration)
    with pytest.raises(pp.SiteError, match="component"):
        pp.layer_sites(t.model, component="attention_output")


def test_site_layer_that_does_not_exist_in_a_handle(planted_task):
    t = planted_task
    with pytest.raises(pp.SiteError, match=r"layer 7"):
        pp.Handle("WX", [pp.Site(7, dims=(0,))], [1.0]).iia(t.test, t.model)
    with pytest.raises(pp.SiteError, match=r"layer 5"):
        pp.Handle("V", [pp.Site(5, position=1)], [1.0]).intervenable(_tiny_gpt2())


def test_site_coordinate_that_does_not_exist_in_a_handle(planted_task):
    t = planted_task
    with pytest.raises(pp.SiteError, match=r"coordinate 99"):
        pp.Handle("WX", [pp.Site(1, dims=(99,))], [1.0]).iia(t.test, t.model)


def test_site_position_that_does_not_exist_gpt2():
    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    ids, sids = torch.randint(0, 20, (6, 8), generator=g), torch.randint(0, 20, (6, 8), generator=g)
    with pytest.raises(pp.SiteError, match=r"position 20 does not exist"):
        pp.Handle("V", [pp.Site(1, position=20)], [1.0]).run(ids, sids, model)
    with pytest.raises(pp.SiteError, match=r"position -9 does not exist"):
        pp.Handle("V", [pp.Site(1, position=-9)], [1.0]).run(ids, sids, model)
    # padding is honoured: a row with 5 real tokens has no position 6
    mask = torch.ones(6, 8, dtype=L)
    mask[3, 5:] = 0
    with pytest.raises(pp.SiteError, match=r"position 6 does not exist in a row with 5 real tokens"):
        pp.Handle("V", [pp.Site(1, position=6)], [1.0]).run(
            {"input_ids": ids, "attention_mask": mask}, {"input_ids": sids, "attention_mask": torch.ones(6, 8, dtype=L)},
            model)
    # and through the searcher (engine path)
    with torch.no_grad():
        base_lab = model(input_ids=ids).logits[:, -1].argmax(-1)
    bank = pp.PairBank(ids, sids, base_lab, {"V": (base_lab + 1) % 20})
    with pytest.raises(pp.SiteError, match=r"position 20 does not exist"):
        _fast_searcher().fit(model, [pp.Site(0, position=20), pp.Site(1, position=-1)], bank, bank)


# ------------------------------------------------------------------------------ models
def _bert():
    return BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, vocab_size=30))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), _bert],
                         ids=["sequential", "bert"])
def test_model_pyvene_cannot_hook(make, planted_task):
    model = make()
    t = planted_task
    with pytest.raises(pp.ModelError, match="register_model"):
        pp.model_spec(model)
    with pytest.raises(pp.ModelError, match="register_model"):
        pp.layer_sites(model)
    with pytest.raises(pp.ModelError, match="register_model"):
        _fast_searcher().fit(model, [pp.Site(0)], t.fit, t.calibration)
    with pytest.raises(pp.ModelError, match="register_model"):
        pp.Handle("WX", [pp.Site(0)], [1.0]).intervenable(model)


def test_pyvene_gru_needs_steppable_gru(planted_task):
    from pyvene.models.gru.modelings_gru import GRUConfig, GRUForClassification

    gru = GRUForClassification(GRUConfig(h_dim=8, n_layer=1, n_labels=2, max_position_embeddings=4, vocab_size=10))
    t = planted_task
    with pytest.raises(pp.ModelError, match="steppable_gru"):
        pp.layer_sites(gru)
    with pytest.raises(pp.ModelError, match="steppable_gru"):
        _fast_searcher().fit(gru, [pp.Site(0)], t.fit, t.calibration)
    # the suggested conversion works
    step = pp.steppable_gru(gru)
    assert len(pp.layer_sites(step, positions=[None])) == 4


@pytest.mark.parametrize("poison", ["nan_hidden", "nan_score", "inf_output"])
def test_non_finite_logits_during_signature_collection(planted_task, poison):
    t = planted_task
    model = copy.deepcopy(t.model)
    with torch.no_grad():
        if poison == "nan_hidden":
            model.mlp.h[1].ff1.weight[0, 0] = float("nan")
        elif poison == "nan_score":
            model.score.weight[1, 0] = float("nan")
        else:
            model.score.bias[0] = float("inf")
    with pytest.raises(pp.ModelError, match=r"non-finite logits \(NaN or inf\)"):
        _fast_searcher().fit(model, t.sites, t.fit, t.calibration)
    # the task's model was not touched
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_non_finite_logits_only_under_intervention(planted_task):
    """Clean runs are finite but a huge λ overflows: calibration reports it instead of scoring NaN."""
    t = planted_task
    with pytest.raises(pp.ModelError, match="non-finite"):
        _fast_searcher(lambdas=(1e38,)).fit(t.model, t.sites, t.fit, t.calibration)


# ------------------------------------------------------------------------------ searcher arguments
@pytest.mark.parametrize("eps", [0, -0.5, [0.1, 0.0], float("nan"), "big"])
def test_nonpositive_epsilon_in_constructor(eps):
    with pytest.raises(pp.PlotError, match="epsilon"):
        pp.OTAlignmentSearcher(epsilon=eps)


def test_nonpositive_epsilon_via_set_params_and_beta():
    s = pp.OTAlignmentSearcher(progress=False)
    with pytest.raises(pp.PlotError, match="epsilon"):
        s.set_params(epsilon=-1.0)
    with pytest.raises(pp.PlotError, match="beta"):
        pp.OTAlignmentSearcher(method="uot", beta=0.0)
    with pytest.raises(pp.PlotError, match="lambdas"):
        pp.OTAlignmentSearcher(lambdas=(1.0, 0.0))


def test_top_k_larger_than_number_of_sites(planted_task):
    t = planted_task
    with pytest.raises(pp.PlotError, match=r"top-k 100 is larger than the number of candidate sites \(24\)"):
        _fast_searcher(top_k=(1, 100)).fit(t.model, t.sites, t.fit, t.calibration)
    with pytest.raises(pp.PlotError, match="top_k"):
        pp.OTAlignmentSearcher(top_k=(0, 1))


@pytest.mark.parametrize("kw,word", [
    (dict(method="sinkhorn"), "unknown method"),
    (dict(signature="kl"), "unknown signature"),
    (dict(signature=("prob_delta", "kl")), "unknown signature"),
    (dict(selection="best"), "selection"),
    (dict(weight_norm="l2"), "weight_norm"),
    (dict(sided="three"), "sided"),
])
def test_unknown_method_or_signature(kw, word):
    with pytest.raises(pp.PlotError, match=word):
        pp.OTAlignmentSearcher(**kw)


def test_margin_signature_needs_two_classes():
    from pyvene_plot.localize import abstract_signatures

    x = torch.zeros(4, 1, 2)
    bank = pp.PairBank(x, x, torch.tensor([0, 1, 2, 0]), {"V": torch.tensor([1, 2, 0, 2])})
    with pytest.raises(pp.SignatureError, match="two-class"):
        abstract_signatures(bank, ["V"], [0, 1, 2], "margin_delta")


# ------------------------------------------------------------------------------ nothing half-written
@pytest.fixture(scope="module")
def small_result(planted_task):
    t = planted_task
    return _fast_searcher().fit(t.model, t.sites, t.fit, t.calibration)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_to_json_failing_serialisation_leaves_no_file(small_result, tmp_path, monkeypatch):
    target = tmp_path / "result.json"

    def boom(*a, **k):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(pyvene_plot._utils.json, "dumps", boom)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        small_result.to_json(target)
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_to_json_failing_write_keeps_previous_file(small_result, tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    small_result.to_json(target)
    before = target.read_bytes()
    assert len(before) > 0
    # fail after the temporary file is written, at the rename
    def bad_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(pyvene_plot._utils.os, "replace", bad_replace)
    with pytest.raises(OSError, match="disk full"):
        small_result.to_json(target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == ["result.json"]


def test_to_json_non_serialisable_payload_leaves_no_file(small_result, tmp_path):
    res = copy.copy(small_result)
    res.diagnostics = dict(small_result.diagnostics, bad=object())
    target = tmp_path / "r.json"
    with pytest.raises(TypeError):
        res.to_json(target)
    assert not target.exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ reading results back
def _damage(text: str, how: str) -> str:
    if how == "empty":
        return ""
    if how == "truncated":
        return text[: len(text) // 2]
    if how == "a list":
        return "[1, 2]"
    d = json.loads(text)
    if how == "no rows":
        del d["rows"]
    elif how == "row without iia":
        del d["rows"][0]["iia"]
    elif how == "rows not a list":
        d["rows"] = {"plot": 1}
    elif how == "newer format":
        d["format_version"] = 99
    return json.dumps(d)


@pytest.mark.parametrize("how,message", [
    ("empty", "is empty"),
    ("truncated", "truncated or not valid JSON"),
    ("a list", "not an object"),
    ("no rows", r"incomplete: missing \['rows'\]"),
    ("row without iia", r"row 0 is incomplete: missing \['iia'\]"),
    ("rows not a list", "'rows' is a dict, not a list"),
    ("newer format", "format_version 99"),
])
def test_comparison_from_json_names_the_file_and_what_is_wrong(tmp_path, how, message):
    from pyvene_plot.comparison import ROW_KEYS

    row = dict.fromkeys(ROW_KEYS, 0.5) | {"method": "plot", "variable": "V", "sites": "L0"}
    path = pp.Comparison("toy", [row], {"wall_s": 1.0}).to_json(tmp_path / "compare.json")
    assert pp.Comparison.from_json(path).rows == [row]  # the undamaged file reads back
    path.write_text(_damage(path.read_text(), how))
    with pytest.raises(pp.PlotError, match=message) as err:
        pp.Comparison.from_json(path)
    assert str(path) in str(err.value)
    with pytest.raises(pp.PlotError, match="cannot read"):
        pp.Comparison.from_json(tmp_path / "missing.json")
