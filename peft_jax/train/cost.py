"""What a compiled step costs, from XLA's own analysis (no timing involved).

Example:
    >>> import jax, jax.numpy as jnp
    >>> compiled_flops(jax.jit(lambda a, b: a @ b), jnp.ones((4, 8)), jnp.ones((8, 2)))
    128.0
"""

from __future__ import annotations

from typing import Any, Callable


def compiled_flops(jitted: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """FLOPs of ``jitted(*args, **kwargs)`` as XLA's ``cost_analysis()`` reports them."""
    analysis = jitted.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per device program
        analysis = analysis[0]
    return float(analysis["flops"])
