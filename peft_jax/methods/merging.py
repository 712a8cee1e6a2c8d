"""Folding adapters into a kernel and back, for any weight method; both front-ends call this.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import LORA, TargetSettings
    >>> from peft_jax.ops import dense_op
    >>> s = TargetSettings(rank=1, alpha=1.0, scale=1.0, dropout=0.0)
    >>> live = [(LORA, {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}, s)]
    >>> merged, records = merge_kernel(live, dense_op(2, 2), jnp.zeros((2, 2)), keep_original=True)
    >>> merged.tolist(), unmerge_kernel(live, dense_op(2, 2), merged, records).tolist()
    ([[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from peft_jax.methods.base import Params, TargetSettings, WeightMethod
from peft_jax.ops import LinearOp

Live = Sequence[tuple[WeightMethod, Params, TargetSettings]]


def merge_kernel(live: Live, op: LinearOp, kernel: jax.Array, *, keep_original: bool
                 ) -> tuple[jax.Array, dict[str, Any]]:
    """Merges adapters one after another; the record lets `unmerge_kernel` undo it.

    With ``keep_original`` the record holds the original kernel, so undoing is bitwise exact.
    """
    records = []
    merged = kernel
    for method, params, settings in live:
        merged, record = method.merge(params, op, merged, settings)
        records.append(record)
    return merged, {"kernel": kernel if keep_original else None, "methods": records}


def unmerge_kernel(live: Live, op: LinearOp, merged: jax.Array, record: dict[str, Any]) -> jax.Array:
    """The kernel before `merge_kernel` (bitwise when the original was kept)."""
    if record["kernel"] is not None:
        return record["kernel"]
    for (method, params, settings), method_record in zip(reversed(live), reversed(record["methods"])):
        merged = method.unmerge(params, op, merged, method_record, settings)
    return merged
