"""``binary_addition``: a 16-unit GRU adding two 4-bit numbers, LSB first (three carry variables).

Task
----
Inputs ``a, b`` in ``0..15``. The network reads one bit pair per step, least significant first,
and emits one sum bit per step; the fifth step has no input and emits the carry out::

    step t        0         1         2         3         4
    input       (a0,b0)   (a1,b1)   (a2,b2)   (a3,b3)   (0,0)
    emits         S0        S1        S2        S3        C4

The input is ``inputs_embeds`` of shape ``(N, 5, 16)``: at step ``t < 4`` coordinates 0 and 1
hold ``a_t`` and ``b_t`` encoded as ``±1`` (bit 1 -> +1, bit 0 -> -1), every other coordinate
and all of step 4 are 0. The model is :class:`~pyvene_plot.models.StepGRULMHeadModel`
(``h_dim=16``, one GRU layer, ``vocab_size=2``); the LM head at step ``t`` gives the logits of
sum bit ``t``. :class:`~pyvene_plot.models.BitsReadout` ``(steps=(0,1,2,3,4))`` turns the five
steps into one class over 32 codes, class ``c`` meaning bits ``(c >> t) & 1``, i.e. the class is
the integer value of the 5-bit output; on factual inputs it is ``a + b``.

Causal model (pyvene ``CausalModel``, 4-bit ripple-carry adder)::

    inputs  A0..A3, B0..B3 in {0, 1}
    C1 = A0 and B0                       (carry into bit 1)
    Ci = maj(A{i-1}, B{i-1}, C{i-1})     i = 2, 3, 4   (C4 = carry out)
    S0 = A0 xor B0,   Si = Ai xor Bi xor Ci            i = 1, 2, 3
    O  = S0 + 2 S1 + 4 S2 + 8 S3 + 16 C4               (output, 32 classes; label = O)

Forcing a carry ``Ci`` recomputes every downstream sum bit and carry. Factually ``O = a + b``
(0..30), but an intervened output can be 31 (e.g. base ``a=15, b=14`` with ``C1`` forced to 1
gives ``29 + 2``), so ``O`` has 32 values, matching the readout. Localised variables:
``C1, C2, C3`` (``C4`` is an output bit and is not localised, as in the reference). Setting
``Ci`` to a value different from the base's flips ``Si``, so interchanging ``Ci`` changes the
output exactly when base and source differ in ``Ci``.

Data and what the backbone saw (reference flaw 3 in ``method-plot.md`` §12)
--------------------------------------------------------------------------
* **Backbone:** trained on *all 256 factual* ``(a, b)`` examples, as the reference does (full
  batch, Adam, cross-entropy per step over the five output bits) until every example is exact
  and the mean loss is below ``target_loss``; if the step budget ends before 100 % accuracy,
  training continues deterministically until it is reached. There is no held-out factual set:
  the task has only 256 inputs and the point is a network that computes addition exactly. The
  *counterfactual* behaviour (what interventions do) is never trained on.
* **Pair banks:** the 256 examples are split into disjoint **pools** (default 128 fit / 64
  calibration / 64 test), stratified by carry-propagation length (longest run of consecutive
  active carries among ``C1..C4``), seeded by the task seed. Every pair of a split draws *both*
  its base and its source from that split's pool, so no base or source example is shared across
  fit / calibration / test. (The reference drew sources from all 256 examples, so test examples
  served as fit sources.)
* **Source families** (:func:`pool_pair_sampler`): for each base (uniform over the pool), the
  source is with probability 1/4 a uniform pool example different from the base, and with
  probability 1/4 each a *carry-targeted* source for ``C1``, ``C2`` or ``C3``: a pool example whose
  ``Ci`` differs from the base's, chosen uniformly among the candidates that best agree with the
  base on ``S{i-1}`` and then on the lower sum bits (the reference's ``target_C{i}`` ranking,
  restricted to the pool). On top, :meth:`PairBank.from_causal_model` reserves a quarter of the
  pairs per carry in which it changes the output (``balance=True``). With the defaults (seeds
  0-4) the output changes on 65-74 % (C1), 75-82 % (C2) and 72-79 % (C3) of the pairs of every
  split; the rest (18-35 %) are invariant pairs.
* Measured with the defaults (seeds 0-4, one thread): training takes 83-97 full-batch steps
  (first exact at step 63-69), 0.2-0.5 s; banks take about 1 s; accuracy 1.0 on all 256.

Where the carries live (verification, not computed at load time)
----------------------------------------------------------------
Full interchange of the hidden state ``h_t`` (the whole 16-d state at timestep ``t``, site
``L{t}.block_output``) from the source into the base, measured on each seed's test bank (800
pairs) with a manual unroll of the GRU and cross-checked with pyvene's ``IntervenableModel``
(``VanillaIntervention`` on the step sites; identical predictions). IIA = exact match of all five
output bits with the counterfactual label of ``Ci``. Seed 0::

    variable  pairs          n     h0     h1     h2     h3     h4
    C1        all          800   .613   .207   .038   .072   .119
              changed      565   .497   .173   0      0      0
              clean        281  1.000   .142   0      0      0
    C2        all          800   .084   .740   .256   .050   .079
              changed      642   0      .734   .273   0      0
              clean        471   0     1.000   .248   0      0
    C3        all          800   .050   .032   .616   .419   .179
              changed      597   0      0      .616   .432   0
              clean        368   0      0     1.000   .394   0

"changed": pairs where interchanging ``Ci`` changes the output; "clean": changed pairs whose base
and source agree on ``S{i-1}``. Over seeds 0-4, IIA at ``h_{i-1}`` is .61-.75 / .62-.74 / .58-.62
(C1 / C2 / C3) on all pairs, .50-.68 / .59-.73 / .56-.62 on changed pairs and exactly 1.000 on
clean pairs for every seed and carry; ``h_{i-1}`` is the best timestep for ``Ci`` in every
subset and seed. A full swap of ``h_{i-1}`` also replaces what that state says about sum bit
``S{i-1}`` (the LM head reads ``h_{i-1}`` at step ``i-1``), so on changed pairs whose ``S{i-1}``
differs it fails by construction; a method that isolates the carry inside ``h_{i-1}``
(coordinates, a subspace) can do better than the full swap. All numbers:
``python -m benchmarks.task_verification --tasks binary_addition`` (written to ``benchmarks/results/task_verification/binary_addition.json``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pyvene.data_generators.causal_model import CausalModel

from ..data import PairBank
from ..errors import BankError
from ..models import BitsReadout, layer_sites
from ..progressive import Stage
from . import Task, register
from ._binary_training import (
    H_DIM,
    N_BITS,
    N_STEPS,
    all_examples,
    encode,
    factual_accuracy,
    make_model,
    train_model,
)

logger = logging.getLogger(__name__)

__all__ = [
    "N_BITS",
    "N_STEPS",
    "H_DIM",
    "VARIABLES",
    "build_causal_model",
    "setting_of",
    "ab_of",
    "to_model_inputs",
    "encode",
    "decode_inputs",
    "all_examples",
    "carries",
    "forced_sum",
    "propagation_length",
    "stratified_pools",
    "pool_pair_sampler",
    "make_model",
    "factual_accuracy",
    "train_model",
    "build_banks",
    "build",
]

VARIABLES = ["C1", "C2", "C3"]
_A = [f"A{i}" for i in range(N_BITS)]
_B = [f"B{i}" for i in range(N_BITS)]


# ----------------------------------------------------------------------------- arithmetic
def carries(a: int, b: int, forced: Mapping[int, int] | None = None) -> tuple[list[int], list[int]]:
    """Ripple-carry addition of two 4-bit numbers with optional forced carries.

    Parameters
    ----------
    a, b : int
        Addends in ``0..15``.
    forced : dict, optional
        ``{i: value}`` forces carry ``Ci`` (``i`` in 1..4) to ``value``.

    Returns
    -------
    sums : list of int
        ``S0..S3``.
    carry : list of int
        ``C0..C4`` (``C0 = 0``).
    """
    forced = dict(forced or {})
    c = [0]
    s = []
    for i in range(N_BITS):
        ai, bi = (a >> i) & 1, (b >> i) & 1
        ci = c[i]
        s.append(ai ^ bi ^ ci)
        nxt = (ai & bi) | (ai & ci) | (bi & ci)
        c.append(int(forced.get(i + 1, nxt)))
    return s, c


def forced_sum(a: int, b: int, forced: Mapping[int, int] | None = None) -> int:
    """The output ``S0 + 2 S1 + 4 S2 + 8 S3 + 16 C4`` with carries forced (direct, no pyvene)."""
    s, c = carries(a, b, forced)
    return sum(bit << i for i, bit in enumerate(s)) + (c[N_BITS] << N_BITS)


def propagation_length(a: int, b: int) -> int:
    """Longest run of consecutive active carries among ``C1..C4`` (0..4)."""
    _, c = carries(a, b)
    best = run = 0
    for bit in c[1:]:
        run = run + 1 if bit else 0
        best = max(best, run)
    return best


# ----------------------------------------------------------------------------- causal model
def _maj(x: int, y: int, z: int) -> int:
    return int(x + y + z >= 2)


def build_causal_model() -> CausalModel:
    """A fresh ripple-carry ``CausalModel`` (its constructor sorts and mutates its arguments)."""
    variables = _A + _B + ["C1", "C2", "C3", "C4"] + [f"S{i}" for i in range(N_BITS)] + ["O"]
    values: dict[str, list[int]] = {v: [0, 1] for v in variables}
    values["O"] = list(range(2 ** (N_BITS + 1)))
    parents: dict[str, list[str]] = {v: [] for v in _A + _B}
    functions: dict[str, Callable[..., int]] = {v: (lambda: 0) for v in _A + _B}
    parents["C1"] = ["A0", "B0"]
    functions["C1"] = lambda x, y: int(x & y)
    for i in range(2, N_BITS + 1):
        parents[f"C{i}"] = [f"A{i - 1}", f"B{i - 1}", f"C{i - 1}"]
        functions[f"C{i}"] = _maj
    parents["S0"] = ["A0", "B0"]
    functions["S0"] = lambda x, y: int(x ^ y)
    for i in range(1, N_BITS):
        parents[f"S{i}"] = [f"A{i}", f"B{i}", f"C{i}"]
        functions[f"S{i}"] = lambda x, y, z: int(x ^ y ^ z)
    parents["O"] = [f"S{i}" for i in range(N_BITS)] + [f"C{N_BITS}"]
    functions["O"] = lambda *bits: int(sum(int(v) << i for i, v in enumerate(bits)))
    return CausalModel(list(variables), dict(values), dict(parents), dict(functions), pos={})


def setting_of(a: int, b: int) -> dict[str, int]:
    """Input setting ``{A0..A3, B0..B3}`` of the pair ``(a, b)``."""
    s = {f"A{i}": (int(a) >> i) & 1 for i in range(N_BITS)}
    s.update({f"B{i}": (int(b) >> i) & 1 for i in range(N_BITS)})
    return s


def ab_of(setting: Mapping[str, int]) -> tuple[int, int]:
    """``(a, b)`` of an input setting."""
    a = sum(int(setting[f"A{i}"]) << i for i in range(N_BITS))
    b = sum(int(setting[f"B{i}"]) << i for i in range(N_BITS))
    return a, b


# ----------------------------------------------------------------------------- inputs
def to_model_inputs(setting: Mapping[str, int]) -> torch.Tensor:
    """One input setting -> ``inputs_embeds`` of one example, ``FloatTensor[5, 16]``."""
    a, b = ab_of(setting)
    return encode(torch.tensor([a]), torch.tensor([b]))[0]


def decode_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode`: ``(a, b)`` LongTensors from ``inputs_embeds`` ``(N, 5, 16)``."""
    bits = (x[:, :N_BITS, :2] > 0).long()  # (N, 4, 2)
    w = 2 ** torch.arange(N_BITS)
    return (bits[..., 0] * w).sum(1), (bits[..., 1] * w).sum(1)


