"""Truncated SVD of an update matrix into LoRA factors, as HF PEFT's ``add_weighted_adapter``.

``svd_factors(delta, k)`` takes ``delta`` in our layout ``(fan_in, fan_out)`` and returns
``A: (fan_in, k)`` and ``B: (k, fan_out)`` with ``A @ B`` the best rank-``k`` approximation
of ``delta``. As HF PEFT does, the decomposition is of torch's orientation ``delta.T = U S Vh``,
the singular values go to ``B`` (``B = (U_k S_k).T``, ``A = Vh_k.T``), and ``clamp`` (a quantile
in ``[0, 1]``) clips both factors to ``[-q, q]`` where ``q`` is that quantile of all their
entries together. A rank above ``min(fan_in, fan_out)`` is padded with zero components.

Example:
    >>> import jax.numpy as jnp
    >>> delta = jnp.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> a, b, s = svd_factors(delta, 1)
    >>> (a @ b).tolist(), s.tolist()
    ([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [3.0, 1.0])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from peft_jax import errors

__all__ = ["check_clamp", "clamp_factors", "svd_factors"]


def check_clamp(clamp: Any) -> float | None:
    """``clamp`` as a float in ``[0, 1]`` (or ``None``), else `InvalidConfigError`."""
    if clamp is None:
        return None
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0.0 <= clamp <= 1.0:
        raise errors.InvalidConfigError(
            f"svd_clamp must be a quantile in [0, 1] (e.g. 0.99) or None, got {clamp!r}")
    return float(clamp)


def clamp_factors(a: jax.Array, b: jax.Array, clamp: float) -> tuple[jax.Array, jax.Array]:
    """``A`` and ``B`` clipped to ``[-q, q]``, ``q`` the ``clamp`` quantile of all their entries.

    The result depends on each component's sign (``u_i, v_i`` vs ``-u_i, -v_i``), which an SVD
    leaves open: two LAPACKs may clamp the same update differently.

    Example:
        >>> a, b = clamp_factors(jnp.array([[1.0], [-4.0]]), jnp.array([[2.0, 3.0]]), 0.5)
        >>> a.tolist(), b.tolist()
        ([[1.0], [-1.5]], [[1.5, 1.5]])
    """
    clamp = check_clamp(clamp)
    high = jnp.quantile(jnp.concatenate([a.reshape(-1), b.reshape(-1)]), clamp)
    return jnp.clip(a, -high, high), jnp.clip(b, -high, high)


def svd_factors(delta: jax.Array, rank: int, clamp: float | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A (fan_in, rank), B (rank, fan_out), all singular values)`` of ``delta``; see the module."""
    clamp = check_clamp(clamp)
    u, s, vh = jnp.linalg.svd(delta.T, full_matrices=False)
    k = min(rank, s.shape[0])
    a, b = vh[:k].T, (u[:, :k] * s[:k]).T  # torch's lora_A.T and lora_B.T
    if clamp is not None:
        a, b = clamp_factors(a, b, clamp)
    if k < rank:
        a = jnp.pad(a, ((0, 0), (0, rank - k)))
        b = jnp.pad(b, ((0, rank - k), (0, 0)))
    return a, b, s
