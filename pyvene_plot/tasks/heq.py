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
from collections.abc import Callable
from typing import Any

import torch
from pyvene.data_generators.causal_model import CausalModel
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification

from ..data import PairBank
from ..errors import ModelError
from ..models import Readout, neuron_sites
from ..progressive import Stage
from . import Task, register

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
    "build_heq_banks",
    "build_heq",
]

EMBEDDING_DIM = 4
"""Width of each entity vector; the model input is ``4 * EMBEDDING_DIM`` wide."""

_INPUTS = ("W", "X", "Y", "Z")


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
def entity_vectors(n_entities: int, seed: int, dim: int = EMBEDDING_DIM) -> torch.Tensor:
    """Fixed random entity vectors, ``uniform(-1, 1)^dim``, shape ``(n_entities, dim)``.

    Drawn from a local generator seeded with ``seed`` (global RNG state is untouched).
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(int(n_entities), int(dim), generator=g) * 2.0 - 1.0


def make_to_model_inputs(vectors: torch.Tensor) -> Callable[[dict], torch.Tensor]:
    """``setting -> FloatTensor (1, 4*dim)``: the concatenated entity vectors of one input setting.

    Stacked by :meth:`PairBank.from_causal_model` into ``(N, 1, 16)``, which pyvene_plot passes to
    the MLP as ``inputs_embeds``.
    """
    vecs = vectors.detach().clone().float()

    def to_model_inputs(setting: dict) -> torch.Tensor:
        return torch.cat([vecs[int(setting[v])] for v in _INPUTS]).unsqueeze(0)

    return to_model_inputs


def sample_balanced_rows(
    n_entities: int, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised balanced sampling of ``n`` input tuples.

    Returns
    -------
    ids : LongTensor, shape (n, 4)
        Columns ``W, X, Y, Z``.
    labels : LongTensor, shape (n,)
        ``int([W == X] == [Y == Z])``.
    """
    ne = int(n_entities)
    cols = []
    eqs = []
    for _ in range(2):
        a = torch.randint(ne, (n,), generator=generator)
        eq = torch.rand(n, generator=generator) < 0.5
        off = torch.randint(1, ne, (n,), generator=generator)
        b = torch.where(eq, a, (a + off) % ne)
        cols += [a, b]
        eqs.append(eq)
    ids = torch.stack(cols, 1)
    labels = (eqs[0] == eqs[1]).long()
    return ids, labels


