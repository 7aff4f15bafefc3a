"""HEQ network inputs and training: entity vectors, balanced row sampling, the MLP and its retry loop.

Split out of :mod:`pyvene_plot.tasks.heq`, which re-exports the public names (``EMBEDDING_DIM``,
``entity_vectors``, ``sample_balanced_rows``, ``exhaustive_accuracy``, ``train_heq_model``); see
that module's docstring for the task and the training choices.
"""

from __future__ import annotations

import logging
import time

import torch
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification

from ..errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_DIM",
    "entity_vectors",
    "sample_balanced_rows",
    "exhaustive_accuracy",
    "train_heq_model",
]

EMBEDDING_DIM = 4
"""Width of each entity vector; the model input is ``4 * EMBEDDING_DIM`` wide."""


# ----------------------------------------------------------------------------- inputs
def entity_vectors(n_entities: int, seed: int, dim: int = EMBEDDING_DIM) -> torch.Tensor:
    """Fixed random entity vectors, ``uniform(-1, 1)^dim``, shape ``(n_entities, dim)``.

    Drawn from a local generator seeded with ``seed`` (global RNG state is untouched).
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(int(n_entities), int(dim), generator=g) * 2.0 - 1.0


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
    """Share of rows of ``x`` ``(n, 1, 4*dim)`` whose argmax class equals ``y`` ``(n,)``, in batches."""
    correct = 0
    for i in range(0, x.shape[0], batch):
        logits = model(inputs_embeds=x[i : i + batch])[0]
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / max(1, x.shape[0])


# ----------------------------------------------------------------------------- training
def _new_model(init_seed: int, dim: int) -> MLPForClassification:
    """A fresh 3-layer ReLU MLP of width ``dim`` with PyTorch's default init (global RNG untouched)."""
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
    info = _training_info(
        model, history, total, vectors, batch_size=batch_size, lr=lr, l1=l1, l1_start=l1_start,
        seed=seed, n_heldout=n_heldout, n_entities=n_entities, num_threads=num_threads,
    )
    return model, info


def _training_info(
    model: MLPForClassification,
    history: list[dict],
    total: float,
    vectors: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    l1: float,
    l1_start: float,
    seed: int,
    n_heldout: int,
    n_entities: int,
    num_threads: int | None,
) -> dict:
    """The ``info`` dict of :func:`train_heq_model`, from the kept (last) attempt of ``history``.

    ``vectors`` is the ``(n_entities, dim)`` entity-vector table; ``total`` the seconds of all
    attempts. Also evaluates :func:`exhaustive_accuracy` on the trained ``model``.
    """
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
    return info


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

