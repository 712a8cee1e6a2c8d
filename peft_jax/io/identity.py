"""Which base an adapter belongs to: the architecture, every frozen tensor's shape and dtype, and
a CRC-32 of its bytes.

An adapter is only meaningful on the base it was trained on. `base_identity` records that base;
`check_identity` compares it with the base an adapter is being loaded onto and names the first
tensor that differs (a missing tensor, another shape or dtype, or other weights), so a wrong
base fails before anything is loaded. Fingerprints are taken of the base as attached (PiSSA's
residual kernels included), on the paths the user's model has without the adapter wrappers.

Example:
    >>> import numpy as np
    >>> a = base_identity("Toy", {"w": np.ones((2, 2), np.float32)})
    >>> check_identity(a, base_identity("Toy", {"w": np.ones((2, 2), np.float32)}))
    >>> check_identity(a, base_identity("Toy", {"w": np.zeros((2, 2), np.float32)}))
    Traceback (most recent call last):
    ...
    peft_jax.errors.CheckpointError: the adapter was saved on a base whose tensor 'w' has other weights ...
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from peft_jax import errors

__all__ = ["base_identity", "check_identity", "fingerprint"]


def fingerprint(array: Any) -> str:
    """CRC-32 of an array's bytes (C order), as 8 hex digits."""
    a = np.ascontiguousarray(np.asarray(jax.device_get(array)))
    return f"{zlib.crc32(a.reshape(-1).view(np.uint8)):08x}"


def base_identity(architecture: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``{"architecture": ..., "tensors": {path: {"shape", "dtype", "crc32"}}}`` of a base."""
    return {"architecture": architecture,
            "tensors": {path: {"shape": list(np.shape(t)), "dtype": str(np.dtype(t.dtype)),
                               "crc32": fingerprint(t)} for path, t in sorted(tensors.items())}}


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                   allow_different_weights: bool = False) -> None:
    """Raises `CheckpointError` naming the first difference between two `base_identity` records.

    Shapes, dtypes and the set of tensors must always agree; the weights fingerprints are
    skipped with ``allow_different_weights`` (a same-shape base: another fine-tune of the same
    model, a quantised copy restored to float).
    """
    hint = "load it onto the base it was trained on"
    if saved.get("architecture") != current.get("architecture"):
        raise errors.CheckpointError(
            f"the adapter was saved on a {saved.get('architecture')!r} model, not a "
            f"{current.get('architecture')!r}; {hint}")
    want, have = saved.get("tensors", {}), current.get("tensors", {})
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise errors.CheckpointError(
                f"the adapter's base has a tensor {path!r} that this model lacks; {hint}")
        if path not in want:
            raise errors.CheckpointError(
                f"this model has a tensor {path!r} that the adapter's base lacked; {hint}")
        w, h = want[path], have[path]
        if list(w["shape"]) != list(h["shape"]) or w["dtype"] != h["dtype"]:
            raise errors.CheckpointError(
                f"the adapter was saved on a base whose tensor {path!r} is {w['dtype']}{list(w['shape'])}, "
                f"but here it is {h['dtype']}{list(h['shape'])}; {hint}")
    if allow_different_weights:
        return
    for path in sorted(want):
        if want[path]["crc32"] != have[path]["crc32"]:
            raise errors.CheckpointError(
                f"the adapter was saved on a base whose tensor {path!r} has other weights "
                f"(fingerprint {want[path]['crc32']}, this base {have[path]['crc32']}); {hint}, or "
                "pass allow_different_weights=True for a same-shape base")
