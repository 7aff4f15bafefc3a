"""Which architectures pyvene can hook, and how: :func:`register_model` and :func:`model_spec`.

pyvene 0.1.8 only hooks model classes in its type-to-module mappings; :func:`register_model` adds a
class (a user's own module, or an adapter such as the step-wise GRU), and :func:`model_spec` describes
a model (layers, component widths, whether inputs have a token axis) for site validation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import pyvene as pv
import torch

from ..errors import ModelError, SiteError

logger = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# ---------------------------------------------------------------------------- models
_NO_SEQUENCE_TYPES: set[type] = set()
try:  # pyvene's own MLP takes (B, 1, d) inputs: one position only
    from pyvene.models.mlp.modelings_mlp import MLPForClassification, MLPModel

    _NO_SEQUENCE_TYPES |= {MLPForClassification, MLPModel}
except ImportError:  # pragma: no cover
    pass


def register_model(
    model_cls: type,
    module_mapping: Mapping[str, tuple],
    dimension_mapping: Mapping[str, tuple],
    has_positions: bool = True,
) -> None:
    """Teach pyvene (and pyvene_plot) where to hook a new model class.

    Parameters
    ----------
    model_cls : type
        The exact model class (pyvene looks up ``type(model)``, not subclasses).
    module_mapping : dict
        ``component -> (module path template with %s for the layer, hook type)``, e.g.
        ``{"block_output": ("layers[%s]", pv.models.constants.CONST_OUTPUT_HOOK)}``.
    dimension_mapping : dict
        ``component -> (config attribute or expression, ...)``, e.g. ``{"block_output": ("hidden_size",)}``.
    has_positions : bool
        Whether the model has a token/sequence axis on which positions are meaningful.
    """
    pv.type_to_module_mapping[model_cls] = dict(module_mapping)
    pv.type_to_dimension_mapping[model_cls] = dict(dimension_mapping)
    if not has_positions:
        _NO_SEQUENCE_TYPES.add(model_cls)
    else:
        _NO_SEQUENCE_TYPES.discard(model_cls)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What pyvene_plot knows about a model: layer count, components and their widths."""

    model_type: type
    n_layers: int
    components: tuple[str, ...]
    has_positions: bool
    config: Any

    def dim(self, component: str) -> int:
        if component not in self.components:
            raise SiteError(
                f"component {component!r} is not in the pyvene card of {self.model_type.__name__}; "
                f"known components: {list(self.components)}"
            )
        from pyvene.models.modeling_utils import get_dimension_by_component

        try:
            d = get_dimension_by_component(self.model_type, self.config, component)
        except AssertionError:
            d = None
        if d is None:
            raise SiteError(f"pyvene cannot resolve the width of {component!r} for {self.model_type.__name__}")
        return int(d)


def _gru_guard(mtype: type) -> None:
    try:
        from pyvene.models.gru.modelings_gru import GRUForClassification, GRULMHeadModel, GRUModel
    except ImportError:  # pragma: no cover
        return
    if mtype in (GRUModel, GRUForClassification, GRULMHeadModel):
        raise ModelError(
            f"pyvene 0.1.8 cannot intervene on single timesteps of {mtype.__name__} (its unit='t' path "
            "crashes for batches > 1 and zeroes unselected steps); convert the model with "
            "pyvene_plot.steppable_gru(model), which keeps the weights and exposes one site per timestep"
        )


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """Inspect a model; raise :class:`ModelError` if pyvene cannot hook it."""
    mtype = type(model)
    _gru_guard(mtype)
    if mtype not in pv.type_to_module_mapping or mtype not in pv.type_to_dimension_mapping:
        raise ModelError(
            f"pyvene cannot hook models of type {mtype.__name__}: it is not in pyvene's model cards "
            "(pv.type_to_module_mapping). Register it with pyvene_plot.register_model(model_cls, "
            "module_mapping, dimension_mapping) or use a supported class (pyvene MLP/GRU, GPT-2, Llama, ...)"
        )
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ModelError(f"{mtype.__name__} has no .config; pyvene needs a transformers-style config")
    n_layers = getattr(model, "plot_num_layers", None)
    for attr in ([] if n_layers is not None else  ["n_layer", "num_hidden_layers", "n_layers", "num_layers"]):
        if getattr(cfg, attr, None) is not None:
            n_layers = int(getattr(cfg, attr))
            break
    if n_layers is None:
        raise ModelError(f"cannot find the number of layers in {type(cfg).__name__}; set config.n_layer")
    comps = tuple(pv.type_to_module_mapping[mtype].keys())
    return ModelSpec(mtype, n_layers, comps, mtype not in _NO_SEQUENCE_TYPES, cfg)
