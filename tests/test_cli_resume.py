"""`peft-jax train` checkpoints: --resume after a stop or a SIGKILL ends bitwise where a run that
never stopped ends; a foreign or missing checkpoint is refused with nothing changed; a device mesh
trains the same adapter as one device."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from train import tiny
from train.killing import kill_after_progress

from peft_jax import cli
from peft_jax.io import saving
from peft_jax.train.metrics import read_metrics

# Dropout on, so the restored RNG key matters as much as the params, optimizer state and data.
RUN = ["--max-length", "16", "--bucket", "8", "--batch-size", "8", "--eval-batch-size", "24",
       "--log-every", "1", "--eval-every", "0", "--rank", "2", "--alpha", "4",
       "--lora-dropout", "0.1", "--model-dropout", "--lr", "3e-3", "--seed", "5"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return tiny.write_model(root / "model"), tiny.write_data(root / "data")


def _argv(paths, out, steps, *extra):
    model, data = paths
    return ["train", "--model", str(model), "--data", str(data), "--steps", str(steps),
            "--out", str(out), *RUN, *extra]


def _adapter(out):
    _, params = saving.read_native(out / "adapter")
    return params


def _assert_bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def _snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _checkpoint_steps(out):
    directory = out / "checkpoints"
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if directory.is_dir() else []


class _StopAfter(Exception):
    pass


def _stop_after(monkeypatch, argv, line_start):
    """Runs ``peft-jax`` until it prints a line starting with ``line_start``, then dies there."""
    real_print = print

    def stopping_print(*args, **kwargs):
        real_print(*args, **kwargs)
        if args and str(args[0]).startswith(line_start):
            raise _StopAfter

    monkeypatch.setattr("builtins.print", stopping_print)
    with pytest.raises(_StopAfter):
        cli.main(argv)
    monkeypatch.undo()


def test_stop_then_resume_is_bitwise_exact(tmp_path, paths, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert cli.main(_argv(paths, straight, 8, "--save-every", "2")) == 0
    stopped = tmp_path / "stopped"
    _stop_after(monkeypatch, _argv(paths, stopped, 8, "--save-every", "2", "--keep", "5"),
                "step 6/8")  # the run dies right after step 6 is logged
    assert _checkpoint_steps(stopped) == [2, 4]  # step 6 was logged, not yet saved
    assert max(r["step"] for r in read_metrics(stopped / "metrics.jsonl")) == 6

    assert cli.main(_argv(paths, stopped, 8, "--save-every", "2", "--keep", "5", "--resume")) == 0
    assert "resuming from the checkpoint of step 4" in capsys.readouterr().out
    _assert_bitwise_equal(_adapter(straight), _adapter(stopped))
    # The killed tail (step 5-6 records) is replaced by the resumed run's: each step once.
    steps = [r["step"] for r in read_metrics(stopped / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))
    losses = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r}
    assert [losses[s] for s in steps] == [r["loss"] for r in read_metrics(stopped / "metrics.jsonl")
                                          if "loss" in r]
    results = json.loads((stopped / "results.json").read_text())
    assert results["resumed_from_step"] == 4 and results["steps"] == 8
    assert results["test_accuracy"] == json.loads((straight / "results.json").read_text())[
        "test_accuracy"]
    assert _checkpoint_steps(stopped) == [2, 4, 6, 8]


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path, paths):
    steps = 30
    command = [sys.executable, "-m", "peft_jax.cli"]
    straight = tmp_path / "straight"
    subprocess.run(command + _argv(paths, straight, steps), check=True, timeout=600,
                   capture_output=True)
    out = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    for attempt in range(3):
        argv = _argv(paths, out, steps, "--save-every", "1", *(["--resume"] if attempt else []))
        if not kill_after_progress(command + argv, lambda: max(_checkpoint_steps(out), default=0),
                                   rng, max_pause=0.3):
            break
        kills += 1
    subprocess.run(command + _argv(paths, out, steps, "--save-every", "1", "--resume"),
                   check=True, timeout=600, capture_output=True)
    assert kills >= 1
    _assert_bitwise_equal(_adapter(straight), _adapter(out))


def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, paths, capsys):
    out = tmp_path / "run"
    assert cli.main(_argv(paths, out, 4)) == 0
    before = _snapshot(out)
    assert cli.main(_argv(paths, out, 4, "--rank", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "ResumeError" in err and "rank: saved 2, now 3" in err
    assert _snapshot(out) == before
    # Operational settings may change on resume: logging, evaluation, checkpoint period.
    assert cli.main(_argv(paths, out, 4, "--log-every", "3", "--save-every", "7", "--resume")) == 0


def test_resume_and_overwrite_conflict(tmp_path, paths, capsys):
    out = tmp_path / "run"
    assert cli.main(_argv(paths, out, 2, "--resume", "--overwrite")) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_starts_afresh(tmp_path, paths):
    out = tmp_path / "run"
    assert cli.main(_argv(paths, out, 4, "--save-every", "1", "--keep", "9")) == 0
    assert cli.main(_argv(paths, out, 2, "--rank", "3", "--overwrite")) == 0
    assert _checkpoint_steps(out) == [2]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_mesh_trains_the_same_adapter(tmp_path, paths):
    one = tmp_path / "one"
    assert cli.main(_argv(paths, one, 4)) == 0
    mesh = tmp_path / "mesh"
    assert cli.main(_argv(paths, mesh, 4, "--mesh", "data=2,fsdp=2,tensor=2")) == 0
    results = json.loads((mesh / "results.json").read_text())
    assert results["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    a, b = _adapter(one), _adapter(mesh)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)


def test_resume_on_a_mesh_is_bitwise_exact(tmp_path, paths, monkeypatch):
    mesh = ("--mesh", "data=2,fsdp=2,tensor=2", "--save-every", "2")
    straight = tmp_path / "straight"
    assert cli.main(_argv(paths, straight, 6, *mesh)) == 0
    stopped = tmp_path / "stopped"
    _stop_after(monkeypatch, _argv(paths, stopped, 6, *mesh), "step 3/6")
    assert cli.main(_argv(paths, stopped, 6, *mesh, "--resume")) == 0
    _assert_bitwise_equal(_adapter(straight), _adapter(stopped))