def _embed(vectors: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(n, 4)`` ids -> ``(n, 1, 4*dim)`` float inputs."""
    return vectors[ids].reshape(ids.shape[0], -1).unsqueeze(1)


def exhaustive_accuracy(
    model: torch.nn.Module, vectors: torch.Tensor, max_tuples: int = 2_000_000
) -> dict | None:
    """Accuracy on every input tuple, per ``(WX, YZ)`` stratum, or None if there are too many.

    Returns
    -------
    dict or None
        ``{"WX=0,YZ=0": acc, ..., "balanced": mean of the four, "min": worst stratum}``.
    """
    n = int(vectors.shape[0])
    if n**4 > max_tuples:
        return None
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    eq = pairs[:, 0] == pairs[:, 1]
    out: dict[str, float] = {}
    for wx in (False, True):
        for yz in (False, True):
            p1, p2 = pairs[eq == wx], pairs[eq == yz]
            idx = torch.cartesian_prod(torch.arange(len(p1)), torch.arange(len(p2)))
            ids = torch.cat([p1[idx[:, 0]], p2[idx[:, 1]]], 1)
            y = torch.full((ids.shape[0],), int(wx == yz), dtype=torch.long)
            out[f"WX={int(wx)},YZ={int(yz)}"] = _accuracy(model, _embed(vectors, ids), y)
    accs = list(out.values())
    out["balanced"] = sum(accs) / len(accs)
    out["min"] = min(accs)
    return out


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch):
        logits = model(inputs_embeds=x[i : i + batch])[0]
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / max(1, x.shape[0])


# ----------------------------------------------------------------------------- training
def _new_model(init_seed: int, dim: int) -> MLPForClassification:
    config = MLPConfig(
        h_dim=dim, n_layer=3, num_classes=2, activation_function="relu", pdrop=0.0, include_bias=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        model = MLPForClassification(config)
        # pyvene's post_init uses std=0.02, which stalls this 4-layer ReLU net at 50 % for some seeds.
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    return model


def train_heq_model(
    seed: int = 0,
    n_entities: int = 20,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 5e-3,
    n_heldout: int = 10_000,
    min_accuracy: float = 0.99,
    max_attempts: int = 3,
    vectors: torch.Tensor | None = None,
    num_threads: int | None = 1,
    l1: float = 1e-3,
    l1_start: float = 1 / 3,
) -> tuple[MLPForClassification, dict]:
    """Train the HEQ network (``MLPForClassification``, 16-16-16 ReLU, 2 classes) on CPU.

    Parameters
    ----------
    seed : int
        Seeds the entity vectors (``seed``), the held-out set (``seed + 2``), the training stream
        (``seed + 1 + 100 * attempt``) and the initialisation (``seed + 1000 * attempt``).
    n_entities : int
        Number of entity ids.
    steps, batch_size, lr : int, int, float
        Adam with a cosine learning-rate decay over ``steps`` mini-batches of fresh balanced draws.
    n_heldout : int
        Size of the held-out factual set (independent balanced draws, seed ``seed + 2``).
    min_accuracy : float
        Required held-out accuracy; below it the model is retrained with twice the steps.
    max_attempts : int
        Training attempts before giving up with :class:`ModelError`.
    vectors : Tensor, optional
        Entity vectors ``(n_entities, 4)``; default :func:`entity_vectors` ``(n_entities, seed)``.
    num_threads : int or None, default 1
        torch intra-op threads while training (restored afterwards). The network is tiny, so one
        thread is fastest; more threads mostly add synchronisation cost on a busy machine.
        None keeps the current setting.
    l1 : float, default 1e-3
        Weight of an L1 penalty on the hidden layers' weights (layers 0 and 1), switched on after
        ``l1_start`` of the steps (a pruning phase once the task is learned; from step 0 it
        collapses training). 0 trains the plain network.
    l1_start : float
        Fraction of the steps before the penalty starts.

    Returns
    -------
    model : MLPForClassification
        In eval mode, every parameter with ``requires_grad=False``.
    info : dict
        ``train_accuracy`` (10,000 further draws from the training distribution),
        ``heldout_accuracy``, ``train_seconds`` (all attempts), ``attempts``, ``steps`` (of the
        kept attempt), seeds and sizes.

    Raises
    ------
    ModelError
        If no attempt reaches ``min_accuracy`` on the held-out set.
    """
    seed = int(seed)
    n_entities = int(n_entities)
    if vectors is None:
        vectors = entity_vectors(n_entities, seed)
    vectors = vectors.float()
    dim = vectors.shape[1] * 4
    heldout_ids, heldout_y = sample_balanced_rows(
        n_entities, n_heldout, torch.Generator().manual_seed(seed + 2)
    )
    heldout_x = _embed(vectors, heldout_ids)

    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        model, history, total = _train_attempts(
            seed, n_entities, vectors, dim, steps, batch_size, lr, min_accuracy, max_attempts,
            heldout_x, heldout_y, l1=l1, l1_start=l1_start,
        )
    finally:
        torch.set_num_threads(prev_threads)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    info = {
        "train_accuracy": history[-1]["train_accuracy"],
        "heldout_accuracy": history[-1]["heldout_accuracy"],
        "train_seconds": total,
        "attempts": len(history),
        "steps": history[-1]["steps"],
        "batch_size": int(batch_size),
        "lr": float(lr),
        "optimizer": "Adam + cosine decay",
        "l1": float(l1),
        "l1_start": float(l1_start),
        "init_seed": history[-1]["init_seed"],
        "data_seed": history[-1]["data_seed"],
        "heldout_seed": seed + 2,
        "n_heldout": int(n_heldout),
        "exhaustive_accuracy": exhaustive_accuracy(model, vectors),
        "n_entities": n_entities,
        "embedding_dim": int(vectors.shape[1]),
        "num_threads": num_threads,
        "training_history": history,
    }
    return model, info


def _train_attempts(
    seed: int,
    n_entities: int,
    vectors: torch.Tensor,
    dim: int,
    steps: int,
    batch_size: int,
    lr: float,
    min_accuracy: float,
    max_attempts: int,
    heldout_x: torch.Tensor,
    heldout_y: torch.Tensor,
    l1: float = 0.0,
    l1_start: float = 1 / 3,
) -> tuple[MLPForClassification, list[dict], float]:
    """The retry loop of :func:`train_heq_model`: returns (model, per-attempt history, seconds)."""
    t_start = time.perf_counter()
    history: list[dict] = []
    for attempt in range(int(max_attempts)):
        n_steps = int(steps) * (2**attempt)
        init_seed = seed + 1000 * attempt
        data_seed = seed + 1 + 100 * attempt
        model = _new_model(init_seed, dim)
        model.train()
        g = torch.Generator().manual_seed(data_seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps)
        t0 = time.perf_counter()
        for step in range(n_steps):
            ids, y = sample_balanced_rows(n_entities, batch_size, g)
            logits = model(inputs_embeds=_embed(vectors, ids))[0]
            loss = torch.nn.functional.cross_entropy(logits, y)
            total = loss
            if l1 > 0 and step >= int(l1_start * n_steps):
                total = loss + l1 * sum(b.ff1.weight.abs().sum() for b in model.mlp.h[:2])
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
        model.eval()
        seconds = time.perf_counter() - t0
        held = _accuracy(model, heldout_x, heldout_y)
        tr_ids, tr_y = sample_balanced_rows(n_entities, 10_000, g)
        train_acc = _accuracy(model, _embed(vectors, tr_ids), tr_y)
        history.append(
            {"attempt": attempt, "steps": n_steps, "init_seed": init_seed, "data_seed": data_seed,
             "train_accuracy": train_acc, "heldout_accuracy": held, "seconds": seconds,
             "final_loss": float(loss.detach())}
        )
        logger.info(
            "HEQ seed %d attempt %d: %d steps, %.1fs, train acc %.4f, held-out acc %.4f",
            seed, attempt, n_steps, seconds, train_acc, held,
        )
        if held >= min_accuracy:
            break
        logger.warning(
            "HEQ seed %d attempt %d reached held-out accuracy %.4f < %.2f; retraining with %d steps",
            seed, attempt, held, min_accuracy, 2 * n_steps,
        )
    else:
        raise ModelError(
            f"HEQ model for seed {seed} did not reach held-out accuracy {min_accuracy} in "
            f"{max_attempts} attempts (best {max(h['heldout_accuracy'] for h in history):.4f}); "
            "raise steps= or max_attempts=, or use fewer entities"
        )
    return model, history, time.perf_counter() - t_start


# ----------------------------------------------------------------------------- banks
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
    n_entities = len(causal_model.values["W"])
    sizes = [int(n_fit), int(n_calibration), int(n_test)]
    total = sum(sizes)
    bank = PairBank.from_causal_model(
        causal_model,
        make_to_model_inputs(vectors),
        n=total,
        variables=["WX", "YZ"],
        seed=int(seed) + 201,
        sampler=balanced_sampler(n_entities),
        balance=True,
        name="all",
    )
    fit, cal, test = bank.split([s / total for s in sizes], seed=int(seed) + 301,
                                names=["fit", "calibration", "test"])
    if [len(fit), len(cal), len(test)] != sizes:
        raise RuntimeError(f"bank split sizes {[len(fit), len(cal), len(test)]} != requested {sizes}")
    settings = getattr(bank, "settings", None)
    for part in (fit, cal, test):
        part.meta.update({"task_seed": int(seed), "split_seed": int(seed) + 301, "sampler": "balanced"})
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
            "bank_seed": seed + 201,
            "split_seed": seed + 301,
            "bank_sizes": {b.name: len(b) for b in (fit, cal, test)},
            "changed_fraction": {
                b.name: {v: float(b.changed(v).float().mean()) for v in ("WX", "YZ")}
                for b in (fit, cal, test)
            },
            "input": "inputs_embeds (N, 1, 16): concatenated entity vectors of W, X, Y, Z",
        }
    )
    task = Task(
        name="heq",
        model=model,
        variables=["WX", "YZ"],
        fit=fit,
        calibration=cal,
        test=test,
        sites=neuron_sites(model, layers=[0, 1, 2]),
        default_stages=[Stage("layer"), Stage("coordinates", group_sizes=(4, 1))],
        readout=Readout(),
        causal_model=cm,
        info=info,
    )
    logger.info(
        "built HEQ task seed %d: held-out acc %.4f, %.1fs training, banks %s",
        seed, info["heldout_accuracy"], info["train_seconds"], info["bank_sizes"],
    )
    return task


register("heq", build_heq)
