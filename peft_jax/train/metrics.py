"""Training metrics: a JSON-lines log, reading it back, and a loss / accuracy plot (PNG).

Each line of ``metrics.jsonl`` is one record: ``{"step": 10, "loss": 0.61, "tokens_per_s": 1830.2,
...}`` for training intervals and ``{"step": 125, "eval_loss": 0.41, "eval_accuracy": 0.84}`` for
evaluations. The plot needs matplotlib and uses its non-interactive Agg canvas (no display, no
global backend switch).

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> with MetricsLog(path) as log:
    ...     log.write({"step": 1, "loss": 0.5})
    >>> read_metrics(path)
    [{'step': 1, 'loss': 0.5}]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peft_jax import errors

__all__ = ["MetricsLog", "plot_metrics", "read_metrics", "to_python"]


def to_python(value: Any) -> Any:
    """Turns numpy / JAX scalars into plain Python numbers (non-finite floats stay floats).

    Example:
        >>> to_python(np.float32(0.5)), to_python(np.int32(3))
        (0.5, 3)
    """
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype") and value.shape == ():
        value = np.asarray(value).item()
    return value


class MetricsLog:
    """Appends records to a JSON-lines file, one flushed line per record.

    Args:
        path: the ``.jsonl`` file; created (with its directory) on the first write. An existing
            file is truncated when the log opens unless ``append`` is set.
        append: keep existing lines.

    Example:
        >>> import pathlib, tempfile
        >>> log = MetricsLog(pathlib.Path(tempfile.mkdtemp()) / "m.jsonl")
        >>> log.write({"step": 2, "eval_accuracy": 0.75}); log.close()
        >>> log.records
        [{'step': 2, 'eval_accuracy': 0.75}]
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self._mode = "a" if append else "w"
        self._file = None

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes one record (non-finite floats are written as JSON ``NaN``/``Infinity``)."""
        record = to_python(dict(record))
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, self._mode, encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records.append(record)

    def close(self) -> None:
        """Closes the file (further writes reopen it in append mode)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._mode = "a"

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` file back into a list of records.

    Raises:
        CheckpointError: the file is missing or a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise errors.CheckpointError(f"no metrics file at {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise errors.CheckpointError(f"{path}:{n} is not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise errors.CheckpointError(f"{path}:{n} is not a JSON object")
        records.append(record)
    return records


def _series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in r:
            xs.append(r["step"])
            ys.append(value)
    return xs, ys


def plot_metrics(records: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                 title: str = "", baselines: Mapping[str, float] | None = None,
                 metric: str = "accuracy") -> Path:
    """Plots training loss (and eval loss) and an eval metric against the step, to a PNG.

    Args:
        records: metric records (as `MetricsLog` writes them).
        path: the ``.png`` to write.
        title: a figure title.
        baselines: ``{label: value}`` drawn as dashed horizontal lines on the metric's panel.
        metric: the second panel's metric: ``eval_<metric>`` (and the training ``<metric>``
            where recorded), e.g. ``"accuracy"`` or ``"perplexity"``.

    Returns:
        ``path``.

    Raises:
        MissingPackageError: matplotlib is not installed.

    Example:
        >>> import pathlib, tempfile
        >>> png = plot_metrics([{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5,
        ...                     "eval_accuracy": 0.8}], pathlib.Path(tempfile.mkdtemp()) / "m.png")
        >>> png.read_bytes()[:4]
        b'\\x89PNG'
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as e:
        raise errors.MissingPackageError(
            "plotting metrics needs matplotlib: pip install matplotlib") from e
    records = list(records)
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        xs, ys = _series(records, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o" if key == "eval_loss" else None, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    xs, ys = _series(records, f"eval_{metric}")
    if xs:
        ax_acc.plot(xs, ys, marker="o", label=f"eval {metric}")
    xs, ys = _series(records, metric)
    if xs:
        ax_acc.plot(xs, ys, alpha=0.6, label=f"train {metric}")
    for (label, value), style in zip((baselines or {}).items(), ("--", ":", "-.", "--")):
        ax_acc.axhline(value, linestyle=style, color="gray", label=f"{label} {value:.3f}")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel(metric)
    ax_acc.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
