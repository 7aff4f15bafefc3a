"""Shared pieces of the real-language-model tasks: single-token answers and filtered pair banks."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data import PairBank
from ..errors import BankError
from ..models import Readout, layer_sites
from ..progressive import Stage
from . import Task

logger = logging.getLogger(__name__)

__all__ = [
    "single_token_ids",
    "encode_prompts",
    "filtered_lm_bank",
    "split_candidate_pool",
    "position_tokens",
    "LM_BANK_SUMMARY_KEYS",
    "lm_bank_summary",
    "lm_task",
]


def single_token_ids(tokenizer, words: Sequence[str], prefix: str = " ") -> list[int]:
    """Token id of ``prefix + word`` for every word; raise if any is not exactly one token.

    Raises
    ------
    BankError
        Naming every multi-token answer and how it tokenises, so the task can drop or replace it.
    """
    ids, bad = [], []
    for w in words:
        toks = tokenizer(prefix + w, add_special_tokens=False).input_ids
        if len(toks) != 1:
            bad.append(f"{prefix + w!r} -> {[tokenizer.decode([t]) for t in toks]}")
        else:
            ids.append(int(toks[0]))
    if bad:
        raise BankError(
            f"{len(bad)} answer(s) are not single tokens for this tokenizer: {', '.join(bad)}; "
            "IIA compares one next-token prediction, so use single-token answers"
        )
    if len(set(ids)) != len(ids):
        raise BankError("two answers map to the same token id; answers must be distinguishable")
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenise prompts; every prompt must have the same number of tokens (positions then align)."""
    enc = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    lengths = {len(e) for e in enc}
    if len(lengths) != 1:
        raise BankError(
            f"prompts tokenise to different lengths {sorted(lengths)}; use fillers that are single tokens "
            "so that token positions align across examples"
        )
    ids = torch.tensor(enc, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def predict_argmax(model, inputs: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Next-token argmax per row; each distinct prompt is run once (banks repeat prompts a lot)."""
    uniq, inverse = torch.unique(inputs["input_ids"], dim=0, return_inverse=True)
    first = torch.zeros(uniq.shape[0], dtype=torch.long).scatter_(0, inverse, torch.arange(inverse.numel()))
    rows = {k: v[first] for k, v in inputs.items()}
    out = []
    dev = next(model.parameters()).device
    for s in range(0, uniq.shape[0], batch_size):
        part = {k: v[s : s + batch_size].to(dev) for k, v in rows.items()}
        out.append(model(**part).logits[:, -1].argmax(-1).cpu())
    return torch.cat(out)[inverse]


def filtered_lm_bank(
    model,
    tokenizer,
    base_prompts: Sequence[str],
    source_prompts: Sequence[str],
    base_answers: Sequence[int],
    source_answers: Sequence[int],
    counterfactual: dict[str, Sequence[int]],
    label_tokens: Sequence[int],
    name: str,
    batch_size: int = 64,
) -> PairBank:
    """A pair bank restricted to pairs the model answers correctly on both base and source.

    ``*_answers`` and ``counterfactual`` hold label indices into ``label_tokens``; "correct" means the
    full-vocabulary next-token argmax equals the expected answer token. The number of pairs kept and
    dropped goes to ``bank.meta`` and the log.
    """
    base = encode_prompts(tokenizer, base_prompts)
    source = encode_prompts(tokenizer, source_prompts)
    lt = torch.tensor(list(label_tokens))
    b_ok = predict_argmax(model, base, batch_size) == lt[torch.as_tensor(list(base_answers))]
    s_ok = predict_argmax(model, source, batch_size) == lt[torch.as_tensor(list(source_answers))]
    keep = (b_ok & s_ok).nonzero().flatten()
    n = len(base_prompts)
    if keep.numel() == 0:
        raise BankError(f"bank {name!r}: the model answers none of the {n} pairs correctly on both sides")
    meta = {
        "n_candidates": n,
        "n_kept": int(keep.numel()),
        "n_dropped": int(n - keep.numel()),
        "n_base_wrong": int((~b_ok).sum()),
        "n_source_wrong": int((~s_ok).sum()),
        "filter": "full-vocabulary next-token argmax equals the answer on base and on source",
        "kept_indices": keep.tolist(),  # candidate rows kept, in order
    }
    logger.info("bank %s: kept %d of %d pairs (%d dropped)", name, meta["n_kept"], n, meta["n_dropped"])
    return PairBank(
        {k: v[keep] for k, v in base.items()},
        {k: v[keep] for k, v in source.items()},
        torch.as_tensor(list(base_answers))[keep],
        {v: torch.as_tensor(list(c))[keep] for v, c in counterfactual.items()},
        name=name,
        num_classes=len(label_tokens),
        meta=meta,
        readout=Readout(position="last", label_tokens=tuple(int(t) for t in label_tokens)),
    )


#: ``pp.compare`` settings for the SmolLM2 tasks on CPU: one subspace size and two epochs, shared by
#: PLOT-guided and Full DAS (Full DAS trains every layer x position, 240 trainings on IOI). k = 64 was
#: chosen on the calibration bank with ``benchmarks/das_budget.py`` (k = 8 stays near chance whatever the
#: epochs: IOI output_token calibration 0.74-0.85 at k = 8 vs 0.94-0.97 at k = 64; a training costs the same).
LM_COMPARE_OPTIONS = {"subspace_sizes": (64,), "das_kwargs": {"epochs": 2, "min_epochs": 1, "batch_size": 20}}


def split_candidate_pool(pool: Sequence[Any], n_cand: Mapping[str, int]) -> dict[str, list]:
    """Cut consecutive slices of ``pool``: ``{split: the next n_cand[split] candidates}``, in ``n_cand`` order."""
    parts, lo = {}, 0
    for split, n in n_cand.items():
        parts[split] = pool[lo:lo + n]
        lo += n
    return parts


def position_tokens(tokenizer, example: Sequence[int], positions: Mapping[str, int]) -> dict[str, dict]:
    """``{name: {"index": p, "token_in_example": decoded token at p}}`` for one tokenised example."""
    return {k: {"index": p, "token_in_example": tokenizer.decode([example[p]])} for k, p in positions.items()}


#: ``bank.meta`` entries every SmolLM2 task reports per split in ``task.info["banks"]``
LM_BANK_SUMMARY_KEYS = ("n_candidates", "n_kept", "n_dropped", "n_base_wrong", "n_source_wrong",
                        "n_requested", "n_used", "families")


def lm_bank_summary(banks: Mapping[str, PairBank], extra_keys: Sequence[str] = ()) -> dict[str, dict]:
    """``{split: {key: bank.meta[key]}}`` over :data:`LM_BANK_SUMMARY_KEYS` then ``extra_keys``."""
    keys = tuple(LM_BANK_SUMMARY_KEYS) + tuple(extra_keys)
    return {k: {kk: b.meta[kk] for kk in keys} for k, b in banks.items()}


def lm_task(
    name: str,
    model: torch.nn.Module,
    variables: Sequence[str],
    banks: Mapping[str, PairBank],
    layer_positions: Sequence[int],
    search_positions: Sequence[int],
    causal_model: Any,
    info: dict,
) -> Task:
    """A SmolLM2-shaped :class:`Task`: layer x position sites, three default stages, the LM settings.

    Parameters
    ----------
    name : str
        Registry name.
    model : torch.nn.Module
        The language model.
    variables : sequence of str
        Variables to localise.
    banks : mapping
        ``{"fit", "calibration", "test"} -> PairBank``; the task's readout is the fit bank's.
    layer_positions : sequence of int
        Token positions of the single-stage sites and of the ``layer`` stage.
    search_positions : sequence of int
        Token positions the ``position`` stage searches.
    causal_model : object
        The high-level causal model.
    info : dict
        ``task.info``.

    Returns
    -------
    Task
        ``default_stages = [Stage("layer", positions=layer_positions), Stage("position",
        positions=search_positions), Stage("coordinates", group_sizes=(64, 16))]`` and
        ``compare_options =`` :data:`LM_COMPARE_OPTIONS`.
    """
    return Task(
        name=name,
        model=model,
        variables=list(variables),
        fit=banks["fit"],
        calibration=banks["calibration"],
        test=banks["test"],
        sites=layer_sites(model, positions=layer_positions),
        default_stages=[
            Stage("layer", positions=layer_positions),
            Stage("position", positions=search_positions),
            Stage("coordinates", group_sizes=(64, 16)),
        ],
        readout=banks["fit"].readout,
        causal_model=causal_model,
        info=info,
        compare_options=LM_COMPARE_OPTIONS,
    )
