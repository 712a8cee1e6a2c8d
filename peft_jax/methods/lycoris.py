"""What the LyCORIS methods (LoHa, LoKr) share: ``scale = alpha / rank``, HF PEFT's rank and
module dropout, and torch's default init of their factors.

Example:
    >>> import jax
    >>> from peft_jax.methods.base import Context
    >>> mask = rank_mask(0.5, 6, Context(jax.random.key(0)), True, jax.numpy.float32)
    >>> mask.shape, rank_mask(0.5, 6, Context(), True, jax.numpy.float32) is None
    ((6,), True)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from peft_jax.methods.base import Context
from peft_jax.methods.lora import check_positive, check_positive_int, check_rate


class Lycoris:
    """Mixin for methods with ``rank``, ``alpha``, ``rank_dropout`` and ``module_dropout`` fields."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def needs_rng(self) -> bool:
        return self.rank_dropout > 0 or self.module_dropout > 0

    def check_common(self, what: str) -> None:
        check_positive_int(self.rank, f"{what} rank")
        check_positive(self.alpha, f"{what} alpha")
        check_rate(self.rank_dropout, f"{what} rank_dropout")
        check_rate(self.module_dropout, f"{what} module_dropout")


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """torch's ``kaiming_uniform_(w, a=sqrt(5))`` of the transposed tensor: ``U(-1/sqrt(f), 1/sqrt(f))``
    with ``f = prod(shape[:-1])`` (torch's fan-in of a tensor stored ``(out, ...)``)."""
    bound = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def as_compute(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in ``dtype`` unless it holds integer ids (an embedding's input)."""
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


def module_keep(rate: float, ctx: Context) -> jax.Array | None:
    """HF's module dropout: ``torch.rand(1) > rate`` keeps the update (``None``: always keep)."""
    if ctx.key is None or rate == 0.0:
        return None
    return jax.random.uniform(ctx.fold(0).key, ()) > rate


def rank_mask(rate: float, fan_out: int, ctx: Context, rescale: bool, dtype: Any) -> jax.Array | None:
    """HF's rank dropout: a ``(fan_out,)`` keep mask on the output features of ``dW``, divided by
    its mean when ``rescale`` (an all-dropped mask stays zero instead of HF's 0/0)."""
    if ctx.key is None or rate == 0.0:
        return None
    drop = (jax.random.uniform(ctx.fold(1).key, (fan_out,)) > rate).astype(dtype)
    if rescale:
        mean = jnp.mean(drop)
        drop = jnp.where(mean > 0, drop / jnp.where(mean > 0, mean, jnp.ones_like(mean)), drop)
    return drop


def add_update(out: jax.Array, delta: jax.Array, keep: jax.Array | None) -> jax.Array:
    """``out + delta``, or ``out`` when module dropout dropped the update."""
    delta = delta.astype(out.dtype)
    return out + delta if keep is None else jnp.where(keep, out + delta, out)