# ----------------------------------------------------------------------------- pools and sampler
def stratified_pools(
    seed: int, sizes: Sequence[int] = (128, 64, 64)
) -> list[list[tuple[int, int]]]:
    """Split the 256 ``(a, b)`` examples into disjoint pools stratified by propagation length.

    Examples are bucketed by propagation length, each bucket is shuffled (``random.Random(seed)``),
    the buckets are concatenated and positions are dealt to the pools in a repeating pattern
    proportional to ``sizes`` (for 128/64/64: fit, fit, calibration, test), so every bucket is
    split close to the pool proportions and every example is used exactly once.
    """
    sizes = [int(s) for s in sizes]
    total = 2 ** (2 * N_BITS)
    if sum(sizes) != total or min(sizes) < 2:
        raise BankError(f"pool sizes {sizes} must be >= 2 each and sum to {total}")
    rng = random.Random(int(seed))
    buckets: dict[int, list[tuple[int, int]]] = {}
    for a in range(2**N_BITS):
        for b in range(2**N_BITS):
            buckets.setdefault(propagation_length(a, b), []).append((a, b))
    order: list[tuple[int, int]] = []
    for k in sorted(buckets):
        items = buckets[k]
        rng.shuffle(items)
        order.extend(items)
    # deal positions: pool p gets sizes[p] of every `total` positions, spread evenly
    pools: list[list[tuple[int, int]]] = [[] for _ in sizes]
    quota_seen = [0.0] * len(sizes)
    for j, ex in enumerate(order):
        # choose the pool furthest behind its proportional share (ties -> earlier pool)
        for p, s in enumerate(sizes):
            quota_seen[p] = (j + 1) * s / total - len(pools[p])
        p = max(range(len(sizes)), key=lambda q: (quota_seen[q], -q))
        pools[p].append(ex)
    return pools


