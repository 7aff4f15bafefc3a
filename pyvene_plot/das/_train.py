"""The two DAS trainers and what they share.

Both train the rotation of one candidate (a :class:`TrainSite`: one spec, one subspace size ``k``)
with constant-lr Adam on the cross-entropy of the intervened readout logits against a variable's
counterfactual labels, the model frozen, batches drawn from a seeded generator, and the same
early-stopping rule (:class:`_Stopper`) on the epoch's mean training loss:

- :func:`train_loop` (``trainer="loop"``): this package's loop. Source activations are collected
  once per bank and fed as pyvene ``source_representations``; each step's forward + backward runs
  inside ``torch.nn.utils.parametrize.cached()`` (same gradients, several times faster).
- :func:`train_pyvene` (``trainer="pyvene"``): ``IntervenableModel.train_alignment``, one call per
  epoch so early stopping can run in between; the source forward runs every step. Only for banks of
  plain ``input_ids`` and models whose output has ``.logits`` (:func:`pyvene_trainer_problem`).

:func:`predict_cached` scores a trained candidate on cached source activations (calibration).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..data import PairBank, as_model_kwargs
from ..errors import ModelError
from ..models import Readout, model_device
from ._spec import DASSpec


def auto_lr(width: int) -> float:
    """The ``lr="auto"`` rule: ``min(0.03, 0.25 / sqrt(width))`` for a support of width ``width``."""
    return float(min(0.03, 0.25 / math.sqrt(max(1, int(width)))))


def _epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches: a permutation of ``0..n-1`` drawn from ``gen``, cut into ``batch_size`` rows."""
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


class _Stopper:
    """Early stopping on the epoch's mean training loss (relative improvement over the best)."""

    def __init__(self, min_epochs: int, patience: int, rel_tol: float) -> None:
        self.min_epochs, self.patience, self.rel_tol = min_epochs, patience, rel_tol
        self.best = math.inf
        self.bad = 0
        self.epochs = 0

    def update(self, loss: float) -> bool:
        """Record an epoch; True when training should stop."""
        self.epochs += 1
        if not math.isfinite(loss):
            raise ModelError(f"DAS training loss became {loss} at epoch {self.epochs}; lower lr= or check the model")
        if loss < self.best * (1.0 - self.rel_tol) or self.best == math.inf:
            self.best = loss
            self.bad = 0
        else:
            self.bad += 1
        return self.epochs >= self.min_epochs and self.bad >= self.patience


def _fit_epochs(opt_cfg: dict, n: int, seed: int, run_epoch: Callable[[list[torch.Tensor]], float]) -> list[float]:
    """The epoch loop both trainers share: seeded batch order, ``run_epoch`` per epoch, early stopping.

    Parameters
    ----------
    opt_cfg : dict
        ``epochs``, ``min_epochs``, ``patience``, ``rel_tol``, ``batch_size``.
    n : int
        Number of training rows.
    seed : int
        Seed of the batch-order generator.
    run_epoch : callable
        Trains on one epoch's list of index batches (each a LongTensor (b,)) and returns the
        epoch's mean training loss.

    Returns
    -------
    list of float
        The mean training loss of every epoch that ran.
    """
    gen = torch.Generator().manual_seed(seed)
    stop = _Stopper(opt_cfg["min_epochs"], opt_cfg["patience"], opt_cfg["rel_tol"])
    history: list[float] = []
    for _ in range(opt_cfg["epochs"]):
        history.append(run_epoch(_epoch_batches(n, opt_cfg["batch_size"], gen)))
        if stop.update(history[-1]):
            break
    return history


