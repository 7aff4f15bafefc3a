"""Tests of the ``binary_addition`` task: exact backbone, disjoint pools, correct labels."""

from __future__ import annotations

import random

import pytest
import torch

from pyvene_plot import tasks
from pyvene_plot.models import BitsReadout
from pyvene_plot.tasks import binary_addition as ba


@pytest.fixture(scope="module")
def task():
    return tasks.load("binary_addition", seed=0)


def _pairs(bank):
    a, b = ba.decode_inputs(bank.base)
    sa, sb = ba.decode_inputs(bank.source)
    return a.tolist(), b.tolist(), sa.tolist(), sb.tolist()


def test_registered_and_fields(task):
    assert "binary_addition" in tasks.names()
    assert task.variables == ["C1", "C2", "C3"]
    assert [s.layer for s in task.sites] == [0, 1, 2, 3, 4]
    assert all(s.component == "block_output" and s.dims is None for s in task.sites)
    assert isinstance(task.readout, BitsReadout) and task.readout.steps == (0, 1, 2, 3, 4)
    assert [st.kind for st in task.default_stages] == ["layer", "coordinates"]
    assert task.default_stages[1].group_sizes == (8, 4, 2, 1)
    assert task.info["pool_sizes"] == {"fit": 128, "calibration": 64, "test": 64}
    for bank in (task.fit, task.calibration, task.test):
        assert bank.num_classes == 32
        assert bank.base.shape[1:] == (5, 16) and bank.base.dtype == torch.float32


def test_factual_accuracy_all_256(task):
    a, b, y = ba.all_examples()
    with torch.no_grad():
        out = task.model(inputs_embeds=ba.encode(a, b))
    pred = task.readout(out).argmax(-1)
    assert torch.equal(pred, a + b)
    assert torch.equal(out[0].argmax(-1), y)
    assert task.info["factual_accuracy"] == 1.0


def test_encoding_roundtrip():
    a, b, _ = ba.all_examples()
    da, db = ba.decode_inputs(ba.encode(a, b))
    assert torch.equal(da, a) and torch.equal(db, b)
    x = ba.to_model_inputs(ba.setting_of(5, 9))
    assert torch.equal(x, ba.encode(torch.tensor([5]), torch.tensor([9]))[0])
    assert torch.all(x[4] == 0) and torch.all(x[:, 2:] == 0)


def test_pools_partition_and_banks_disjoint(task):
    pools = {k: {tuple(ab) for ab in v} for k, v in task.info["pools"].items()}
    assert sum(len(p) for p in pools.values()) == 256
    assert set.union(*pools.values()) == {(a, b) for a in range(16) for b in range(16)}
    used = {}
    for bank in (task.fit, task.calibration, task.test):
        a, b, sa, sb = _pairs(bank)
        used[bank.name] = set(zip(a, b)) | set(zip(sa, sb))
        assert used[bank.name] <= pools[bank.name]
        # the pair sampler never pairs an example with itself (checks its base/source alternation)
        assert all((x, y) != (u, v) for x, y, u, v in zip(a, b, sa, sb))
    assert not used["fit"] & used["calibration"]
    assert not used["fit"] & used["test"]
    assert not used["calibration"] & used["test"]


def test_counterfactual_labels_match_direct_computation(task):
    for bank in (task.fit, task.calibration, task.test):
        a, b, sa, sb = _pairs(bank)
        base = torch.tensor([ba.forced_sum(x, y) for x, y in zip(a, b)])
        assert torch.equal(base, torch.tensor(a) + torch.tensor(b))
        assert torch.equal(bank.base_labels, base)
        for i, var in enumerate(ba.VARIABLES, start=1):
            src_carry = [ba.carries(u, v)[1][i] for u, v in zip(sa, sb)]
            direct = torch.tensor(
                [ba.forced_sum(x, y, {i: c}) for x, y, c in zip(a, b, src_carry)]
            )
            assert torch.equal(bank.labels(var), direct), (bank.name, var)
            # interchanging Ci changes the output exactly when the carries differ
            base_carry = torch.tensor([ba.carries(x, y)[1][i] for x, y in zip(a, b)])
            assert torch.equal(bank.changed(var), base_carry != torch.tensor(src_carry))


def test_each_carry_changes_output_often(task):
    for bank in (task.fit, task.calibration, task.test):
        for var in ba.VARIABLES:
            assert float(bank.changed(var).float().mean()) >= 0.30, (bank.name, var)
            assert float((~bank.changed(var)).float().mean()) >= 0.10, (bank.name, var)


def test_causal_model_forced_carry_matches_direct():
    cm = ba.build_causal_model()
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randrange(16), rng.randrange(16)
        setting = ba.setting_of(a, b)
        assert cm.run_forward(setting)["O"] == a + b
        i, c = rng.randrange(1, 4), rng.randrange(2)
        forced = dict(setting, **{f"C{i}": c})
        assert cm.run_forward(forced)["O"] == ba.forced_sum(a, b, {i: c})
    # an intervened output can exceed the factual maximum of 30
    assert ba.forced_sum(15, 14, {1: 1}) == 31


def test_full_swap_localises_carry_at_previous_step(task):
    """Full interchange of h_{i-1} realises Ci on clean pairs (S{i-1} equal); other steps do not."""
    bank = task.test
    a, b, sa, sb = _pairs(bank)
    model = task.model
    cell = model.gru.cells[0]

    def states(x, swap_t=None, src=None):
        h = x.new_zeros(x.shape[0], ba.H_DIM)
        hs = []
        for t in range(x.shape[1]):
            h = cell(x[:, t], h)
            if t == swap_t:
                h = src[t]
            hs.append(h)
        return hs

    with torch.no_grad():
        src = states(bank.source)
        preds = [
            task.readout(model.lm_head(torch.stack(states(bank.base, t, src), 1))).argmax(-1)
            for t in range(5)
        ]
    base_s = torch.tensor([ba.carries(x, y)[0] for x, y in zip(a, b)])
    src_s = torch.tensor([ba.carries(u, v)[0] for u, v in zip(sa, sb)])
    for i, var in enumerate(ba.VARIABLES, start=1):
        clean = bank.changed(var) & (base_s[:, i - 1] == src_s[:, i - 1])
        assert int(clean.sum()) >= 100
        iia = [float((p[clean] == bank.labels(var)[clean]).float().mean()) for p in preds]
        assert iia[i - 1] == 1.0, (var, iia)
        assert max(iia[:i - 1] + iia[i:]) < 0.6, (var, iia)
