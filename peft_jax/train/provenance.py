"""Where a result came from: library versions, the git revision, the machine and peak memory.

Both `peft-jax train` recipes put `run_environment` into ``results.json``, so a number can be read
next to what produced it (CPU models differ between machines, and so do ratios measured on them).

Example:
    >>> env = run_environment()
    >>> sorted(env)[:4]
    ['backend', 'cpu_model', 'device_count', 'device_kind']
    >>> env["peak_rss_bytes"] > 0
    True
"""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

__all__ = ["cpu_model", "git_revision", "peak_rss_bytes", "run_environment"]

_PACKAGES = ("peft_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else `platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(directory: str | Path | None = None) -> str | None:
    """The commit of the source tree peft_jax runs from, with ``+dirty`` when it has uncommitted
    changes; ``None`` outside a git checkout (an installed wheel) or without git."""
    where = Path(directory) if directory else Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _device_peak_bytes() -> int | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return None if not stats else stats.get("peak_bytes_in_use")


def run_environment() -> dict[str, Any]:
    """Versions, git revision, backend, device kind and count, CPU model, Python, peak memory."""
    return {
        "versions": {p: _version(p) for p in _PACKAGES},
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "cpu_model": cpu_model(),
        "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": _device_peak_bytes(),
    }
