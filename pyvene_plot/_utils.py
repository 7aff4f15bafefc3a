"""Small shared helpers: seeding, devices, JSON serialisation, atomic writes, versions."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PlotError

logger = logging.getLogger(__name__)



def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA).

    Parameters
    ----------
    seed : int
        The seed.
    deterministic : bool, default False
        Also ask torch for deterministic kernels (slower on GPU).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/``None`` into ``cuda`` when available, else ``cpu``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_serializable(obj: Any) -> Any:
    """Convert tensors, arrays, dataclasses, paths, tuples and NumPy scalars to JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_serializable(obj.to_dict())
        return {f.name: to_serializable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_serializable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_serializable(v) for v in obj]
    return obj


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_png(path: str | os.PathLike, fig: Any, dpi: int = 110, close: bool = True) -> Path:
    """Render a matplotlib figure to PNG and write it atomically (the one PNG writer of the package).

    Parameters
    ----------
    path : path-like
    fig : matplotlib.figure.Figure
    dpi : int, default 110
    close : bool, default True
        Close the figure afterwards (figures made by the package); pass False for a caller's figure.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Serialise ``payload`` with :func:`to_serializable` and write it atomically as JSON."""
    text = json.dumps(to_serializable(payload), indent=2, sort_keys=False)
    return atomic_write_bytes(path, text.encode("utf-8"))


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine numerical results."""
    from importlib import metadata

    out = {}
    for name in ("pyvene-plot", "pyvene", "pot", "torch", "transformers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - editable edge cases
            out[name] = "unknown"
    return out


# ------------------------------------------------------------------ reading result files
def writer_tag() -> str:
    """``"pyvene_plot <version>"``: the ``writer`` field of the result files this package writes."""
    return f"pyvene_plot {package_versions()['pyvene-plot']}"


def read_json_object(path: str | Path, what: str) -> dict:
    """Parse a JSON object written by a ``to_json`` method.

    Parameters
    ----------
    path : str or Path
    what : str
        The class the file should hold, for messages (e.g. ``"AlignmentResult"``).

    Raises
    ------
    PlotError
        When the file cannot be read, is empty, truncated or not JSON, or holds no JSON object;
        the message names the file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlotError(f"cannot read {what} file {str(path)!r}: {exc}") from None
    if not text.strip():
        raise PlotError(f"{what} file {str(path)!r} is empty; write it with {what}.to_json(path)")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlotError(f"{what} file {str(path)!r} is truncated or not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise PlotError(f"{what} file {str(path)!r} holds a JSON {type(payload).__name__}, not an object")
    return payload


def load_json_as(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """``cls.from_dict(<the JSON object in path>, **kwargs)``, every :class:`PlotError` prefixed with the file.

    The shared body of the ``from_json`` classmethods: an empty, truncated or incomplete file raises
    a :class:`PlotError` that names the file and what is missing.
    """
    d = read_json_object(path, cls.__name__)
    try:
        return cls.from_dict(d, **kwargs)
    except PlotError as exc:
        raise PlotError(f"{str(path)!r}: {exc}") from None


def require_keys(d: Mapping, keys: Sequence[str], what: str) -> None:
    """Raise :class:`PlotError` naming the keys of ``keys`` that ``d`` lacks (``what``: where, for the message)."""
    if not isinstance(d, Mapping):
        raise PlotError(f"{what} is incomplete: expected an object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise PlotError(f"{what} is incomplete: missing {missing}")


def check_payload(d: Mapping, kind: str, required: Sequence[str], source: str, format_version: int) -> None:
    """Raise :class:`~pyvene_plot.PlotError` unless ``d`` is a complete ``kind`` payload this version reads.

    Parameters
    ----------
    d : Mapping
        The payload (``to_dict()`` output, e.g. read back from JSON).
    kind : str
        The expected ``"kind"`` field (a payload without one is accepted).
    required : sequence of str
        Fields that must be present.
    source : str
        Names the payload in messages (e.g. ``"file 'res.json'"``).
    format_version : int
        The newest ``format_version`` the caller reads; a payload without the key is version 1.
    """
    require_keys(d, (), source)  # an object at all
    if d.get("kind", kind) != kind:
        raise PlotError(f"{source} is not an {kind} payload (kind={d.get('kind')!r})")
    version = d.get("format_version", 1)
    if not isinstance(version, int) or version > format_version:
        raise PlotError(
            f"{source} has format_version {version!r}; this pyvene_plot reads {kind} up to version "
            f"{format_version} (upgrade pyvene_plot)"
        )
    require_keys(d, tuple(required), source)
