"""Exceptions raised by :mod:`pyvene_plot`.

Every error names the problem and what to do instead. All derive from :class:`PlotError`, which is a
:class:`ValueError`, so ``except ValueError`` keeps working for callers that do not know this package.
"""

from __future__ import annotations

__all__ = ["PlotError", "BankError", "SiteError", "ModelError", "TransportError", "SignatureError"]


class PlotError(ValueError):
    """Base class of every error raised by pyvene_plot."""


class BankError(PlotError):
    """A pair bank is malformed: sizes, labels, variables or emptiness."""


class SiteError(PlotError):
    """A site does not exist in the model (layer, component, position or dims out of range)."""


class ModelError(PlotError):
    """The model cannot be hooked by pyvene, or produced unusable outputs (NaN/inf logits)."""


class TransportError(PlotError):
    """An optimal-transport problem is ill-posed or its plan is degenerate."""


class SignatureError(PlotError):
    """Signatures cannot be built (unknown mode, no effect anywhere, ...)."""