def _as_pair_sampler(alternating: Callable[[random.Random], dict]) -> Callable[[random.Random], tuple[dict, dict]]:
    """Wrap the alternating base/source sampler as an explicit ``(base, source)`` pair sampler."""

    def pair(rng: random.Random) -> tuple[dict, dict]:
        base = alternating(rng)
        return base, alternating(rng)

    return pair


def pool_pair_sampler(
    pool: Sequence[tuple[int, int]], p_random: float = 0.25
) -> Callable[[random.Random], dict]:
    """A ``sampler(rng)`` for :meth:`PairBank.from_causal_model` that yields related pairs.

    ``from_causal_model`` draws a pair as ``b, s = sampler(rng), sampler(rng)``; this sampler
    alternates: odd calls return a base (uniform over ``pool``), even calls return a source for
    the base just returned. The source is, with probability ``p_random``, a uniform pool example
    other than the base; otherwise (equal shares) a carry-targeted source for ``C1``, ``C2`` or
    ``C3``: a pool example whose carry ``Ci`` differs from the base's, chosen uniformly among the
    candidates with the fewest disagreements on ``(S{i-1}, then S0..S{i-2})``. Both members of
    every pair come from ``pool``, whatever the call order, so split disjointness never depends
    on the alternation; only the mix of families does.
    """
    pool = [tuple(map(int, ab)) for ab in pool]
    if len(set(pool)) != len(pool) or len(pool) < 2:
        raise BankError("a pool needs at least two distinct (a, b) examples")
    info = {ab: carries(*ab) for ab in pool}
    targets: dict[tuple[tuple[int, int], int], list[tuple[int, int]]] = {}
    for base in pool:
        sb, cb = info[base]
        for i in range(1, N_BITS):
            cands = [ab for ab in pool if info[ab][1][i] != cb[i]]
            if not cands:
                continue

            def key(ab: tuple[int, int], i: int = i, sb: list[int] = sb) -> tuple[int, int]:
                ss = info[ab][0]
                return (int(ss[i - 1] != sb[i - 1]), sum(int(ss[k] != sb[k]) for k in range(i - 1)))

            best = min(key(ab) for ab in cands)
            targets[(base, i)] = [ab for ab in cands if key(ab) == best]
    state: dict[str, Any] = {"base": None}

    def sampler(rng: random.Random) -> dict:
        base = state["base"]
        if base is None:
            base = pool[rng.randrange(len(pool))]
            state["base"] = base
            return setting_of(*base)
        state["base"] = None
        u = rng.random()
        share = (1 - p_random) / (N_BITS - 1)
        i = 0 if u < p_random else 1 + min(N_BITS - 2, int((u - p_random) / share))
        cands = targets.get((base, i)) if i else None
        if not cands:
            cands = [ab for ab in pool if ab != base]
        return setting_of(*cands[rng.randrange(len(cands))])

    return sampler


