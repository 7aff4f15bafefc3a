"""Networks PLOT can hook: sites, the model registry, readouts, step-wise GRUs and offline LM loaders."""

from __future__ import annotations

from ._lm import LM_INSTALL_HINT, smollm2_gguf_path, rearm_output_capture, load_smollm2
from ._readout import raw_logits, last_token_index, Readout, BitsReadout
from ._registry import model_device, register_model, ModelSpec, model_spec
from ._sites import Site, layer_sites, coordinate_sites, neuron_sites, resolve_positions, validate_sites
from ._step_gru import StepGRUModel, StepGRUForClassification, StepGRULMHeadModel, steppable_gru

__all__ = ['LM_INSTALL_HINT', 'smollm2_gguf_path', 'rearm_output_capture', 'load_smollm2', 'raw_logits', 'last_token_index', 'Readout', 'BitsReadout', 'model_device', 'register_model', 'ModelSpec', 'model_spec', 'Site', 'layer_sites', 'coordinate_sites', 'neuron_sites', 'resolve_positions', 'validate_sites', 'StepGRUModel', 'StepGRUForClassification', 'StepGRULMHeadModel', 'steppable_gru']
