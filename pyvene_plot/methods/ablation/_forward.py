"""Forward passes and losses: :func:`run_ablated`, clean read-outs, per-row losses, finiteness checks."""

from __future__ import annotations

from collections.abc import Mapping

import pyvene as pv
import torch
import torch.nn.functional as F

from ...data import Inputs, as_model_kwargs, inputs_len, sequence_length
from ...errors import ModelError, PlotError, SiteError
from ...interventions import OptimalAblationIntervention, intervention_position
from ...models import Readout, model_device, model_spec, resolve_positions


def run_ablated(
    im: pv.IntervenableModel, inputs: Inputs, readout: Readout | None = None, batch_size: int = 512
) -> torch.Tensor:
    """Read-out logits ``(N, C)`` of a model whose sites are ablated by :class:`OptimalAblationIntervention` s.

    Positions come from each intervention's ``position`` buffer and are resolved per row against
    the ``attention_mask`` (padding honoured). Works on a freshly loaded
    ``pyvene.IntervenableModel.load(dir, model)``.

    Parameters
    ----------
    im : pyvene.IntervenableModel
        Every intervention an :class:`OptimalAblationIntervention`.
    inputs : Tensor (N, ...) or dict of Tensors
        Model inputs.
    readout : Readout, optional
        Output -> logits ``(B, C)``; default :class:`Readout`.
    batch_size : int
        Rows per forward pass.

    Returns
    -------
    Tensor, shape (N, C)
        float32 logits on CPU.
    """
    readout = readout or Readout()
    keys = list(im.sorted_keys)
    if not keys or any(not isinstance(im.interventions[k], OptimalAblationIntervention) for k in keys):
        raise PlotError("run_ablated needs an IntervenableModel whose interventions are all OptimalAblationIntervention")
    spec = model_spec(im.model)
    kw = as_model_kwargs(inputs)
    n = inputs_len(kw)
    dev = model_device(im.model)
    im.use_fast = False
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            part = {k: v[s : s + batch_size].to(dev) for k, v in kw.items()}
            b = inputs_len(part)
            locs = []
            for key in keys:
                pos = intervention_position(im.interventions[key])
                if not spec.has_positions:
                    rows = [0] * b
                else:
                    if pos is None:
                        raise SiteError(f"intervention {key} has no stored position; build it with position=")
                    rows = resolve_positions(pos, part, sequence_length(part), b)
                locs.append(row_locations(torch.as_tensor(rows)))
            _, cf = im(part, unit_locations={"sources->base": (None, locs)})
            out.append(readout(cf, part).float().cpu())
    logits = torch.cat(out, 0)
    check_finite(logits, "the ablated model")
    return logits


def row_locations(pos: torch.Tensor) -> list:
    """pyvene per-row locations ``[[p_0], [p_1], ...]`` for one intervention (cheap when uniform).

    Parameters
    ----------
    pos : LongTensor, shape (B,)
        The token position of each row.
    """
    if pos.numel() and bool((pos == pos[0]).all()):
        return [[int(pos[0])]] * int(pos.numel())
    return pos.reshape(-1, 1).tolist()


@torch.no_grad()
def clean_logits(model: torch.nn.Module, kw: Mapping[str, torch.Tensor], readout: Readout, batch: int) -> torch.Tensor:
    """Read-out logits of the unablated model, (N, C) float32 on CPU, ``batch`` rows per forward pass."""
    dev = model_device(model)
    n = inputs_len(dict(kw))
    out = []
    for s in range(0, n, batch):
        part = {k: v[s : s + batch].to(dev) for k, v in kw.items()}
        out.append(readout(model(**part), part).float().cpu())
    logits = torch.cat(out, 0)
    check_finite(logits, "the unablated model's read-out")
    return logits


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise :class:`~pyvene_plot.ModelError` naming ``where`` if ``x`` holds NaN or inf."""
    if x.numel() and not torch.isfinite(x).all():
        raise ModelError(
            f"non-finite values (NaN or inf) in {where}; check the model's weights and inputs "
            "(for optimal ablation also try a smaller lr=)"
        )


def per_row_loss(loss: str, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row loss ``(M,)`` of logits ``(M, C)``.

    ``ref`` is what :func:`loss_reference` returns: clean log-probs ``(M, C)`` (kl), labels ``(M,)``
    (ce) or clean logits ``(M, C)`` (mse).
    """
    if loss == "kl":
        logq = F.log_softmax(logits.float(), -1)
        return F.kl_div(logq, ref, log_target=True, reduction="none").sum(-1)
    if loss == "ce":
        return F.cross_entropy(logits.float(), ref, reduction="none")
    return ((logits.float() - ref) ** 2).sum(-1)


def loss_reference(loss: str, clean: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """What :func:`per_row_loss` compares against: clean log-probs (kl), ``labels`` (ce) or clean logits (mse)."""
    if loss == "kl":
        return F.log_softmax(clean.float(), -1)
    if loss == "ce":
        return labels
    return clean.float()