# ----------------------------------------------------------------------------- banks
def build_banks(
    causal_model: CausalModel,
    seed: int = 0,
    n_fit: int = 1600,
    n_calibration: int = 800,
    n_test: int = 800,
    pool_sizes: Sequence[int] = (128, 64, 64),
) -> tuple[PairBank, PairBank, PairBank, list[list[tuple[int, int]]]]:
    """Fit / calibration / test banks whose bases and sources come from disjoint pools.

    Pool split seed ``seed``; bank ``k`` (0 fit, 1 calibration, 2 test) uses sampling seed
    ``1000 + 10 * seed + k``. Returns the three banks and the three pools.
    """
    pools = stratified_pools(seed, pool_sizes)
    banks = []
    for k, (name, n, pool) in enumerate(
        zip(("fit", "calibration", "test"), (n_fit, n_calibration, n_test), pools)
    ):
        bank = PairBank.from_causal_model(
            causal_model, to_model_inputs, n=int(n), variables=VARIABLES,
            seed=1000 + 10 * int(seed) + k,
            pair_sampler=_as_pair_sampler(pool_pair_sampler(pool)), output_var="O", balance=True, name=name,
        )
        bank.meta.update({
            "pool": name,
            "pool_size": len(pool),
            "pool_seed": int(seed),
            "sampler": "pool_pair_sampler(p_random=0.25; target_C1/C2/C3 0.25 each)",
        })
        banks.append(bank)
    return banks[0], banks[1], banks[2], pools


