"""Key/value cache of the reference decoder: a plain pytree, passed in and returned (jit friendly).

All rows of a batch share one write index (left-padded batches line up on the right), and
``valid`` records which slots hold real tokens, so padding is never attended to.

Example:
    >>> from peft_jax.models.decoder_config import reference_config
    >>> cache = KVCache.create(reference_config(), batch_size=2, max_length=16)
    >>> cache.keys[0].shape, int(cache.length)
    ((2, 16, 8, 64), 0)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array

from peft_jax.models.decoder_config import DecoderConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Pre-allocated per-layer keys and values.

    Attributes:
        keys: One ``[batch, max_length, num_kv_heads, head_dim]`` array per layer (after RoPE).
        values: Same shapes as ``keys``.
        valid: ``[batch, max_length]`` bool, True where a slot holds a real (non-padding) token.
        next_position: ``[batch]`` int32 RoPE position of each row's next token.
        length: Scalar int32, number of slots written so far (the next write index).
        started: Static: whether a prefill has run (input methods prepend their virtual
            tokens only before it).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    valid: Array
    next_position: Array
    length: Array
    started: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def create(cls, config: DecoderConfig, batch_size: int, max_length: int,
               dtype: jnp.dtype = jnp.float32) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens (prompt included).

        Example:
            >>> from peft_jax.models.decoder_config import reference_config
            >>> KVCache.create(reference_config(), 1, 8).max_length
            8
        """
        shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(
            keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            valid=jnp.zeros((batch_size, max_length), bool),
            next_position=jnp.zeros((batch_size,), jnp.int32), length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        """Number of slots per row."""
        return self.valid.shape[1]
