"""Networks PLOT can hook: sites, the model registry, readouts, step-wise GRUs and offline LM loaders."""

from __future__ import annotations

from ._lm import (
    LM_INSTALL_HINT,
    clear_lm_cache,
    load_smollm2,
    rearm_output_capture,
    smollm2_gguf_path,
)
from ._readout import BitsReadout, Readout, last_token_index, raw_logits
from ._registry import ModelSpec, model_device, model_spec, register_model
from ._sites import (
    Site,
    coordinate_sites,
    format_dims,
    layer_sites,
    neuron_sites,
    resolve_positions,
    site_label,
    validate_sites,
)
from ._step_gru import StepGRUForClassification, StepGRULMHeadModel, StepGRUModel, steppable_gru

__all__ = [
    "Site", "layer_sites", "coordinate_sites", "neuron_sites", "resolve_positions", "validate_sites",
    "site_label", "format_dims",
    "register_model", "model_spec", "ModelSpec", "model_device",
    "Readout", "BitsReadout", "raw_logits", "last_token_index",
    "StepGRUModel", "StepGRUForClassification", "StepGRULMHeadModel", "steppable_gru",
    "load_smollm2", "clear_lm_cache", "smollm2_gguf_path", "rearm_output_capture", "LM_INSTALL_HINT",
]
