"""Rotary position embeddings (RoPE) in the "rotate half" layout that HF checkpoints use.

The inverse frequencies are computed once in numpy (they are compile-time constants), then applied
to queries and keys of shape ``[batch, seq, heads, head_dim]``. Llama 3's frequency rescaling
("llama3" rope type) and plain linear position interpolation ("linear") are supported.

Example:
    >>> import jax.numpy as jnp
    >>> inv = inverse_frequencies(8, theta=10000.0)
    >>> x = jnp.ones((1, 3, 2, 8))
    >>> apply_rope(x, jnp.arange(3)[None], inv).shape
    (1, 3, 2, 8)
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import Array


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency rescaling of RoPE (HF ``rope_scaling`` / ``rope_parameters``).

    Attributes:
        kind: ``"llama3"`` (Llama 3.1 smooth interpolation), ``"linear"`` (positions / factor) or
            ``"factors"`` (each frequency divided by its entry of ``freq_factors``, as llama.cpp
            stores Llama 3 scaling in GGUF's ``rope_freqs`` tensor).
        factor: Scaling factor (8.0 for Llama 3.1).
        low_freq_factor: Llama 3 only: wavelengths above ``original_max_positions / low_freq_factor``
            are divided by ``factor``.
        high_freq_factor: Llama 3 only: wavelengths below ``original_max_positions / high_freq_factor``
            are left as they are; between the two bounds the result is interpolated.
        original_max_positions: Llama 3 only: context length of pre-training (8192 for Llama 3.1).
        freq_factors: ``"factors"`` only: one divisor per frequency (``head_dim // 2`` entries).

    Example:
        >>> s = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        ...                 original_max_positions=8192)
        >>> inverse_frequencies(128, 500000.0, s).shape
        (64,)
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    freq_factors: tuple[float, ...] = ()


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``1 / theta^(2i/d)`` (float32, length ``head_dim // 2``), optionally rescaled.

    Args:
        head_dim: Size of one attention head (even).
        theta: RoPE base (``rope_theta``).
        scaling: Optional :class:`RopeScaling`.

    Returns:
        A float32 numpy array of shape ``[head_dim // 2]``.

    Example:
        >>> inverse_frequencies(4, 10000.0).tolist()
        [1.0, 0.009999999776482582]
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "factors":
        return (inv / np.asarray(scaling.freq_factors, np.float32)).astype(np.float32)
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    # "llama3": divide low frequencies by `factor`, keep high ones, interpolate in between.
    low_wavelen = scaling.original_max_positions / scaling.low_freq_factor
    high_wavelen = scaling.original_max_positions / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_positions / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """Cosine and sine tables for integer ``positions`` ``[batch, seq]``.

    Returns:
        ``(cos, sin)``, each float32 of shape ``[batch, seq, 1, head_dim // 2]`` (broadcast over heads).

    Example:
        >>> cos, sin = rope_angles(jnp.zeros((1, 2), jnp.int32), inverse_frequencies(4, 1e4))
        >>> cos.shape
        (1, 2, 1, 2)
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope_angles_from_table(positions: Array, inv_freq: np.ndarray, size: int
                           ) -> tuple[Array, Array]:
    """:func:`rope_angles` for ``0 <= positions < size``, read from tables built in numpy.

    Computed from ``positions`` directly, XLA:CPU fuses the cosine and sine into every consumer
    and so evaluates them again for each head of q and k in every layer, forward and backward;
    constant tables cost one lookup per element instead. Values agree with :func:`rope_angles`
    to about an ulp (numpy's cos/sin vs XLA's).

    Example:
        >>> inv = inverse_frequencies(4, 1e4)
        >>> cos, _ = rope_angles_from_table(jnp.zeros((1, 2), jnp.int32), inv, 2)
        >>> cos.shape
        (1, 2, 1, 2)
    """
    angles = np.arange(size, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    return cos[positions][:, :, None, :], sin[positions][:, :, None, :]


def apply_rope(x: Array, positions_or_angles: Array | tuple[Array, Array], inv_freq: np.ndarray | None = None) -> Array:
    """Rotate ``x`` ``[batch, seq, heads, head_dim]`` by its positions (HF "rotate half" layout).

    Args:
        x: Queries or keys.
        positions_or_angles: Integer positions ``[batch, seq]``, or the ``(cos, sin)`` pair from
            :func:`rope_angles` (pass that to share the tables between layers).
        inv_freq: Inverse frequencies; needed only when positions are given.

    Returns:
        An array like ``x`` (same dtype).

    Example:
        >>> x = jnp.ones((1, 1, 1, 4))
        >>> bool(jnp.allclose(apply_rope(x, jnp.zeros((1, 1), jnp.int32), inverse_frequencies(4, 1e4)), x))
        True
    """
    if isinstance(positions_or_angles, tuple):
        cos, sin = positions_or_angles
    else:
        cos, sin = rope_angles(positions_or_angles, inv_freq)
    cos = cos.astype(x.dtype)
    sin = sin.astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