# ----------------------------------------------------------------------------- task
def build(
    seed: int = 0,
    n_fit: int = 1600,
    n_calibration: int = 800,
    n_test: int = 800,
    lr: float = 0.01,
    max_steps: int = 1000,
    target_loss: float = 0.01,
    threads: int | None = 1,
) -> Task:
    """Train the adder and build the banks (deterministic given ``seed``).

    Returns
    -------
    Task
        ``variables = ["C1", "C2", "C3"]``; ``sites`` = the whole hidden state at each timestep
        0..4 (``L{t}.block_output@-1``); ``default_stages = [Stage("layer"),
        Stage("coordinates", group_sizes=(8, 4, 2, 1))]``; ``readout = BitsReadout(steps=(0..4))``.
    """
    seed = int(seed)
    model, info = train_model(
        seed=seed, lr=lr, max_steps=max_steps, target_loss=target_loss, threads=threads
    )
    cm = build_causal_model()
    t0 = time.perf_counter()
    fit, cal, test, pools = build_banks(cm, seed, n_fit, n_calibration, n_test)
    info.update({
        "seed": seed,
        "bank_seconds": round(time.perf_counter() - t0, 3),
        "pool_sizes": {n: len(p) for n, p in zip(("fit", "calibration", "test"), pools)},
        "pools": {n: [list(ab) for ab in p] for n, p in zip(("fit", "calibration", "test"), pools)},
        "pool_stratification": "propagation length (longest run of active carries C1..C4)",
        "bank_sizes": {bk.name: len(bk) for bk in (fit, cal, test)},
        "changed_fraction": {
            bk.name: {v: round(float(bk.changed(v).float().mean()), 4) for v in VARIABLES}
            for bk in (fit, cal, test)
        },
        "input": "inputs_embeds (N, 5, 16): step t<4 coords (0,1) = (a_t, b_t) as +-1, "
                 "rest 0; step 4 zeros",
        "output": "LM head (vocab 2) at step t = sum bit t (t=4: carry out); "
                  "class = a + b (32 classes)",
        "model_config": {"h_dim": H_DIM, "n_layer": 1, "vocab_size": 2, "n_steps": N_STEPS},
    })
    return Task(
        name="binary_addition",
        model=model,
        variables=list(VARIABLES),
        fit=fit,
        calibration=cal,
        test=test,
        sites=layer_sites(model),
        default_stages=[Stage("layer"), Stage("coordinates", group_sizes=(8, 4, 2, 1))],
        readout=BitsReadout(steps=tuple(range(N_STEPS))),
        causal_model=cm,
        info=info,
    )


register("binary_addition", build)
