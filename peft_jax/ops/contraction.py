"""Dense / Linear and DenseGeneral / LinearGeneral: contraction of input axes with the kernel."""

from __future__ import annotations

import dataclasses

import jax

from peft_jax.ops.base import LinearOp, thin_matmul


@dataclasses.dataclass(frozen=True)
class ContractionOp(LinearOp):
    """``y = dot_general(x, W)`` over input ``axis`` and the kernel's leading in-axes.

    Example:
        >>> import jax.numpy as jnp
        >>> op = ContractionOp(in_shape=(4,), out_shape=(3,), axis=(-1,))
        >>> op.project_in(jnp.ones((2, 4)), jnp.ones((4, 5))).shape
        (2, 5)
    """

    axis: tuple[int, ...] = (-1,)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        axes = tuple(ax % x.ndim for ax in self.axis)
        return jax.lax.dot_general(x, kernel, ((axes, tuple(range(len(axes)))), ((), ())))

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        axes = tuple(ax % x.ndim for ax in self.axis)
        n = len(axes)
        if axes == tuple(range(x.ndim - n, x.ndim)) and a.ndim == n + 1:
            # Trailing axes contracted into one rank axis: a 2-D matmul over all leading axes, which
            # XLA:CPU differentiates without transposing the (large) input or output gradient.
            k = a.shape[-1]
            h = thin_matmul(x.reshape(-1, a.size // k), a.reshape(-1, k))
            return h.reshape(*x.shape[:-n], k)
        dims = ((axes, tuple(range(n))), ((), ()))
        return jax.lax.dot_general(x, a, dims)


def dense_op(in_features: int, out_features: int) -> ContractionOp:
    """The op of a plain Dense / Linear layer."""
    return ContractionOp(in_shape=(in_features,), out_shape=(out_features,), axis=(-1,))
