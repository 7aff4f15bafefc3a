"""Hierarchical equality (HEQ): a 16-16-16 ReLU MLP trained in-process, and its causal model.

The task follows the PLOT reference implementation (``experiments/heq``):

* Inputs ``W, X, Y, Z`` are entity ids in ``range(n_entities)``. Every entity has a fixed random
  vector drawn from ``uniform(-1, 1)^4`` (seeded by the task seed); the network reads the
  concatenation of the four vectors (16 numbers), passed as ``inputs_embeds`` of shape ``(N, 1, 16)``.
* The causal model computes ``WX = [W == X]``, ``YZ = [Y == Z]`` and the output
  ``O = [WX == YZ]``. The class label is ``int(O)``.
* Interchanging ``WX`` from a source into a base gives ``[src.WX == base.YZ]``; interchanging
  ``YZ`` gives ``[base.WX == src.YZ]``.
* With many entities equality is rare (``P(W == X) = 1 / n_entities``), so both training data and
  the pair banks use a *balanced* sampler: ``P(W == X) = P(Y == Z) = 1/2``, independently. Under
  that sampler interchanging either variable changes the output on half of the freely drawn pairs.

Differences from the reference, on purpose:

* ``n_entities`` defaults to 100 (the reference runner; its package default is 20).
* After a third of the steps an L1 penalty on the hidden weights (``l1=1e-3``) prunes connections
  between the (W, X) and (Y, Z) halves of the input. This is a choice about the *network*, made
  before and independently of any localisation, and it is recorded in ``task.info``: the plain
  network (``l1=0``) computes the two equalities in mixed neurons, so that no set of single
  neurons at one layer carries ``WX`` alone (best greedy neuron subset at layer 0, chosen on the
  test bank itself: IIA 0.82; with the pruning phase 0.975). PLOT can only find variables that
  are localised at the granularity of its sites; use ``pp.tasks.load("heq", l1=0)`` to see the
  entangled network.
* The pyvene MLP's ``post_init`` initialises weights with std 0.02, which leaves this 4-layer ReLU
  network on a plateau at 50 % accuracy for some seeds. The weights are re-initialised with
  PyTorch's default ``nn.Linear`` initialisation before training.
* Training streams fresh balanced mini-batches. The held-out factual set is an independent
  balanced draw (its own seed); with 20 entities the input space is finite (160,000 tuples) and
  most held-out tuples also occur in training, so it measures accuracy on the task distribution,
  not generalisation to unseen entities. When ``n_entities**4`` is small enough the model is also
  evaluated on *every* input tuple (``exhaustive_accuracy``: per ``(WX, YZ)`` stratum and their
  mean, which is the accuracy under the balanced sampler).
* If the held-out accuracy is below ``min_accuracy`` the model is retrained (a new, deterministic
  initialisation seed and twice the steps) up to ``max_attempts`` times; a model that never reaches
  it raises :class:`~pyvene_plot.errors.ModelError` instead of being returned.

>>> import pyvene_plot.tasks as tasks
>>> task = tasks.load("heq", seed=0)                          # doctest: +SKIP
>>> task.info["heldout_accuracy"] >= 0.99                    # doctest: +SKIP
True
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyvene.data_generators.causal_model import CausalModel

from ..data import PairBank
from ..models import Readout, neuron_sites
from ..progressive import Stage
from . import Task, register
from ._heq_training import (
    EMBEDDING_DIM,
    entity_vectors,
    exhaustive_accuracy,
    sample_balanced_rows,
    train_heq_model,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_DIM",
    "heq_causal_model",
    "balanced_sampler",
    "entity_vectors",
    "make_to_model_inputs",
    "sample_balanced_rows",
    "exhaustive_accuracy",
    "train_heq_model",
    "draw_heq_banks",
    "heq_bank_info",
    "heq_task",
    "build_heq_banks",
    "build_heq",
]

_INPUTS = ("W", "X", "Y", "Z")
_VARIABLES = ("WX", "YZ")

# ----------------------------------------------------------------------------- causal model
def heq_causal_model(n_entities: int) -> CausalModel:
    """The hierarchical-equality causal model as a pyvene ``CausalModel``.

    Parameters
    ----------
    n_entities : int
        Number of entity ids; inputs ``W, X, Y, Z`` take values in ``range(n_entities)``.

    Returns
    -------
    CausalModel
        Variables ``W, X, Y, Z`` (inputs), ``WX = [W == X]``, ``YZ = [Y == Z]`` and the output
        ``O = [WX == YZ]``; boolean variables take values ``[False, True]`` so the class index of
        the output is ``int(O)``.

    Notes
    -----
    ``CausalModel`` sorts and mutates the ``variables`` list it is given, fills ``pos`` (a mutable
    default argument) and calls the zero-argument input functions at construction; every call here
    therefore builds fresh lists and dicts.
    """
    n = int(n_entities)
    if n < 2:
        raise ValueError(f"n_entities must be >= 2 so that W != X is possible, got {n_entities}")
    entities = list(range(n))
    variables = ["W", "X", "Y", "Z", "WX", "YZ", "O"]
    values: dict[str, list] = {v: list(entities) for v in _INPUTS}
    values.update({"WX": [False, True], "YZ": [False, True], "O": [False, True]})
    parents: dict[str, list[str]] = {v: [] for v in _INPUTS}
    parents.update({"WX": ["W", "X"], "YZ": ["Y", "Z"], "O": ["WX", "YZ"]})
    functions: dict[str, Callable[..., Any]] = {v: (lambda: 0) for v in _INPUTS}
    functions.update(
        {
            "WX": lambda w, x: w == x,
            "YZ": lambda y, z: y == z,
            "O": lambda wx, yz: wx == yz,
        }
    )
    return CausalModel(variables, values, parents, functions, pos={})


def balanced_sampler(n_entities: int) -> Callable[[random.Random], dict]:
    """A sampler ``sampler(rng) -> {"W", "X", "Y", "Z"}`` with ``P(W==X) = P(Y==Z) = 1/2``.

    Parameters
    ----------
    n_entities : int
        Number of entity ids.

    Returns
    -------
    callable
        Draws, independently for the pairs ``(W, X)`` and ``(Y, Z)``: the first id uniformly; the
        second equal to it with probability 1/2, otherwise uniform over the other ids.
    """
    n = int(n_entities)

    def sampler(rng: random.Random) -> dict:
        out: dict[str, int] = {}
        for a, b in (("W", "X"), ("Y", "Z")):
            first = rng.randrange(n)
            if rng.random() < 0.5:
                second = first
            else:
                second = (first + rng.randrange(1, n)) % n
            out[a], out[b] = first, second
        return out

    return sampler


# ----------------------------------------------------------------------------- inputs
def make_to_model_inputs(vectors: torch.Tensor) -> Callable[[dict], torch.Tensor]:
    """``setting -> FloatTensor (1, 4*dim)``: the concatenated entity vectors of one input setting.

    Stacked by :meth:`PairBank.from_causal_model` into ``(N, 1, 16)``, which pyvene_plot passes to
    the MLP as ``inputs_embeds``.
    """
    vecs = vectors.detach().clone().float()

    def to_model_inputs(setting: dict) -> torch.Tensor:
        return torch.cat([vecs[int(setting[v])] for v in _INPUTS]).unsqueeze(0)

    return to_model_inputs


# ----------------------------------------------------------------------------- banks
def draw_heq_banks(
    causal_model: CausalModel,
    to_model_inputs: Callable[[dict], torch.Tensor],
    sizes: Sequence[int],
    seed: int,
) -> tuple[PairBank, tuple[PairBank, PairBank, PairBank]]:
    """Draw one balanced ``WX``/``YZ`` bank and split it into fit / calibration / test.

    Shared by the HEQ and planted tasks. Bases and sources are drawn independently with
    :func:`balanced_sampler` over the causal model's ``W`` values; :meth:`PairBank.from_causal_model`
    reserves a third of the pairs for each variable in which interchanging it changes the output.
    Bank seed ``seed + 201``, split seed ``seed + 301``; every split's ``meta`` records the seeds
    and the sampler.

    Parameters
    ----------
    causal_model : CausalModel
        An HEQ causal model (:func:`heq_causal_model`).
    to_model_inputs : callable
        ``setting -> Tensor`` of one example's model input.
    sizes : sequence of 3 int
        Requested fit, calibration and test sizes (the split may round).
    seed : int
        Task seed.

    Returns
    -------
    bank : PairBank
        The whole drawn bank (``sum(sizes)`` pairs, name ``"all"``).
    splits : tuple of 3 PairBank
        ``fit``, ``calibration``, ``test``.
    """
    n_entities = len(causal_model.values["W"])
    total = sum(sizes)
    bank = PairBank.from_causal_model(
        causal_model,
        to_model_inputs,
        n=total,
        variables=list(_VARIABLES),
        seed=int(seed) + 201,
        sampler=balanced_sampler(n_entities),
        balance=True,
        name="all",
    )
    fit, cal, test = bank.split([s / total for s in sizes], seed=int(seed) + 301,
                                names=["fit", "calibration", "test"])
    for part in (fit, cal, test):
        part.meta.update({"task_seed": int(seed), "split_seed": int(seed) + 301, "sampler": "balanced"})
    return bank, (fit, cal, test)


def heq_bank_info(seed: int, banks: Sequence[PairBank]) -> dict[str, Any]:
    """``task.info`` entries describing banks drawn by :func:`draw_heq_banks`.

    Returns
    -------
    dict
        ``bank_seed``, ``split_seed``, ``bank_sizes`` (``{name: len}``) and ``changed_fraction``
        (``{name: {variable: share of pairs whose output the interchange changes}}``).
    """
    return {
        "bank_seed": int(seed) + 201,
        "split_seed": int(seed) + 301,
        "bank_sizes": {b.name: len(b) for b in banks},
        "changed_fraction": {
            b.name: {v: float(b.changed(v).float().mean()) for v in _VARIABLES}
            for b in banks
        },
    }


def build_heq_banks(
    causal_model: CausalModel,
    vectors: torch.Tensor,
    n_fit: int = 1000,
    n_calibration: int = 500,
    n_test: int = 1000,
    seed: int = 0,
) -> tuple[PairBank, PairBank, PairBank]:
    """Balanced (base, source) banks for ``WX`` and ``YZ``, split into fit / calibration / test.

    Bases and sources are drawn independently with :func:`balanced_sampler`; on top of that
    :meth:`PairBank.from_causal_model` reserves a third of the pairs for each variable in which
    interchanging it changes the output. Bank seed ``seed + 201``, split seed ``seed + 301``.
    """
    sizes = [int(n_fit), int(n_calibration), int(n_test)]
    total = sum(sizes)
    bank, (fit, cal, test) = draw_heq_banks(causal_model, make_to_model_inputs(vectors), sizes, seed)
    if [len(fit), len(cal), len(test)] != sizes:
        raise RuntimeError(f"bank split sizes {[len(fit), len(cal), len(test)]} != requested {sizes}")
    settings = getattr(bank, "settings", None)
    if settings is not None:
        # keep the abstract input settings with each split (same permutation as split())
        g = torch.Generator().manual_seed(int(seed) + 301)
        perm = torch.randperm(total, generator=g).tolist()
        lo = 0
        to_inputs = make_to_model_inputs(vectors)
        for part, size in zip((fit, cal, test), sizes):
            idx = perm[lo : lo + size]
            lo += size
            base_s = [settings[0][i] for i in idx]
            src_s = [settings[1][i] for i in idx]
            same = torch.equal(torch.stack([to_inputs(s) for s in base_s]), part.base) and torch.equal(
                torch.stack([to_inputs(s) for s in src_s]), part.source
            )
            if not same:  # PairBank.split changed its permutation; settings would be misaligned
                logger.warning("could not align abstract settings with split %r; not attaching them", part.name)
                continue
            part.settings = (base_s, src_s)  # type: ignore[attr-defined]
    return fit, cal, test


def heq_task(
    name: str,
    model: torch.nn.Module,
    banks: Sequence[PairBank],
    causal_model: CausalModel,
    info: dict,
) -> Task:
    """An HEQ-shaped :class:`Task` (shared by the HEQ and planted tasks).

    ``variables = ["WX", "YZ"]``; ``sites`` = every single neuron of layers 0-2 of the pyvene MLP;
    ``default_stages = [Stage("layer"), Stage("coordinates", group_sizes=(4, 1))]``; the default
    :class:`Readout`. ``banks`` are the fit, calibration and test banks, in that order.
    """
    fit, cal, test = banks
    return Task(
        name=name,
        model=model,
        variables=list(_VARIABLES),
        fit=fit,
        calibration=cal,
        test=test,
        sites=neuron_sites(model, layers=[0, 1, 2]),
        default_stages=[Stage("layer"), Stage("coordinates", group_sizes=(4, 1))],
        readout=Readout(),
        causal_model=causal_model,
        info=info,
    )


# ----------------------------------------------------------------------------- task
def build_heq(
    seed: int = 0,
    n_entities: int = 100,
    n_fit: int = 1000,
    n_calibration: int = 500,
    n_test: int = 1000,
    steps: int = 4000,
    batch_size: int = 512,
    lr: float = 5e-3,
    min_accuracy: float = 0.99,
    num_threads: int | None = 1,
    l1: float = 1e-3,
) -> Task:
    """Build the HEQ task: causal model, trained MLP, balanced banks and 48 neuron sites.

    Parameters
    ----------
    seed : int
        Task seed (entity vectors, training, banks).
    n_entities : int
        Number of entity ids (default 100, as the reference runner).
    n_fit, n_calibration, n_test : int
        Bank sizes.
    steps, batch_size, lr, min_accuracy, num_threads
        Passed to :func:`train_heq_model`.

    Returns
    -------
    Task
        ``variables = ["WX", "YZ"]``; ``sites`` = the 48 single neurons of layers 0-2;
        ``default_stages = [Stage("layer"), Stage("coordinates", group_sizes=(4, 1))]``.
    """
    seed = int(seed)
    vectors = entity_vectors(n_entities, seed)
    model, info = train_heq_model(
        seed=seed, n_entities=n_entities, steps=steps, batch_size=batch_size, lr=lr,
        min_accuracy=min_accuracy, vectors=vectors, num_threads=num_threads, l1=l1,
    )
    cm = heq_causal_model(n_entities)
    t0 = time.perf_counter()
    fit, cal, test = build_heq_banks(cm, vectors, n_fit, n_calibration, n_test, seed=seed)
    bank_seconds = time.perf_counter() - t0
    info.update(
        {
            "embedding_seed": seed,
            "entity_vectors": vectors.tolist(),
            "bank_seconds": bank_seconds,
            **heq_bank_info(seed, (fit, cal, test)),
            "input": "inputs_embeds (N, 1, 16): concatenated entity vectors of W, X, Y, Z",
        }
    )
    task = heq_task("heq", model, (fit, cal, test), cm, info)
    logger.info(
        "built HEQ task seed %d: held-out acc %.4f, %.1fs training, banks %s",
        seed, info["heldout_accuracy"], info["train_seconds"], info["bank_sizes"],
    )
    return task


register("heq", build_heq)
