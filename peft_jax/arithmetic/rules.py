"""Merge rules for task tensors: task arithmetic, magnitude pruning, TIES and DARE.

Each rule takes a list of same-shaped tensors ``T_i`` (one per adapter) and their weights
``w_i`` and returns one tensor, with the semantics of HF PEFT's ``peft.utils.merge_utils``:

* ``task_arithmetic``: ``sum_i w_i T_i`` (Ilharco et al., 2023, arXiv:2212.04089).
* ``magnitude_prune``: keep the top ``density`` fraction of each ``|T_i|``, then task arithmetic.
* ``ties``: magnitude pruning, a sign elected per entry from the *unweighted* pruned tensors
  (``"total"``: sign of ``sum_i T_i``; ``"frequency"``: sign of ``sum_i sign(T_i)``; a tie
  counts as ``+``), then the disjoint mean ``sum_i w_i T_i m_i / max(sum_i m_i, 1)`` over the
  entries that agree with it (Yadav et al., 2023, arXiv:2306.01708).
* ``dare_linear`` / ``dare_ties``: each ``T_i`` keeps a Bernoulli(``density``) random subset of
  its entries, rescaled by ``1 / density`` (Yu et al., 2024, arXiv:2311.03099), then task
  arithmetic / TIES' sign election and disjoint mean. The masks come from a JAX ``key`` or are
  given (``masks=``), e.g. to replay another library's draws.

``density = 1`` prunes nothing (HF PEFT warns and skips pruning; no mask is drawn).

Example:
    >>> import jax.numpy as jnp
    >>> t = [jnp.array([1.0, -3.0, 2.0, 0.5]), jnp.array([-1.0, 1.5, 0.25, 0.125])]
    >>> task_arithmetic(t, [1.0, 2.0]).tolist()
    [-1.0, 0.0, 2.5, 0.75]
    >>> magnitude_prune(t, [1.0, 1.0], density=0.5).tolist()
    [-1.0, -1.5, 2.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from peft_jax import errors

__all__ = ["RULES", "SIGN_METHODS", "check_density", "dare_linear", "dare_ties", "disjoint_merge",
           "magnitude_prune", "majority_sign_mask", "prune_magnitude", "prune_random", "random_masks",
           "signed_sqrt_weights", "task_arithmetic", "ties"]

SIGN_METHODS = ("total", "frequency")


# --- checks ---------------------------------------------------------------------------------------
def check_density(density: Any) -> float:
    """``density`` as a float in ``(0, 1]``, or `InvalidConfigError`."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise errors.InvalidConfigError(
            f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}; "
            "e.g. density=0.5")
    return float(density)


