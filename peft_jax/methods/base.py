"""The interface every weight method implements, and the per-layer settings it receives.

A weight method turns a layer ``y = op(x, W)`` into ``y + delta(x)``. It is pure math on arrays
(`peft_jax.ops.LinearOp` describes the layer); the NNX and Linen front-ends call it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

from peft_jax.ops import LinearOp

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TargetSettings:
    """What one adapted layer was given: its rank, alpha, scale and input-dropout rate."""

    rank: int
    alpha: float
    scale: float
    dropout: float


class WeightMethod(Protocol):
    """Pure functions of (adapter params, layer op, base kernel).

    ``delta`` must not build ``W + scale * A @ B``: only ``merge`` materialises a kernel.
    """

    name: str

    def init(self, key: jax.Array, op: LinearOp, kernel: jax.Array, settings: TargetSettings,
             initializer: Any) -> tuple[Params, jax.Array | None]:
        """Returns the adapter params and, for PiSSA-like inits, the replacement base kernel."""

    def delta(self, params: Params, op: LinearOp, x: jax.Array, kernel: jax.Array,
              base_out: jax.Array, bias: jax.Array | None, settings: TargetSettings,
              dropout_key: jax.Array | None) -> jax.Array:
        """The additive change to the layer output ``base_out`` (which includes ``bias``)."""

    def attend_delta(self, params: Params, op: LinearOp, query: jax.Array, kernel: jax.Array,
                     settings: TargetSettings) -> jax.Array:
        """The change to ``query @ W.T`` of a tied embedding head."""

    def merge(self, params: Params, op: LinearOp, kernel: jax.Array,
              settings: TargetSettings) -> tuple[jax.Array, Any]:
        """The merged kernel and what `unmerge` needs to invert it."""

    def unmerge(self, params: Params, op: LinearOp, merged: jax.Array, record: Any,
                settings: TargetSettings) -> jax.Array:
        """The kernel before `merge` (up to float rounding)."""
