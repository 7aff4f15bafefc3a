"""scikit-learn's parameter convention for the package's estimators, written once.

An estimator stores each ``__init__`` argument unchanged under its own name; :class:`ParamsMixin`
then derives ``get_params`` from the signature and gives a ``set_params`` that refuses unknown names
(listing the valid ones) and re-validates through the estimator's ``_validate`` method, if it has one.
"""

from __future__ import annotations

import inspect
from typing import Any

from .errors import PlotError


class ParamsMixin:
    """``get_params`` / ``set_params`` derived from the ``__init__`` signature.

    ``est.set_params(**est.get_params())`` leaves ``est.get_params()`` unchanged, value for value
    (the same objects).
    """

    #: error class raised by :meth:`set_params` for an unknown name (a subclass may narrow it)
    params_error: type[PlotError] = PlotError

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        """Constructor parameters, in signature order (``*args`` / ``**kwargs`` left out)."""
        sig = inspect.signature(cls.__init__)
        return tuple(p.name for p in sig.parameters.values()
                     if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters as given (objects themselves, tuples as tuples).

        ``deep`` is accepted for scikit-learn compatibility; nested estimators are returned as the
        objects themselves, not expanded into ``name__param`` keys.
        """
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any):
        """Set constructor parameters (validated together); returns ``self``.

        Raises
        ------
        PlotError
            On a name that is not a constructor parameter (the message lists the valid ones), or
            on an invalid value.
        """
        valid = self._param_names()
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise self.params_error(f"unknown parameter(s) {unknown} for {type(self).__name__}; "
                            f"valid parameters: {list(valid)}")
        for k, v in params.items():
            setattr(self, k, v)
        validate = getattr(self, "_validate", None)
        if validate is not None:
            validate()
        return self