def _check_sign_method(method: Any) -> None:
    if method not in SIGN_METHODS:
        raise errors.InvalidConfigError(
            f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")


def _stack(tensors: Sequence[jax.Array], weights: Any) -> tuple[jax.Array, jax.Array]:
    """``(stacked tensors (n, ...), weights (n, 1, ...))`` in the tensors' dtype."""
    if len(tensors) == 0:
        raise errors.InvalidConfigError("no tensors to merge; pass at least one")
    shapes = {tuple(jnp.shape(t)) for t in tensors}
    if len(shapes) != 1:
        raise errors.InvalidConfigError(f"task tensors must share one shape, got {sorted(shapes)}")
    stacked = jnp.stack([jnp.asarray(t) for t in tensors])
    w = jnp.asarray(weights, stacked.dtype).reshape(-1)
    if w.shape[0] != stacked.shape[0]:
        raise errors.InvalidConfigError(
            f"got {w.shape[0]} weights for {stacked.shape[0]} task tensors; pass one weight per tensor")
    return stacked, w.reshape(-1, *([1] * (stacked.ndim - 1)))


# --- building blocks ------------------------------------------------------------------------------
def prune_magnitude(tensor: jax.Array, density: float) -> jax.Array:
    """``tensor`` with all but its ``int(density * size)`` largest-magnitude entries zeroed.

    Example:
        >>> prune_magnitude(jnp.array([[1.0, -3.0], [2.0, 0.5]]), 0.5).tolist()
        [[0.0, -3.0], [2.0, 0.0]]
    """
    density = check_density(density)
    if density >= 1.0:
        return tensor
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    keep = jnp.zeros(flat.shape, bool)
    if k > 0:
        keep = keep.at[jax.lax.top_k(jnp.abs(flat), k)[1]].set(True)
    return jnp.where(keep, flat, jnp.zeros_like(flat)).reshape(tensor.shape)


def random_masks(key: jax.Array, shapes: Sequence[tuple[int, ...]], density: float) -> list[jax.Array]:
    """One Bernoulli(``density``) keep-mask per shape, each from its own fold of ``key``.

    Example:
        >>> [m.shape for m in random_masks(jax.random.key(0), [(2, 3), (4,)], 0.5)]
        [(2, 3), (4,)]
    """
    density = check_density(density)
    return [jax.random.bernoulli(jax.random.fold_in(key, i), density, tuple(s)) for i, s in enumerate(shapes)]


def prune_random(tensor: jax.Array, density: float, mask: jax.Array) -> jax.Array:
    """DARE's drop and rescale: ``tensor * mask / density`` (``tensor`` itself at density 1).

    Example:
        >>> prune_random(jnp.array([1.0, 2.0]), 0.5, jnp.array([True, False])).tolist()
        [2.0, 0.0]
    """
    density = check_density(density)
    if density >= 1.0:
        return tensor
    if tuple(jnp.shape(mask)) != tuple(tensor.shape):
        raise errors.InvalidConfigError(
            f"a DARE mask has shape {tuple(jnp.shape(mask))} but its tensor has shape {tuple(tensor.shape)}")
    return tensor * jnp.asarray(mask).astype(tensor.dtype) / jnp.asarray(density, tensor.dtype)


def majority_sign_mask(stacked: jax.Array, method: str = "total") -> jax.Array:
    """Which entries of ``stacked`` (``(n, ...)``) carry the elected sign (zeros never do).

    Example:
        >>> majority_sign_mask(jnp.array([[1.0, -1.0], [-3.0, 0.0]])).tolist()
        [[False, True], [True, False]]
    """
    _check_sign_method(method)
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    majority = jnp.where(magnitude >= 0, jnp.ones_like(magnitude), -jnp.ones_like(magnitude))
    return sign == majority


def disjoint_merge(weighted: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_i weighted_i * mask_i / max(sum_i mask_i, 1)`` over the leading axis.

    Example:
        >>> disjoint_merge(jnp.array([[2.0, 1.0], [4.0, 1.0]]), jnp.array([[True, False], [True, False]])).tolist()
        [3.0, 0.0]
    """
    m = mask.astype(weighted.dtype)
    return (weighted * m).sum(axis=0) / jnp.maximum(m.sum(axis=0), jnp.ones((), weighted.dtype))


def _dare(tensors: Sequence[jax.Array], density: float, key: jax.Array | None,
          masks: Sequence[jax.Array] | None) -> list[jax.Array]:
    density = check_density(density)
    if density >= 1.0:
        return list(tensors)
    if masks is None:
        if key is None:
            raise errors.InvalidConfigError("DARE draws random masks: pass key=jax.random.key(...) or masks=")
        masks = random_masks(key, [jnp.shape(t) for t in tensors], density)
    if len(masks) != len(tensors):
        raise errors.InvalidConfigError(f"got {len(masks)} DARE masks for {len(tensors)} tensors; pass one each")
    return [prune_random(jnp.asarray(t), density, m) for t, m in zip(tensors, masks)]


# --- the rules ------------------------------------------------------------------------------------
def task_arithmetic(tensors: Sequence[jax.Array], weights: Any) -> jax.Array:
    """``sum_i w_i T_i``."""
    stacked, w = _stack(tensors, weights)
    return (stacked * w).sum(axis=0)


def magnitude_prune(tensors: Sequence[jax.Array], weights: Any, density: float) -> jax.Array:
    """Each ``T_i`` magnitude-pruned to ``density``, then ``sum_i w_i T_i``."""
    return task_arithmetic([prune_magnitude(jnp.asarray(t), density) for t in tensors], weights)


def _elect_and_merge(tensors: Sequence[jax.Array], weights: Any, method: str) -> jax.Array:
    stacked, w = _stack(tensors, weights)
    return disjoint_merge(stacked * w, majority_sign_mask(stacked, method))


def ties(tensors: Sequence[jax.Array], weights: Any, density: float,
         majority_sign_method: str = "total") -> jax.Array:
    """TIES: magnitude pruning, sign election, disjoint mean.

    Example:
        >>> t = [jnp.array([3.0, 1.0]), jnp.array([-1.0, -1.0]), jnp.array([-1.0, 2.0])]
        >>> ties(t, [1.0, 1.0, 1.0], 1.0, "total").tolist()      # signs of the sums: +, +
        [3.0, 1.5]
        >>> ties(t, [1.0, 1.0, 1.0], 1.0, "frequency").tolist()  # majority of signs: -, +
        [-1.0, 1.5]
    """
    _check_sign_method(majority_sign_method)
    return _elect_and_merge([prune_magnitude(jnp.asarray(t), density) for t in tensors], weights,
                            majority_sign_method)


def dare_linear(tensors: Sequence[jax.Array], weights: Any, density: float, *,
                key: jax.Array | None = None, masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """DARE: random drop with rescale (``key`` or explicit ``masks``), then ``sum_i w_i T_i``.

    Example:
        >>> t = [jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])]
        >>> masks = [jnp.array([True, False]), jnp.array([True, True])]
        >>> dare_linear(t, [1.0, 0.5], 0.5, masks=masks).tolist()
        [5.0, 4.0]
    """
    return task_arithmetic(_dare(tensors, density, key, masks), weights)


def dare_ties(tensors: Sequence[jax.Array], weights: Any, density: float, majority_sign_method: str = "total",
              *, key: jax.Array | None = None, masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """DARE's random drop with rescale, then TIES' sign election and disjoint mean."""
    _check_sign_method(majority_sign_method)
    return _elect_and_merge(_dare(tensors, density, key, masks), weights, majority_sign_method)


def _uniform(rule: Callable[..., jax.Array], *, pruned: bool, signed: bool, random: bool) -> Callable[..., jax.Array]:
    def run(tensors, weights, *, density=None, majority_sign_method="total", key=None, masks=None):
        args = (density,) if pruned else ()
        args += (majority_sign_method,) if signed else ()
        extra = {"key": key, "masks": masks} if random else {}
        return rule(tensors, weights, *args, **extra)

    run.needs_density, run.random = pruned, random
    return run


#: every rule under one signature ``(tensors, weights, *, density, majority_sign_method, key,
#: masks)``; ``RULES[name].needs_density`` / ``.random`` say what it reads.
RULES: dict[str, Callable[..., jax.Array]] = {
    "task_arithmetic": _uniform(task_arithmetic, pruned=False, signed=False, random=False),
    "magnitude_prune": _uniform(magnitude_prune, pruned=True, signed=False, random=False),
    "ties": _uniform(ties, pruned=True, signed=True, random=False),
    "dare_linear": _uniform(dare_linear, pruned=True, signed=False, random=True),
    "dare_ties": _uniform(dare_ties, pruned=True, signed=True, random=True),
}


def signed_sqrt_weights(weight: float) -> tuple[float, float]:
    """``(sign * sqrt|w|, sqrt|w|)``: how HF PEFT splits one weight over a LoRA's ``A`` and ``B``.

    Example:
        >>> signed_sqrt_weights(-4.0)
        (-2.0, 2.0)
    """
    root = math.sqrt(abs(weight))
    return (root if weight >= 0 else -root), root
