"""SIGKILL a training process at a random moment after it has made checkpoint progress."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable, Sequence


def kill_after_progress(command: Sequence[str], latest_step: Callable[[], int],
                        rng: random.Random, *, max_pause: float, timeout: float = 300.0) -> bool:
    """Starts ``command``, waits until ``latest_step()`` grows (a new finished checkpoint), sleeps
    a random ``[0, max_pause)`` seconds and kills the process. Returns whether it was killed (it
    may have finished first)."""
    before = latest_step()
    proc = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if latest_step() > before:
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, max_pause))
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True
