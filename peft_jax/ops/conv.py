"""Convolutions: ``A`` is a conv with the layer's window into ``r`` channels, ``B`` a 1x1 map."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen

from peft_jax.ops.base import LinearOp


@dataclasses.dataclass(frozen=True)
class ConvOp(LinearOp):
    """A ``feature_group_count == 1`` convolution with kernel ``(*window, in, out)``.

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

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return self.project_in(x, kernel)

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        conv = linen.Conv(features=a.shape[-1], kernel_size=self.kernel_size, strides=self.strides,
                          padding=self.padding, input_dilation=self.input_dilation,
                          kernel_dilation=self.kernel_dilation, use_bias=False,
                          precision=self.precision, dtype=x.dtype, param_dtype=a.dtype)
        return conv.apply({"params": {"kernel": a}}, x)
