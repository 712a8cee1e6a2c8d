"""Standard losses, written on logits so every model and front-end can use them.

Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 4))
    >>> round(float(causal_lm_loss(logits, jnp.array([[1, 2, 3]]))), 4)  # log(4)
    1.3863
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: logits at ``t`` predict ``input_ids`` at ``t + 1``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], input_ids[:, 1:])
    if mask is None:
        return jnp.mean(losses)
    weights = mask[:, 1:].astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
