"""A hand-weighted ("planted") equality network whose variables sit in known neurons.

The network is a pyvene ``MLPForClassification`` (``h_dim=8``, 3 ReLU layers, biases, 2 classes)
with weights set by hand, no training. It computes hierarchical equality on integer entities
``w, x, y, z`` in ``{0, ..., 4}``, fed as ``inputs_embeds`` of shape ``(N, 1, 8)`` holding
``[w, x, y, z, 0, 0, 0, 0]``. Writing ``a[l][i]`` for neuron ``i`` of ``mlp.h[l]``'s output
(pyvene component ``block_output`` of layer ``l``):

* layer 0: ``a0[0] = relu(w - x)``, ``a0[1] = relu(x - w)`` (feed ``WX``);
  ``a0[2] = relu(y - z)``, ``a0[3] = relu(z - y)`` (feed ``YZ``); ``a0[4..7] = w, x, y, z``
  (inert copies of the inputs).
* layer 1: ``a1[0] = relu(1 - 2 (a0[0] + a0[1]))``, **exactly** ``WX = [w == x]``;
  ``a1[1] = relu(1 - 2 (a0[2] + a0[3]))``, **exactly** ``YZ = [y == z]``;
  ``a1[2..7] = a0[0..3], w, x`` (inert copies).
* layer 2: ``a2[0] = relu(a1[0] - a1[1])``, ``a2[1] = relu(a1[1] - a1[0])`` (``WX xor YZ``);
  ``a2[2] = a1[0]``, ``a2[3] = a1[1]`` (inert copies of ``WX`` and ``YZ``);
  ``a2[4..7] = a1[2..5]`` (inert copies).
* score: ``logit1 - logit0 = 10 (0.5 - a2[0] - a2[1])``, so the argmax is ``O = [WX == YZ]``.

Carriers (``task.info``):

* ``"exact_carriers"``: the single neurons whose full interchange reproduces the variable's
  counterfactual on every pair: ``WX`` -> layer 1 neuron 0; ``YZ`` -> layer 1 neuron 1.
* ``"joint_exact_carriers"``: multi-neuron sites that are exact only together: ``WX`` -> layer 0
  neurons (0, 1); ``YZ`` -> layer 0 neurons (2, 3). Either neuron alone is a *partial* carrier
  (swapping ``relu(w - x)`` alone transfers the source's inequality only in one direction).
* ``"carriers"``: every carrier neuron, exact first: ``WX`` -> ``L1[0], L0[0], L0[1]``;
  ``YZ`` -> ``L1[1], L0[2], L0[3]``.

Layer 2 neurons 2 and 3 copy ``WX`` and ``YZ`` but have zero weight into the score, so they are
perfectly *correlated* with the variables yet causally inert: interchanging them never changes the
output. Layer 2 neurons 0 and 1 mix both variables and carry neither alone.

>>> import pyvene_plot.tasks as tasks
>>> task = tasks.load("planted")                                  # doctest: +SKIP
>>> task.info["exact_carriers"]["WX"]                             # doctest: +SKIP
[Site(layer=1, component='block_output', position=-1, dims=(0,), basis=None)]
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification

from ..data import PairBank
from ..errors import ModelError
from ..models import Site
from . import Task, register
from .heq import draw_heq_banks, heq_bank_info, heq_causal_model, heq_task

logger = logging.getLogger(__name__)

__all__ = [
    "PLANTED_ENTITIES",
    "PLANTED_DIM",
    "planted_model",
    "planted_inputs",
    "planted_carriers",
    "mlp_interchange_logits",
    "build_planted",
]

PLANTED_ENTITIES = 5
"""Entities are the integers ``0..4``."""

PLANTED_DIM = 8
"""Hidden width of the planted MLP (and width of its input)."""

_SCALE = 10.0


def planted_model() -> MLPForClassification:
    """The hand-weighted 8-8-8 ReLU MLP described in the module docstring (eval mode, frozen)."""
    d = PLANTED_DIM
    config = MLPConfig(
        h_dim=d, n_layer=3, num_classes=2, activation_function="relu", pdrop=0.0, include_bias=True
    )
    model = MLPForClassification(config)
    w0 = torch.zeros(d, d)
    b0 = torch.zeros(d)
    w0[0, 0], w0[0, 1] = 1.0, -1.0  # relu(w - x)
    w0[1, 0], w0[1, 1] = -1.0, 1.0  # relu(x - w)
    w0[2, 2], w0[2, 3] = 1.0, -1.0  # relu(y - z)
    w0[3, 2], w0[3, 3] = -1.0, 1.0  # relu(z - y)
    for i in range(4):  # inert copies of w, x, y, z (inputs are >= 0)
        w0[4 + i, i] = 1.0

    w1 = torch.zeros(d, d)
    b1 = torch.zeros(d)
    w1[0, 0], w1[0, 1], b1[0] = -2.0, -2.0, 1.0  # WX
    w1[1, 2], w1[1, 3], b1[1] = -2.0, -2.0, 1.0  # YZ
    for i, j in zip(range(2, 8), (0, 1, 2, 3, 4, 5)):  # inert copies
        w1[i, j] = 1.0

    w2 = torch.zeros(d, d)
    b2 = torch.zeros(d)
    w2[0, 0], w2[0, 1] = 1.0, -1.0  # relu(WX - YZ)
    w2[1, 0], w2[1, 1] = -1.0, 1.0  # relu(YZ - WX)
    w2[2, 0] = 1.0  # copy of WX (inert)
    w2[3, 1] = 1.0  # copy of YZ (inert)
    for i, j in zip(range(4, 8), (2, 3, 4, 5)):
        w2[i, j] = 1.0

    ws = torch.zeros(2, d)
    bs = torch.zeros(2)
    half = _SCALE / 2.0
    ws[0, 0], ws[0, 1], bs[0] = half, half, -0.25 * _SCALE  # logit0 = +5 (a0+a1) - 2.5
    ws[1, 0], ws[1, 1], bs[1] = -half, -half, 0.25 * _SCALE  # logit1 = -5 (a0+a1) + 2.5

    with torch.no_grad():
        for layer, (w, b) in enumerate(((w0, b0), (w1, b1), (w2, b2))):
            model.mlp.h[layer].ff1.weight.copy_(w)
            model.mlp.h[layer].ff1.bias.copy_(b)
        model.score.weight.copy_(ws)
        model.score.bias.copy_(bs)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def planted_inputs(setting: dict) -> torch.Tensor:
    """``{"W", "X", "Y", "Z"} -> FloatTensor (1, 8) = [w, x, y, z, 0, 0, 0, 0]``."""
    x = torch.zeros(1, PLANTED_DIM)
    for i, v in enumerate(("W", "X", "Y", "Z")):
        x[0, i] = float(setting[v])
    return x


def planted_carriers() -> dict[str, dict[str, list[Site]]]:
    """Known carriers: ``{"carriers": ..., "exact_carriers": ..., "joint_exact_carriers": ...}``."""

    def s(layer: int, *dims: int) -> Site:
        return Site(layer, "block_output", -1, tuple(dims))

    return {
        "carriers": {"WX": [s(1, 0), s(0, 0), s(0, 1)], "YZ": [s(1, 1), s(0, 2), s(0, 3)]},
        "exact_carriers": {"WX": [s(1, 0)], "YZ": [s(1, 1)]},
        "joint_exact_carriers": {"WX": [s(0, 0, 1)], "YZ": [s(0, 2, 3)]},
    }


@torch.no_grad()
def mlp_interchange_logits(
    model: MLPForClassification,
    base: torch.Tensor,
    source: torch.Tensor,
    layer: int,
    dims: Sequence[int] | None,
) -> torch.Tensor:
    """Logits after copying ``dims`` of ``mlp.h[layer]``'s output from the source run into the base run.

    A direct unroll of pyvene's MLP (no pyvene, no pyvene_plot engine), used to check carriers.

    Parameters
    ----------
    model : MLPForClassification
    base, source : FloatTensor, shape (N, 1, d)
        ``inputs_embeds`` of the base and source examples.
    layer : int
        Block index.
    dims : sequence of int or None
        Neurons to interchange; None swaps the whole block output.

    Returns
    -------
    FloatTensor, shape (N, num_classes)
    """
    hb, hs = base, source
    for i, block in enumerate(model.mlp.h):
        hb, hs = block(hb), block(hs)
        if i == layer:
            hb = hb.clone()
            idx = slice(None) if dims is None else list(dims)
            hb[..., idx] = hs[..., idx]
    logits = model.score(hb)
    return logits.squeeze(1) if logits.dim() == 3 else logits


def _check_planted(model: MLPForClassification, banks: Sequence[PairBank]) -> dict:
    """Verify 100 % factual accuracy on all inputs and exact carriers on every bank; raise otherwise."""
    grid = list(itertools.product(range(PLANTED_ENTITIES), repeat=4))
    x = torch.stack([planted_inputs(dict(zip("WXYZ", g))) for g in grid])
    y = torch.tensor([int((g[0] == g[1]) == (g[2] == g[3])) for g in grid])
    with torch.no_grad():
        acc = float((model(inputs_embeds=x)[0].argmax(-1) == y).float().mean())
    if acc != 1.0:
        raise ModelError(f"planted network factual accuracy is {acc}, expected exactly 1.0")
    carriers = planted_carriers()
    iia: dict[str, dict[str, float]] = {}
    for kind in ("exact_carriers", "joint_exact_carriers"):
        for var, sites in carriers[kind].items():
            for site in sites:
                vals = []
                for bank in banks:
                    logits = mlp_interchange_logits(model, bank.base, bank.source, site.layer, site.dims)
                    vals.append((logits.argmax(-1) == bank.labels(var)).float())
                a = float(torch.cat(vals).mean())
                iia.setdefault(var, {})[site.label] = a
                if a != 1.0:
                    raise ModelError(f"planted carrier {site.label} reproduces {var} on {a:.4f} of pairs, expected 1.0")
    return {"factual_accuracy": acc, "n_factual_inputs": len(grid), "carrier_iia": iia}


def build_planted(
    seed: int = 0,
    n_fit: int = 400,
    n_calibration: int = 200,
    n_test: int = 400,
) -> Task:
    """Build the planted task: hand-weighted MLP, HEQ causal model over 5 entities, balanced banks.

    Parameters
    ----------
    seed : int
        Seeds the banks only (the network is fixed): bank seed ``seed + 201``, split seed
        ``seed + 301``.
    n_fit, n_calibration, n_test : int
        Bank sizes.

    Returns
    -------
    Task
        ``variables = ["WX", "YZ"]``; ``sites`` = the 24 single neurons; ``info`` holds the
        carriers (see the module docstring) and the verification results.

    Raises
    ------
    ModelError
        If the network is not 100 % accurate on all 625 inputs or an exact carrier fails.
    """
    seed = int(seed)
    model = planted_model()
    cm = heq_causal_model(PLANTED_ENTITIES)
    sizes = [int(n_fit), int(n_calibration), int(n_test)]
    _, (fit, cal, test) = draw_heq_banks(cm, planted_inputs, sizes, seed)
    checks = _check_planted(model, (fit, cal, test))
    info = {
        **planted_carriers(),
        **checks,
        "n_entities": PLANTED_ENTITIES,
        **heq_bank_info(seed, (fit, cal, test)),
        "input": "inputs_embeds (N, 1, 8) = [w, x, y, z, 0, 0, 0, 0], entities 0..4",
        "trained": False,
    }
    logger.info("built planted task seed %d: banks %s", seed, info["bank_sizes"])
    return heq_task("planted", model, (fit, cal, test), cm, info)


register("planted", build_planted)
