"""Masked grouped-query attention and the causal / padding / sliding-window masks it uses.

Queries stay in ``[batch, seq, heads, head_dim]`` (the layout the projections produce), grouped as
``[batch, seq, kv_heads, groups, head_dim]`` so keys and values are never repeated per query head.
Scores and softmax run in float32 whatever the compute dtype.

Example:
    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 3, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
    >>> m = build_attention_mask(jnp.ones((1, 3), bool), q_offset=0, q_len=3, window=None)
    >>> attend(q, kv, kv, m, scale=8 ** -0.5).shape
    (1, 3, 4, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

_MASKED = float(jnp.finfo(jnp.float32).min)


def build_attention_mask(key_valid: Array, *, q_offset: Array | int, q_len: int, window: int | None) -> Array:
    """Boolean ``[batch, q_len, kv_len]`` mask: causal, no padding keys, optional sliding window.

    Query ``t`` sits at slot ``q_offset + t``; key ``s`` at slot ``s``. A key is seen when it is
    valid, ``s <= q_slot`` and (with a window) ``q_slot - s < window``.

    Args:
        key_valid: ``[batch, kv_len]`` bool, True for real tokens.
        q_offset: Slot of the first query (the cache length before this call; 0 without a cache).
        q_len: Number of queries.
        window: Sliding window, or ``None`` for global attention.

    Example:
        >>> import jax.numpy as jnp
        >>> build_attention_mask(jnp.ones((1, 2), bool), q_offset=0, q_len=2, window=None)[0].tolist()
        [[True, False], [True, True]]
    """
    q_slot = q_offset + jnp.arange(q_len, dtype=jnp.int32)[:, None]
    k_slot = jnp.arange(key_valid.shape[1], dtype=jnp.int32)[None, :]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (q_slot - k_slot < window)
    return allowed[None] & key_valid[:, None, :]


def attend(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
           softcap: float | None = None) -> Array:
    """Softmax attention of ``q`` ``[B, T, H, D]`` over ``k, v`` ``[B, S, K, D]`` (``H % K == 0``).

    Args:
        q: Queries.
        k: Keys (``K`` key/value heads; query head ``h`` reads key head ``h // (H // K)``).
        v: Values, like ``k``.
        mask: ``[B, T, S]`` bool from :func:`build_attention_mask`.
        scale: Multiplier of the scores (usually ``D ** -0.5``).
        softcap: If set, scores become ``softcap * tanh(scores / softcap)`` before masking.

    Returns:
        ``[B, T, H, D]`` in the dtype of ``v``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 4, 2, 8))
        >>> m = build_attention_mask(jnp.ones((2, 4), bool), q_offset=0, q_len=4, window=2)
        >>> attend(x, x, x, m, scale=1.0, softcap=50.0).shape
        (2, 4, 2, 8)
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
