"""The binary adder's input encoding, its step GRU and the training on all 256 factual examples.

Split out of :mod:`pyvene_plot.tasks.binary_addition`, which re-exports every public name here
(``N_BITS``, ``N_STEPS``, ``H_DIM``, ``encode``, ``all_examples``, ``make_model``,
``factual_accuracy``, ``train_model``); see that module's docstring for the task and the
training protocol.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from pyvene.models.gru.modelings_gru import GRUConfig

from ..errors import ModelError
from ..models import StepGRULMHeadModel

logger = logging.getLogger(__name__)

__all__ = [
    "N_BITS",
    "N_STEPS",
    "H_DIM",
    "encode",
    "all_examples",
    "make_model",
    "factual_accuracy",
    "train_model",
]

N_BITS = 4
N_STEPS = N_BITS + 1
H_DIM = 16


# ----------------------------------------------------------------------------- inputs
def encode(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` ``(N, 5, 16)`` for integer tensors ``a, b`` of shape ``(N,)``."""
    a = torch.as_tensor(a, dtype=torch.long).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.long).reshape(-1)
    x = torch.zeros(a.shape[0], N_STEPS, H_DIM)
    shifts = torch.arange(N_BITS)
    x[:, :N_BITS, 0] = ((a.unsqueeze(1) >> shifts) & 1).float() * 2 - 1
    x[:, :N_BITS, 1] = ((b.unsqueeze(1) >> shifts) & 1).float() * 2 - 1
    return x



def all_examples() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``(a, b)``: ``a``, ``b`` (256,) and the 5-bit targets ``(256, 5)`` of ``a + b``."""
    idx = torch.arange(2 ** (2 * N_BITS))
    a, b = idx // 2**N_BITS, idx % 2**N_BITS
    y = ((a + b).unsqueeze(1) >> torch.arange(N_STEPS)) & 1
    return a, b, y



# ----------------------------------------------------------------------------- model
def make_model(init_seed: int = 0) -> StepGRULMHeadModel:
    """A fresh step GRU (h_dim 16, one layer, vocab 2, 5 steps); the global RNG is untouched."""
    cfg = GRUConfig(
        h_dim=H_DIM, n_layer=1, include_emb=False, vocab_size=2, n_steps=N_STEPS,
        max_position_embeddings=N_STEPS, pdrop=0.0, include_bias=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        model = StepGRULMHeadModel(cfg)
    return model


@torch.no_grad()
def factual_accuracy(model: torch.nn.Module) -> dict[str, Any]:
    """Exact-match accuracy (all 5 bits) and per-bit accuracy on all 256 examples."""
    a, b, y = all_examples()
    logits = model(inputs_embeds=encode(a, b))[0]
    pred = logits.argmax(-1)
    return {
        "accuracy": float((pred == y).all(1).float().mean()),
        "bit_accuracy": [float(v) for v in (pred == y).float().mean(0)],
    }


def train_model(
    seed: int = 0,
    lr: float = 0.01,
    max_steps: int = 1000,
    target_loss: float = 0.01,
    extra_steps_limit: int = 20_000,
    threads: int | None = 1,
) -> tuple[StepGRULMHeadModel, dict]:
    """Train the adder on all 256 factual examples (full batch, Adam, CE per step).

    Training stops at the first step at which every example is exact *and* the mean per-bit
    cross-entropy is below ``target_loss``, or after ``max_steps``; if the model is not at 100 %
    by then, training continues (same optimiser, deterministic) until it is, up to
    ``extra_steps_limit`` further steps, else :class:`ModelError`.

    ``threads`` temporarily sets ``torch.set_num_threads`` for the training loop (restored
    afterwards; ``None`` leaves it alone). The tensors are tiny (256 x 16), so intra-op threads
    only add overhead: one thread trains in ~0.3-0.5 s, two threads on a shared 2-core machine
    took 2-50 s for the same (identical) steps.

    Returns ``(model, info)``; the model is in eval mode with frozen parameters.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _train(seed, lr, max_steps, target_loss, extra_steps_limit)
    finally:
        torch.set_num_threads(old_threads)


def _train(seed: int, lr: float, max_steps: int, target_loss: float, extra_steps_limit: int):
    """The training loop of :func:`train_model` (current thread setting); returns ``(model, info)``."""
    a, b, y = all_examples()
    x = encode(a, b)
    model = make_model(init_seed=seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    steps = 0
    first_exact = None
    while True:
        logits = model(inputs_embeds=x)[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), y.reshape(-1))
        exact = bool((logits.detach().argmax(-1) == y).all())
        if exact and first_exact is None:
            first_exact = steps
        if exact and (float(loss.detach()) < target_loss or steps >= max_steps):
            break
        if steps >= max_steps + extra_steps_limit:
            raise ModelError(
                f"binary adder (seed {seed}) not exact on all 256 examples after {steps} steps; "
                "raise extra_steps_limit= or change lr="
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    seconds = time.perf_counter() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    acc = factual_accuracy(model)
    if acc["accuracy"] != 1.0:  # pragma: no cover - the loop only stops when exact
        raise ModelError(f"binary adder (seed {seed}) lost exactness after training: {acc}")
    info = {
        "train_seconds": round(seconds, 3),
        "train_threads": torch.get_num_threads(),
        "train_steps": steps,
        "first_exact_step": first_exact,
        "final_train_loss": float(loss.detach()),
        "factual_accuracy": acc["accuracy"],
        "bit_accuracy": acc["bit_accuracy"],
        "optimizer": f"Adam lr={lr}, full batch (256), CE per output bit",
        "stop_rule": f"all 256 exact and mean CE < {target_loss}, "
                     f"or {max_steps} steps then until exact",
        "init_seed": int(seed),
        "backbone_training_data": "all 256 factual (a, b) examples "
                                  "(every fit/calibration/test example)",
    }
    return model, info
