"""`peft-jax train` checkpoints: --resume after a stop ends bitwise where a run that never
stopped ends; a foreign or missing checkpoint is refused with nothing changed. (The SIGKILL loop
and the mesh runs are in test_cli_resume_sigkill.py / test_cli_resume_mesh.py, so the parallel
runner spreads them over workers.)"""

from __future__ import annotations

import json

import pytest
from train import resume_runs as rr
from train.stopping import stop_after

from peft_jax import cli
from peft_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return rr.write_paths(tmp_path_factory)


def test_stop_then_resume_is_bitwise_exact(tmp_path, paths, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert cli.main(rr.argv(paths, straight, 8, "--save-every", "2")) == 0
    stopped = tmp_path / "stopped"
    stop_after(monkeypatch, rr.argv(paths, stopped, 8, "--save-every", "2", "--keep", "5"),
                "step 6/8")  # the run dies right after step 6 is logged
    assert rr.checkpoint_steps(stopped) == [2, 4]  # step 6 was logged, not yet saved
    assert max(r["step"] for r in read_metrics(stopped / "metrics.jsonl")) == 6

    assert cli.main(rr.argv(paths, stopped, 8, "--save-every", "2", "--keep", "5", "--resume")) == 0
    assert "resuming from the checkpoint of step 4" in capsys.readouterr().out
    rr.assert_bitwise_equal(rr.adapter(straight), rr.adapter(stopped))
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
    assert rr.checkpoint_steps(stopped) == [2, 4, 6, 8]


def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, paths, capsys):
    out = tmp_path / "run"
    assert cli.main(rr.argv(paths, out, 4)) == 0
    before = rr.snapshot(out)
    assert cli.main(rr.argv(paths, out, 4, "--rank", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "ResumeError" in err and "rank: saved 2, now 3" in err
    assert rr.snapshot(out) == before
    # Operational settings may change on resume: logging, evaluation, checkpoint period.
    assert cli.main(rr.argv(paths, out, 4, "--log-every", "3", "--save-every", "7", "--resume")) == 0


def test_resume_and_overwrite_conflict(tmp_path, paths, capsys):
    out = tmp_path / "run"
    assert cli.main(rr.argv(paths, out, 2, "--resume", "--overwrite")) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_starts_afresh(tmp_path, paths):
    out = tmp_path / "run"
    assert cli.main(rr.argv(paths, out, 4, "--save-every", "1", "--keep", "9")) == 0
    assert cli.main(rr.argv(paths, out, 2, "--rank", "3", "--overwrite")) == 0
    assert rr.checkpoint_steps(out) == [2]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]
