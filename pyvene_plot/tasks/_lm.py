"""Shared pieces of the real-language-model tasks: single-token answers and filtered pair banks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..data import PairBank
from ..errors import BankError
from ..models import Readout

logger = logging.getLogger(__name__)

__all__ = ["single_token_ids", "encode_prompts", "filtered_lm_bank"]


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
