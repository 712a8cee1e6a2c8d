"""Shared pieces of the `peft-jax train` resume tests: the tiny run's flags, its adapter, and
checks that two adapters are bitwise equal."""

from __future__ import annotations

import os

import numpy as np
from train import tiny

from peft_jax.io import saving

# Dropout on, so the restored RNG key matters as much as the params, optimizer state and data.
RUN = ["--max-length", "16", "--bucket", "8", "--batch-size", "8", "--eval-batch-size", "24",
       "--log-every", "1", "--eval-every", "0", "--rank", "2", "--alpha", "4",
       "--lora-dropout", "0.1", "--model-dropout", "--lr", "3e-3", "--seed", "5"]


def write_paths(tmp_path_factory):
    """A tiny model and dataset on disk: ``(model_dir, data_dir)``."""
    root = tmp_path_factory.mktemp("resume")
    return tiny.write_model(root / "model"), tiny.write_data(root / "data")


def argv(paths, out, steps, *extra):
    model, data = paths
    return ["train", "--model", str(model), "--data", str(data), "--steps", str(steps),
            "--out", str(out), *RUN, *extra]


def adapter(out):
    _, params = saving.read_native(out / "adapter")
    return params


def assert_bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def checkpoint_steps(out):
    directory = out / "checkpoints"
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if directory.is_dir() else []
