"""`LinearOp`: a layer seen as a linear function of its kernel, ``y = op(x, W)``.

Every weight method (LoRA, DoRA, ...) is written once against this interface; the NNX and Linen
front-ends only translate their layer types (Dense, DenseGeneral, Einsum, Conv, Embed) into a
`LinearOp`. The kernel's axes split into *in* axes (contracted with the input) and *out* axes;
a rank-``r`` factorisation is ``A: (*in_shape, r)`` and ``B: (r, *out_shape)``.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def thin_matmul(x: jax.Array, a: jax.Array) -> jax.Array:
    """``x @ a`` for ``x: (m, k)`` and a thin ``a: (k, r)`` (a low-rank factor), fast to differentiate.

    Same value as ``x @ a``; the gradient of ``a`` is formed as ``(g.T @ x).T``, whose matmul XLA:CPU
    runs several times faster than the ``x.T @ g`` that autodiff yields (and that XLA's algebraic
    simplifier would otherwise fold the transposition back into). Reverse-mode only (like any
    ``jax.custom_vjp`` function, it does not support ``jax.jvp``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x, a = jnp.ones((3, 4)), jnp.ones((4, 2))
        >>> jax.grad(lambda a: thin_matmul(x, a).sum())(a).tolist()[0]
        [3.0, 3.0]
    """
    return x @ a


def _thin_matmul_fwd(x, a):
    return x @ a, (x, a)


def _thin_matmul_bwd(residuals, g):
    x, a = residuals
    da_t = jax.lax.optimization_barrier(jax.lax.dot_general(g, x, (((0,), (0,)), ((), ()))))
    return (g @ a.T).astype(x.dtype), da_t.T.astype(a.dtype)


thin_matmul.defvjp(_thin_matmul_fwd, _thin_matmul_bwd)


@dataclasses.dataclass(frozen=True)
class LinearOp(abc.ABC):
    """Base class: the kernel layout is ``(*in_shape, *out_shape)`` unless a subclass says otherwise.

    Attributes:
        in_shape: sizes of the kernel axes contracted with the input.
        out_shape: sizes of the kernel axes that appear in the output.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The kernel's shape as the layer stores it."""
        return (*self.in_shape, *self.out_shape)

    @property
    def max_rank(self) -> int:
        """The largest rank a factorisation of this kernel can have."""
        return min(self.fan_in, self.fan_out)

    @property
    def takes_dropout(self) -> bool:
        """Whether input dropout makes sense (not for integer ids)."""
        return True

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.in_shape, rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, *self.out_shape)

    def kernel_to_matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as a ``(fan_in, fan_out)`` matrix."""
        return kernel.reshape(self.fan_in, self.fan_out)

    def matrix_to_kernel(self, matrix: jax.Array) -> jax.Array:
        """Inverse of `kernel_to_matrix`."""
        return matrix.reshape(*self.in_shape, *self.out_shape)

    def factors_to_kernel(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``A @ B`` laid out like the kernel (used only by merge and exact norms)."""
        return self.matrix_to_kernel(a.reshape(self.fan_in, -1) @ b.reshape(b.shape[0], self.fan_out))

    @abc.abstractmethod
    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The layer's map with ``kernel`` (a full, kernel-shaped array) and no bias."""

    @abc.abstractmethod
    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """Applies the layer's contraction with ``A`` in place of the kernel: ``(..., r)``."""

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        """Maps ``h: (..., r)`` through ``B`` into the layer's output layout."""
        if h.ndim > 2:  # rows as one axis: XLA:CPU otherwise transposes activations in the backward
            return jnp.tensordot(h.reshape(-1, h.shape[-1]), b, axes=1).reshape(*h.shape[:-1], *b.shape[1:])
        return jnp.tensordot(h, b, axes=1)

    def scale_output(self, y: jax.Array, g: jax.Array) -> jax.Array:
        """Multiplies each output feature of ``y`` by ``g: out_shape``."""
        return y * g
