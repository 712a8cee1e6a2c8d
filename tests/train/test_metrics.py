"""Metrics log round trip, plotting, and malformed files."""

import math

import numpy as np
import pytest

from peft_jax import errors
from peft_jax.train.metrics import MetricsLog, plot_metrics, read_metrics, to_python


def test_log_round_trip_and_append(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": np.int32(1), "loss": np.float32(0.25)})
    with MetricsLog(path, append=True) as log:
        log.write({"step": 2, "loss": float("nan")})
    records = read_metrics(path)
    assert records[0] == {"step": 1, "loss": 0.25} and type(records[0]["step"]) is int
    assert math.isnan(records[1]["loss"])
    with MetricsLog(path) as log:  # a fresh log truncates
        log.write({"step": 3})
    assert read_metrics(path) == [{"step": 3}]


def test_read_errors(tmp_path):
    with pytest.raises(errors.CheckpointError, match="no metrics file"):
        read_metrics(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(errors.CheckpointError, match="bad.jsonl:2"):
        read_metrics(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(errors.CheckpointError, match="not a JSON object"):
        read_metrics(bad)


def test_plot_writes_png(tmp_path):
    records = [{"step": i, "loss": 1.0 / i, "accuracy": 0.5} for i in range(1, 6)]
    records.append({"step": 5, "eval_loss": 0.3, "eval_accuracy": 0.8})
    png = plot_metrics(records, tmp_path / "plots" / "m.png", title="t",
                       baselines={"probe": 0.7})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_metrics([], tmp_path / "empty.png")  # nothing to draw is still a valid figure
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_to_python_nested():
    assert to_python({"a": [np.float32(1.5)], "b": np.int64(2)}) == {"a": [1.5], "b": 2}
