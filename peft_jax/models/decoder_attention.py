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
           softcap: float | None = None, causal: bool = False) -> Array:
    """Softmax attention of ``q`` ``[B, T, H, D]`` over ``k, v`` ``[B, S, K, D]`` (``H % K == 0``).

    Args:
        q: Queries.
        k: Keys (``K`` key/value heads; query head ``h`` reads key head ``h // (H // K)``).
        v: Values, like ``k``.
        mask: ``[B, T, S]`` bool from :func:`build_attention_mask`.
        scale: Multiplier of the scores (usually ``D ** -0.5``).
        softcap: If set, scores become ``softcap * tanh(scores / softcap)`` before masking.
        causal: The caller promises that ``mask`` hides every key ``s > t`` from query ``t``
            (self-attention over the same ``T == S`` tokens, no cache). Queries are then taken in
            blocks that only read the keys up to the block's end, skipping the masked upper
            triangle (about 40% of the work at ``T = 256``). Rows that see no key at all (padding
            queries) get an average of values either way; which one is unspecified.

    Returns:
        ``[B, T, H, D]`` in the dtype of ``v``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 4, 2, 8))
        >>> m = build_attention_mask(jnp.ones((2, 4), bool), q_offset=0, q_len=4, window=2)
        >>> attend(x, x, x, m, scale=1.0, softcap=50.0).shape
        (2, 4, 2, 8)
    """
    t = q.shape[1]
    blocks = _causal_blocks(t) if causal and k.shape[1] == t else 1
    if blocks == 1:
        return _attend_dense(q, k, v, mask, scale, softcap)
    bounds = [round(i * t / blocks) for i in range(blocks + 1)]
    outs = [_attend_dense(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi], scale, softcap)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return jnp.concatenate(outs, axis=1)


_BLOCK = 64  # smallest query block worth its own matmuls on CPU
_MAX_BLOCKS = 8


def _causal_blocks(t: int) -> int:
    return max(1, min(t // _BLOCK, _MAX_BLOCKS))


def _attend_dense(q: Array, k: Array, v: Array, mask: Array, scale: float, softcap: float | None) -> Array:
    """Attention over all of ``k``: 4-D batched matmuls, the softmax normalized after ``P V``.

    The ``G`` query heads that share a key head are stacked along the rows (``[B, K, G * T, D]``),
    so both matmuls are plain batched matrix products: a size-1 group axis (multi-head attention)
    otherwise costs XLA:CPU a copy of the ``[B, H, T, S]`` scores. Dividing the ``[.., T, D]``
    output by the row sums instead of the ``[.., T, S]`` probabilities saves a pass over the scores.
    """
    b, t, h, d = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, g, d)
    qh = qh.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv_heads, g, t, s_len)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - shift)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkms,bksd->bkmd", weights.reshape(b, kv_heads, g * t, s_len).astype(v.dtype), vh)
    out = out.reshape(b, kv_heads, g, t, d) / total.astype(v.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
