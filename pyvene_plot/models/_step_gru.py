"""Model adapters that make more networks hookable by pyvene at the granularity PLOT needs.

**Recurrent models.** pyvene 0.1.8's own timestep path (unit ``"t"`` on ``cell_output`` of its GRU
classes) is unusable: any batch larger than one fails with ``RuntimeError: shape mismatch`` when
the intervened state is written back, and with batch one every *other* timestep is overwritten with
zeros (the stateful getter hands zeros as the source at unselected steps). The step models below
are drop-in subclasses of pyvene's GRU classes with identical parameters (``load_state_dict``
from a pyvene GRU works strictly) in which the hidden state of GRU layer ``l`` at timestep ``t``
passes through its own ``nn.Identity`` hook, shaped ``(B, 1, d)``. pyvene then addresses timestep
``t`` through the ordinary ``layer`` field and a single position, so every PLOT and DAS code path
(and save/load) works unchanged:

==================  ==================================================================
component           hooked tensor
==================  ==================================================================
``block_output``    hidden state of the top GRU layer at timestep ``layer``
``h{l}_step``       hidden state of GRU layer ``l`` at timestep ``layer``
==================  ==================================================================

Use :func:`steppable_gru` to convert a trained pyvene GRU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pyvene.models.constants import CONST_OUTPUT_HOOK
from pyvene.models.gru.modelings_gru import (
    GRUConfig,
    GRUForClassification,
    GRULMHeadModel,
    GRUModel,
    GRUModelOutput,
)

from ..errors import ModelError
from ._registry import register_model


def _n_steps(config: GRUConfig) -> int:
    return int(getattr(config, "n_steps", None) or config.max_position_embeddings)


class StepGRUModel(GRUModel):
    """pyvene's ``GRUModel`` with one identity hook per (GRU layer, timestep).

    ``config.n_steps`` (default ``max_position_embeddings``) bounds the sequence length and is the
    number of "layers" PLOT sees (one per timestep).
    """

    def __init__(self, config: GRUConfig) -> None:
        super().__init__(config)
        T = _n_steps(config)
        self.steps = nn.ModuleList([nn.ModuleList([nn.Identity() for _ in range(T)]) for _ in range(self.n_layer)])

    @property
    def plot_num_layers(self) -> int:
        return _n_steps(self.config)

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, hidden_states=None,
                output_hidden_states=None, return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if position_ids is not None:
            inputs_embeds = inputs_embeds + self.wpe(position_ids)
        B, T = inputs_embeds.shape[:2]
        if T > len(self.steps[0]):
            raise ModelError(f"sequence length {T} exceeds the model's n_steps={len(self.steps[0])}")
        h0 = inputs_embeds.new_zeros(self.n_layer, B, self.h_dim) if hidden_states is None else hidden_states
        h = [h0[l] for l in range(self.n_layer)]
        outs = []
        for t in range(T):
            for l in range(self.n_layer):
                inp = inputs_embeds[:, t, :] if l == 0 else h[l - 1]
                h_new = self.cells[l](inp, h[l])
                h[l] = self.steps[l][t](h_new.unsqueeze(1)).squeeze(1)
            outs.append(h[-1])
        all_h = torch.stack(outs, dim=1)
        if not return_dict:
            return (all_h, h[-1])
        return GRUModelOutput(hidden_states=all_h, last_hidden_state=h[-1])


class StepGRUForClassification(GRUForClassification):
    """pyvene's ``GRUForClassification`` built on :class:`StepGRUModel`."""

    def __init__(self, config: GRUConfig) -> None:
        super().__init__(config)
        self.gru = StepGRUModel(config)
        self.num_labels = config.n_labels  # upstream reads num_labels but never sets it

    @property
    def plot_num_layers(self) -> int:
        return _n_steps(self.config)


class StepGRULMHeadModel(GRULMHeadModel):
    """pyvene's ``GRULMHeadModel`` built on :class:`StepGRUModel`: logits at every timestep."""

    def __init__(self, config: GRUConfig) -> None:
        super().__init__(config)
        self.gru = StepGRUModel(config)

    @property
    def plot_num_layers(self) -> int:
        return _n_steps(self.config)


def _register() -> None:
    for cls, prefix in ((StepGRUModel, ""), (StepGRUForClassification, "gru."), (StepGRULMHeadModel, "gru.")):
        # pyvene templates are per class, not per config: "block_output" hooks GRU layer 0 (the
        # top layer of a single-layer GRU); multi-layer GRUs address layer l as "h{l}_step".
        mm = {"block_output": (f"{prefix}steps[0].%s", CONST_OUTPUT_HOOK)}
        mm.update({f"h{l}_step": (f"{prefix}steps[{l}].%s", CONST_OUTPUT_HOOK) for l in range(8)})
        register_model(cls, mm, {k: ("h_dim",) for k in mm}, has_positions=False)


_register()


def steppable_gru(model: nn.Module, n_steps: int | None = None) -> nn.Module:
    """Convert a pyvene GRU (``GRUModel``, ``GRUForClassification``, ``GRULMHeadModel``) to its step model.

    Parameters
    ----------
    model : nn.Module
        A trained pyvene GRU.
    n_steps : int, optional
        Maximum sequence length (number of timestep sites); default ``max_position_embeddings``.
    """
    kinds = {GRUModel: StepGRUModel, GRUForClassification: StepGRUForClassification, GRULMHeadModel: StepGRULMHeadModel}
    if type(model) not in kinds:
        raise ModelError(f"steppable_gru expects a pyvene GRU model, got {type(model).__name__}")
    cfg = GRUConfig(**model.config.to_dict())
    if n_steps is not None:
        cfg.n_steps = int(n_steps)
    new = kinds[type(model)](cfg)
    new.load_state_dict(model.state_dict(), strict=True)
    new.to(next(model.parameters()).device)
    return new.eval() if not model.training else new
