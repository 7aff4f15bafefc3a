"""Shared checks for result round trips (imported by the localize and progressive tests).

``assert_same_result`` compares every field of two :class:`AlignmentResult` objects, both as typed
objects (sites, arrays with their dtype, handles) and in serialised form; ``assert_broken_files_refused``
writes empty, truncated and incomplete copies of a result file and checks that ``from_json`` refuses
each with a :class:`PlotError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pyvene_plot as pp
from pyvene_plot._utils import to_serializable

#: fields that legitimately differ between a write and a later re-write
VOLATILE = ("versions", "writer")


def canonical(d):
    """``d`` as it reads back from JSON (a dict without the writer's version stamps)."""
    out = json.loads(json.dumps(to_serializable(d)))
    if isinstance(out, dict):
        for k in VOLATILE:
            out.pop(k, None)
    return out


def assert_same_handle(a: pp.Handle, b: pp.Handle) -> None:
    assert (a.variable, a.sites, a.weights, a.strength, a.readout) == (b.variable, b.sites, b.weights, b.strength,
                                                                      b.readout)
    assert all(isinstance(s, pp.Site) for s in b.sites)
    assert set(a.bases) == set(b.bases)
    for k in a.bases:
        assert np.array_equal(np.asarray(a.bases[k], dtype=np.float32), b.bases[k])
    assert canonical(a.meta) == canonical(b.meta)


def assert_same_result(a: pp.AlignmentResult, b: pp.AlignmentResult) -> None:
    """Every field of ``a`` and ``b`` agrees (``b`` typically read back from ``a``'s JSON)."""
    assert b.variables == a.variables
    assert b.sites == a.sites and all(isinstance(s, pp.Site) for s in b.sites)
    for name in ("coupling", "cost"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == np.float64 and y.shape == x.shape and np.array_equal(x, y), name
    for group in ("handles", "baseline"):
        ha, hb = getattr(a, group), getattr(b, group)
        assert list(ha) == list(hb), group
        for v in ha:
            assert_same_handle(ha[v], hb[v])
    assert (b.runtime_s, b.method, b.epsilon, b.beta, b.signature) == (a.runtime_s, a.method, a.epsilon, a.beta,
                                                                      a.signature)
    for name in ("trials", "calibration", "diagnostics", "config"):
        assert canonical(getattr(b, name)) == canonical(getattr(a, name)), name
    assert set(b.bases) == set(a.bases)
    for k in a.bases:
        assert np.array_equal(np.asarray(a.bases[k], dtype=np.float32), b.bases[k])
    # and nothing else: the serialised forms agree key for key
    assert canonical(b.to_dict()) == canonical(a.to_dict())


def assert_broken_files_refused(path: Path, cls: type, drop: str, tmp_path: Path) -> None:
    """Empty, truncated and incomplete (``drop`` removed) copies of ``path`` raise PlotError naming the file."""
    text = path.read_text(encoding="utf-8")
    payload = json.loads(text)
    assert drop in payload
    broken = {
        "empty": ("", "empty"),
        "blank": ("  \n", "empty"),
        "half": (text[: len(text) // 2], "truncated"),
        "last_byte_missing": (text[:-2], "truncated"),
        "incomplete": (json.dumps({k: v for k, v in payload.items() if k != drop}), drop),
        "not_an_object": ("[1, 2]", "not an object"),
    }
    for name, (content, expected) in broken.items():
        p = tmp_path / f"{name}.json"
        p.write_text(content, encoding="utf-8")
        with pytest.raises(pp.PlotError) as info:
            cls.from_json(p)
        msg = str(info.value)
        assert str(p) in msg, f"{name}: the error does not name the file: {msg}"
        assert expected in msg, f"{name}: the error does not say {expected!r}: {msg}"
