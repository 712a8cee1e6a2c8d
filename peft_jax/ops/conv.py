"""Convolutions: ``A`` is a conv with the layer's window into ``r`` channels, ``B`` a 1x1 map.

Grouped convolutions (``feature_group_count = g > 1``) follow HF PEFT: ``A`` is a plain conv over
all input channels, ``B`` a grouped 1x1 conv (``r / g`` rank channels per group), so the update is
not a kernel of the layer's grouped shape and cannot be merged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen

from peft_jax.ops.base import LinearOp


@dataclasses.dataclass(frozen=True)
class ConvOp(LinearOp):
    """A convolution with kernel ``(*window, in / groups, out)``.

    ``conv(x, W)`` is linear in ``W``, so ``conv(x, A) @ B == conv(x, A @ B)`` exactly: the low-rank
    path runs the same window (strides, padding, dilations) with ``r`` output channels.

    Example:
        >>> import jax.numpy as jnp
        >>> op = ConvOp(in_shape=(3, 3, 4), out_shape=(8,), kernel_size=(3, 3))
        >>> op.project_in(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 2))).shape
        (1, 5, 5, 2)
    """

    kernel_size: tuple[int, ...] = ()
    strides: Any = 1
    padding: Any = "SAME"
    input_dilation: Any = 1
    kernel_dilation: Any = 1
    precision: Any = None
    feature_group_count: int = 1

    @property
    def groups(self) -> int:
        return self.feature_group_count

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.in_shape[:-1], self.in_shape[-1] * self.groups, rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (rank // self.groups, *self.out_shape)

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        g = self.groups
        if g == 1:
            return super().project_out(h, b)
        out = b.shape[-1]
        hg = h.reshape(*h.shape[:-1], g, h.shape[-1] // g)
        y = jnp.einsum("...gk,kgo->...go", hg, b.reshape(b.shape[0], g, out // g))
        return y.reshape(*h.shape[:-1], out)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return self._conv(x, kernel, self.groups)

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        return self._conv(x, a, 1)

    def _conv(self, x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
        conv = linen.Conv(features=kernel.shape[-1], kernel_size=self.kernel_size, strides=self.strides,
                          feature_group_count=groups, padding=self.padding, input_dilation=self.input_dilation,
                          kernel_dilation=self.kernel_dilation, use_bias=False,
                          precision=self.precision, dtype=x.dtype, param_dtype=kernel.dtype)
        return conv.apply({"params": {"kernel": kernel}}, x)
