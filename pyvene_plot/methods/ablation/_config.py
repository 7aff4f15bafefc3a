"""Settings of Optimal Ablation: the losses, the reported ablation kinds, :class:`OptimalAblationConfig`."""

from __future__ import annotations

import dataclasses

from ...errors import PlotError

#: losses ``L``: ``"kl"`` KL(clean ‖ ablated) of the read-out distributions; ``"ce"`` task
#: cross-entropy against the bank's ``base_labels`` (minus the clean model's); ``"mse"`` squared
#: error between ablated and clean read-out logits (summed over classes)
ABLATION_LOSSES = ("kl", "ce", "mse")
#: ablation types reported next to OA
ABLATION_KINDS = ("zero", "mean", "resample")


@dataclasses.dataclass
class OptimalAblationConfig:
    """Settings of :func:`optimal_ablation`.

    Parameters
    ----------
    loss : {"kl", "ce", "mse"}
        ``"kl"``: KL(clean ‖ ablated) of the read-out distributions (the reference's choice);
        ``"ce"``: cross-entropy against the bank's ``base_labels`` minus the clean model's;
        ``"mse"``: squared error between ablated and clean read-out logits.
    steps : int
        AdamW steps per site (all sites of a chunk train together).
    lr : float or "auto"
        ``"auto"`` (default): whitened steps. The constant is parametrised as ``a = a0 + s ⊙ z``
        with ``s`` the per-coordinate standard deviation of the site on the training data (floored
        at 10 % of its RMS), and ``z`` is trained with learning rate ``lr_scale``: every coordinate
        moves in units of its own spread, so one setting fits sites of any scale. Adam moves ``z``
        by at most about ``lr_scale`` per step; with the cosine decay to 0 the reach is about
        ``steps * lr_scale / 2`` standard deviations (10 by default). A float: plain AdamW on ``a``
        with that learning rate (the reference implementation uses 2e-3 with 10,000 steps on
        GPT-2). The defaults converge on small models in seconds; the tests check the closed forms
        to 1e-3.
    lr_scale : float
        Learning rate of the whitened coordinates (``lr="auto"``).
    batch_size : int
        Training examples per step (shared by all sites; each site sees them in its own copy).
        With ``n_train <= batch_size`` training is full-batch (deterministic).
    holdout : float
        Fraction of the bank's examples held out for evaluating the gaps (0 = evaluate on the
        training examples). Ignored when ``eval_bank`` is given.
    init : {"mean", "zero"}
        Initial constant (the reference initialises at the mean).
    restarts : int
        Extra starting points per site, each the site's activation on a random training example
        (on-distribution), trained in parallel with the first; the constant with the lowest
        training loss is kept. Gradient descent from the mean can stall on flat regions (e.g. a
        downstream ReLU that the mean switches off), which overestimates Δ_opt.
    baselines : tuple of str
        Classical ablations reported next to OA, among ``("zero", "mean", "resample")``.
    resample_draws : int
        Resampled sources per evaluation example (drawn from the training examples; never the
        example itself).
    max_rows : int
        Rows per forward pass (bounds memory): the number of sites trained in parallel is
        ``max(1, max_rows // batch_size)``.
    seed : int
        Seeds the split, the mini-batches and the resampling (local generators).
    """

    loss: str = "kl"
    steps: int = 200
    lr: float | str = "auto"
    lr_scale: float = 0.1
    batch_size: int = 64
    holdout: float = 0.5
    init: str = "mean"
    restarts: int = 1
    baselines: tuple[str, ...] = ABLATION_KINDS
    resample_draws: int = 2
    max_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ABLATION_LOSSES:
            raise PlotError(f"unknown ablation loss {self.loss!r}; choose one of {ABLATION_LOSSES}")
        if int(self.steps) < 0:
            raise PlotError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr == "auto" or (isinstance(self.lr, (int, float)) and self.lr > 0)):
            raise PlotError(f"lr must be a positive float or 'auto', got {self.lr!r}")
        if not self.lr_scale > 0:
            raise PlotError(f"lr_scale must be positive, got {self.lr_scale}")
        if int(self.batch_size) < 1:
            raise PlotError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise PlotError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.init not in ("mean", "zero"):
            raise PlotError(f"init must be 'mean' or 'zero', got {self.init!r}")
        if int(self.restarts) < 0:
            raise PlotError(f"restarts must be >= 0, got {self.restarts}")
        self.baselines = tuple(self.baselines)
        bad = [b for b in self.baselines if b not in ABLATION_KINDS]
        if bad:
            raise PlotError(f"unknown baseline ablation(s) {bad}; choose among {ABLATION_KINDS}")
        if int(self.resample_draws) < 1:
            raise PlotError(f"resample_draws must be >= 1, got {self.resample_draws}")
        if int(self.max_rows) < 1:
            raise PlotError(f"max_rows must be >= 1, got {self.max_rows}")

    def to_dict(self) -> dict:
        """The settings as a plain dict (field name -> value)."""
        return dataclasses.asdict(self)
