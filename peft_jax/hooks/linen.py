"""The Linen taps: the same three as `peft_jax.hooks` (NNX), as ``nn.Module`` dataclasses.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods.sites import Residual
    >>> tap = ResidualTap(features=2, role="ffn")
    >>> tap.apply({}, Residual(jnp.ones(2), jnp.ones(2))).tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import linen as nn

from peft_jax.methods.sites import Attention, Inputs, Residual


class ResidualTap(nn.Module):
    """``tap(Residual(output, residual, norm))`` -> ``norm(residual + output)``."""

    features: int
    role: str
    index: int = 0
    tap_kind = "residual"

    def __call__(self, r: Residual) -> jax.Array:
        return r.combine()


class InputTap(nn.Module):
    """``tap(Inputs(embeds, mask))`` -> the inputs the model goes on with."""

    features: int
    vocab_size: int
    embed_path: str
    max_positions: int | None = None
    tap_kind = "inputs"

    def __call__(self, inputs: Inputs) -> Inputs:
        return inputs


class AttentionTap(nn.Module):
    """``tap(Attention(q, k, v, mask), attend)`` -> ``attend(Attention(...))``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    index: int = 0
    num_layers: int = 1
    features: int = 0
    tap_kind = "attention"

    def __call__(self, a: Attention, attend: Callable[[Attention], jax.Array]) -> jax.Array:
        return attend(a)
