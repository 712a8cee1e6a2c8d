"""Checkpoints: exact resume (also across SIGKILL), no loss when a write is killed, wrong-run guard."""

from __future__ import annotations

import glob
import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.train.checkpoint import Checkpointer

sys.path.insert(0, os.path.dirname(__file__))
import resume_worker  # noqa: E402
from killing import kill_after_progress  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_resume_after_n_steps_is_bitwise_exact(tmp_path):
    straight = resume_worker.train(str(tmp_path / "a"), total=6)
    assert resume_worker.train(str(tmp_path / "b"), total=6, kill_after=3) is None
    resumed = resume_worker.train(str(tmp_path / "b"), total=6)
    assert np.array_equal(_flat(straight), _flat(resumed))


def test_checkpoint_holds_only_what_trains(tmp_path):
    step, trainable, frozen = resume_worker.build()
    ckpt = Checkpointer(str(tmp_path), fingerprint={}, keep=1)
    ckpt.save(1, {"trainable": trainable})
    written = sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(f))
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen) if hasattr(x, "nbytes"))
    assert written < frozen_bytes


def test_resume_from_a_different_run_is_refused(tmp_path):
    Checkpointer(str(tmp_path), fingerprint={"model": "a", "rank": 8}).save(1, {"x": np.ones(2)})
    before = sorted(os.listdir(tmp_path))
    other = Checkpointer(str(tmp_path), fingerprint={"model": "a", "rank": 4})
    with pytest.raises(errors.ResumeError, match="rank: saved 8, now 4"):
        other.restore({"x": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == before


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    total = 40
    reference = tmp_path / "reference.npy"
    subprocess.run([sys.executable, WORKER, "train", str(tmp_path / "ref"), str(total), str(reference)],
                   check=True, timeout=600)
    rng = random.Random(0)
    out = tmp_path / "killed.npy"
    run_dir = tmp_path / "run"

    def latest_step():
        return max((int(p) for p in os.listdir(run_dir) if p.isdigit()), default=0) if run_dir.exists() else 0

    kills = 0
    for _ in range(3):
        command = [sys.executable, WORKER, "train", str(run_dir), str(total), str(out)]
        if not kill_after_progress(command, latest_step, rng, max_pause=0.5):
            break
        kills += 1
    subprocess.run([sys.executable, WORKER, "train", str(run_dir), str(total), str(out)],
                   check=True, timeout=600)
    assert kills >= 1
    assert np.array_equal(np.load(reference), np.load(out))


def test_sigkill_during_a_write_keeps_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, WORKER, "bigsave", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    killed_in_write = False
    while time.time() < deadline:
        unfinished = [p for p in os.listdir(tmp_path) if "tmp" in p]
        finished = [p for p in os.listdir(tmp_path) if p.isdigit()]
        if unfinished and finished:
            proc.kill()
            killed_in_write = True
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert killed_in_write, "never caught a write in progress"
    ckpt = Checkpointer(str(tmp_path), fingerprint={"big": True})
    step, state, _ = ckpt.restore({"w": np.zeros((64, 1024, 256), np.float32)})
    assert step >= 1 and np.all(np.asarray(state["w"]) == step)
