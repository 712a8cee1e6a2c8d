"""Embedding tables: ``y = W[ids]``, the one-hot contraction of ids with ``W: (vocab, features)``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peft_jax.ops.base import LinearOp


@dataclasses.dataclass(frozen=True)
class EmbedOp(LinearOp):
    """Lookup ``W[ids]``; the low-rank path looks up rows of ``A`` then maps them through ``B``.

    Example:
        >>> import jax.numpy as jnp
        >>> op = EmbedOp(in_shape=(10,), out_shape=(4,))
        >>> op.project_in(jnp.array([[1, 2]]), jnp.ones((10, 3))).shape
        (1, 2, 3)
    """

    @property
    def takes_dropout(self) -> bool:
        return False

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.take(kernel, x, axis=0)

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        return jnp.take(a, x, axis=0)

    def attend_low_rank(self, query: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """``query @ (A @ B).T`` without building ``A @ B`` (tied output heads)."""
        return (query @ b.T) @ a.T