def _readout_loss(readout: Readout, output: Any, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the readout logits (B, C) of a model ``output`` against ``labels`` (B,)."""
    return F.cross_entropy(readout(output, inputs).float(), labels)


class _StepCache:
    """``parametrize.cached()`` opened in pyvene's collator and closed once the forward is done.

    ``train_alignment`` runs collator -> forward -> compute_metrics -> compute_loss -> backward;
    the cached rotation is already part of the autograd graph when the window closes, so the
    backward pass is unaffected, and every optimizer step sees a freshly computed rotation.
    """

    def __init__(self) -> None:
        self._cm = None

    def open(self) -> None:
        self.close()
        self._cm = parametrize.cached()
        self._cm.__enter__()

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


class TrainSite:
    """Per-candidate plumbing: an IntervenableModel with one fresh DAS intervention at a resolved site.

    Parameters
    ----------
    model : torch.nn.Module
    spec : DASSpec
    k : int
        Subspace size.
    seed : int
        Seed of the intervention's initialisation.
    device : torch.device

    Attributes
    ----------
    im : pyvene.IntervenableModel
    key : str
        The intervention's key in ``im``.
    iv : torch.nn.Module
        The intervention.
    params : list of torch.nn.Parameter
        Its trainable parameters.
    """

    def __init__(self, model: torch.nn.Module, spec: DASSpec, k: int, seed: int, device: torch.device) -> None:
        self.im = spec.build_intervenable(k, model, seed=seed, device=device)
        self.key = self.im.sorted_keys[0]
        self.iv = self.im.interventions[self.key]
        self.params = [p for p in self.iv.parameters() if p.requires_grad]

    def forward(self, part: dict, positions: torch.Tensor, src: torch.Tensor) -> Any:
        """Intervened model output for a batch: base kwargs, base positions (B,), source acts (B, d)."""
        pos = positions.tolist()
        locs = [[[int(p)] for p in pos]]
        self.im.use_fast = all(p == pos[0] for p in pos)  # fast scatter only when all rows agree
        _, cf = self.im(part, unit_locations={"sources->base": (locs, locs)},
                        source_representations={self.key: src.unsqueeze(1)})
        return cf

    def forward_rows(self, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, idx: torch.Tensor,
                     device: torch.device) -> tuple[Any, dict]:
        """:meth:`forward` on rows ``idx`` (b,) of a bank.

        Parameters
        ----------
        kw : dict
            The bank's base model kwargs (N rows each).
        bpos : LongTensor (N,)
            Base positions of the site.
        src_acts : Tensor (N, d)
            Cached source activations at the site.
        idx : LongTensor (b,)
        device : torch.device

        Returns
        -------
        (output, part)
            The intervened model output and the base kwargs of the rows (on ``device``).
        """
        part = {k: v[idx].to(device) for k, v in kw.items()}
        return self.forward(part, bpos[idx], src_acts[idx.to(src_acts.device)].to(device)), part


def _loss_on_batch(site: TrainSite, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, labels: torch.Tensor,
                   idx: torch.Tensor, readout: Readout, device: torch.device) -> torch.Tensor:
    """Training loss of ``site`` on rows ``idx`` (b,) with cached source activations ``src_acts`` (N, d)."""
    cf, part = site.forward_rows(kw, bpos, src_acts, idx, device)
    return _readout_loss(readout, cf, part, labels[idx].to(device))


@torch.no_grad()
def predict_cached(site: TrainSite, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, readout: Readout,
                   batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted classes (N,) of the intervened model on a bank, with cached source activations.

    Parameters
    ----------
    site : TrainSite
    kw : dict
        The bank's base model kwargs (N rows each).
    bpos : LongTensor (N,)
        Base positions of the site.
    src_acts : Tensor (N, d)
        Source activations at the site.
    readout : Readout
    batch_size : int
    device : torch.device

    Returns
    -------
    LongTensor (N,), on the CPU
    """
    n = int(bpos.shape[0])
    out = []
    with parametrize.cached():
        for s in range(0, n, batch_size):
            cf, part = site.forward_rows(kw, bpos, src_acts, torch.arange(s, min(n, s + batch_size)), device)
            out.append(readout(cf, part).float().argmax(-1).cpu())
    return torch.cat(out)


def train_loop(site: TrainSite, kw: dict, bpos: torch.Tensor, src_acts: torch.Tensor, labels: torch.Tensor,
               readout: Readout, opt_cfg: dict, seed: int, device: torch.device) -> list[float]:
    """Train ``site`` with this package's loop (cached source activations, ``parametrize.cached()``).

    Parameters
    ----------
    site : TrainSite
    kw : dict
        The fit bank's base model kwargs (N rows each).
    bpos : LongTensor (N,)
        Base positions of the site.
    src_acts : Tensor (N, d)
        Source activations at the site.
    labels : LongTensor (N,)
        Counterfactual labels of the variable.
    readout : Readout
    opt_cfg : dict
        ``lr`` (a number), ``epochs``, ``min_epochs``, ``patience``, ``rel_tol``, ``batch_size``.
    seed : int
        Seed of the batch order.
    device : torch.device

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    opt = torch.optim.Adam(site.params, lr=opt_cfg["lr"])

    def run_epoch(batches: list[torch.Tensor]) -> float:
        tot, cnt = 0.0, 0
        for idx in batches:
            with parametrize.cached():
                loss = _loss_on_batch(site, kw, bpos, src_acts, labels, idx, readout, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        return tot / cnt

    return _fit_epochs(opt_cfg, int(labels.shape[0]), seed, run_epoch)


def pyvene_trainer_problem(model: torch.nn.Module, bank: PairBank) -> str | None:
    """Why ``IntervenableModel.train_alignment`` cannot train on this model/bank (None when it can)."""
    for side, x in (("base", bank.base), ("source", bank.source)):
        if isinstance(x, torch.Tensor):
            if x.dtype.is_floating_point:
                return (f"the bank's {side} inputs are float (passed as inputs_embeds), but train_alignment "
                        "hard-codes input_ids")
            continue
        extra = set(x) - {"input_ids", "attention_mask"}
        if "input_ids" not in x:
            return f"the bank's {side} inputs have no input_ids (keys {sorted(x)}); train_alignment passes only input_ids"
        if extra:
            return f"the bank's {side} inputs have keys {sorted(extra)} that train_alignment cannot pass to the model"
        if "attention_mask" in x and not bool(x["attention_mask"].bool().all()):
            return f"the bank's {side} inputs are padded; train_alignment passes no attention_mask"
        if x["input_ids"].dtype.is_floating_point:
            return f"the bank's {side} input_ids are float"
    try:
        ids = as_model_kwargs(bank.base)["input_ids"][:1].to(model_device(model))
        with torch.no_grad():
            out = model(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - any failure means the contract does not fit
        return f"the model cannot be called as model(input_ids=...): {type(exc).__name__}: {exc}"
    if getattr(out, "logits", None) is None:
        return (f"the model output ({type(out).__name__}) has no .logits, which train_alignment reads "
                "(use a *LMHeadModel / *ForCausalLM class)")
    return None


def train_pyvene(site: TrainSite, bank: PairBank, bpos: torch.Tensor, spos: torch.Tensor, labels: torch.Tensor,
                 readout: Readout, opt_cfg: dict, seed: int, device: torch.device, progress: bool) -> list[float]:
    """Train ``site`` with ``IntervenableModel.train_alignment``, one call per epoch.

    Parameters
    ----------
    site : TrainSite
    bank : PairBank
        The fit bank (plain ``input_ids``; see :func:`pyvene_trainer_problem`).
    bpos, spos : LongTensor (N,)
        Base and source positions of the site.
    labels : LongTensor (N,)
        Counterfactual labels of the variable.
    readout : Readout
    opt_cfg : dict
        As for :func:`train_loop`.
    seed : int
        Seed of the batch order.
    device : torch.device
    progress : bool
        Let pyvene's own progress bars through (stderr).

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    ids_b = as_model_kwargs(bank.base)["input_ids"]
    ids_s = as_model_kwargs(bank.source)["input_ids"]
    opt = torch.optim.Adam(site.params, lr=opt_cfg["lr"])
    # constant learning rate: without it train_alignment builds a fresh warm-up/decay schedule per call
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    cache = _StepCache()
    state: dict[str, Any] = {}
    losses: list[tuple[float, int]] = []

    def collator(idx: torch.Tensor) -> dict:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch = {
            "input_ids": ids_b[idx].to(device),
            "source_input_ids": ids_s[idx].to(device),
            "labels": labels[idx].to(device),
            "source_0->base.0.pos": [[int(p)] for p in spos[idx].tolist()],  # source side
            "source_0->base.1.pos": [[int(p)] for p in bpos[idx].tolist()],  # base side
        }
        state["inputs"] = {"input_ids": batch["input_ids"]}
        cache.open()
        return batch

    def compute_metrics(logits_list: list, labels_list: list) -> float:
        cache.close()
        with torch.no_grad():
            pred = readout(logits_list[0], state["inputs"]).argmax(-1)
            return float((pred == labels_list[0]).float().mean())

    def compute_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cache.close()
        loss = _readout_loss(readout, logits, state["inputs"], y)
        losses.append((float(loss.detach()), int(y.shape[0])))
        return loss

    def run_epoch(batches: list[torch.Tensor]) -> float:
        losses.clear()
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        sink = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with sink:
            site.im.train_alignment(loader, compute_loss, compute_metrics, collator, epochs=1,
                                    lr=opt_cfg["lr"], optimizer=opt, scheduler=sched)
        return sum(l * b for l, b in losses) / max(1, sum(b for _, b in losses))

    site.im.use_fast = False
    try:
        return _fit_epochs(opt_cfg, int(labels.shape[0]), seed, run_epoch)
    finally:
        cache.close()
