"""`peft-jax train --resume` after SIGKILLs at random moments ends with the adapter bitwise equal
to a run that was never killed."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from train import resume_runs as rr
from train.killing import kill_after_progress


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return rr.write_paths(tmp_path_factory)


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path, paths):
    steps = 30
    command = [sys.executable, "-m", "peft_jax.cli"]
    straight = tmp_path / "straight"
    subprocess.run(command + rr.argv(paths, straight, steps), check=True, timeout=600,
                   capture_output=True)
    out = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    for attempt in range(3):
        argv = rr.argv(paths, out, steps, "--save-every", "1", *(["--resume"] if attempt else []))
        if not kill_after_progress(command + argv, lambda: max(rr.checkpoint_steps(out), default=0),
                                   rng, max_pause=0.3):
            break
        kills += 1
    subprocess.run(command + rr.argv(paths, out, steps, "--save-every", "1", "--resume"),
                   check=True, timeout=600, capture_output=True)
    assert kills >= 1
    rr.assert_bitwise_equal(rr.adapter(straight), rr.adapter(out))
