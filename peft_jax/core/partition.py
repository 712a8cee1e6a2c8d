"""Split a pytree into trainable and frozen halves, and put them back together (equinox style).

Both halves keep the full tree structure; a leaf lives in exactly one of them and the other holds
``None`` there. ``None`` is an empty pytree to JAX, so ``jax.grad`` of a function of the trainable
half differentiates only the trainable leaves, and the frozen half goes in as a plain argument.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    >>> trainable, frozen = partition(params, r".*/bias")
    >>> trainable["dense"]["kernel"] is None, frozen["dense"]["bias"] is None
    (True, True)
    >>> combine(trainable, frozen)["dense"]["kernel"] is params["dense"]["kernel"]
    True
"""

from __future__ import annotations

from typing import Any

import jax

from peft_jax.core.paths import IsLeaf, path_to_str
from peft_jax.core.select import compile_selector, is_selector
from peft_jax.errors import InvalidConfigError

__all__ = ["partition", "combine", "is_trainable_mask"]

SelectorOrMask = Any  # a Selector, or a pytree of bools with the structure of the tree


def _split(tree: Any, selector: SelectorOrMask, is_leaf: IsLeaf) -> tuple[list, list[bool], Any]:
    """The leaves of ``tree``, one bool per leaf (True = selected), and the tree's treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    leaves = [leaf for _, leaf in flat]
    if is_selector(selector):
        predicate = compile_selector(selector)
        return leaves, [predicate(path_to_str(kp), leaf) for kp, leaf in flat], treedef
    try:  # a pytree of bools with the structure of `tree`
        return leaves, [bool(m) for m in treedef.flatten_up_to(selector)], treedef
    except (ValueError, TypeError) as e:
        raise InvalidConfigError(
            "the selector is neither a selector (regex, names, callable, Rules, None) nor a "
            f"pytree of bools with the structure of the tree: {e}"
        ) from None


def is_trainable_mask(tree: Any, selector: SelectorOrMask, *, is_leaf: IsLeaf = None) -> Any:
    """A pytree of bools with the structure of ``tree``: True where the selector matches.

    Args:
        tree: any pytree.
        selector: a selector (see :mod:`peft_jax.core.select`) or a pytree of bools.
        is_leaf: optional predicate that stops flattening at a subtree.

    Returns:
        The mask, usable with ``optax.masked`` or as the selector of :func:`partition`.

    Example:
        >>> is_trainable_mask({"norm": {"scale": 1.0}, "dense": {"kernel": 2.0}}, r".*norm.*")
        {'dense': {'kernel': False}, 'norm': {'scale': True}}
    """
    _, mask, treedef = _split(tree, selector, is_leaf)
    return treedef.unflatten(mask)


def partition(tree: Any, selector: SelectorOrMask, *, is_leaf: IsLeaf = None) -> tuple[Any, Any]:
    """Splits ``tree`` into ``(trainable, frozen)`` trees of the same structure.

    A leaf goes to ``trainable`` when the selector matches its path (and leaf), otherwise to
    ``frozen``; the other tree holds ``None`` in its place. Works for any pytree, including
    flax NNX ``State`` (the ``None`` sits inside the ``Variable``) and Linen params. A selector
    that matches nothing is not an error here; use :func:`peft_jax.core.select` to insist.

    Args:
        tree: any pytree.
        selector: a selector (see :mod:`peft_jax.core.select`) or a pytree of bools with the
            structure of ``tree`` (e.g. from :func:`is_trainable_mask`).
        is_leaf: optional predicate that stops flattening at a subtree (e.g. keeps NNX
            ``Variable`` objects whole).

    Returns:
        ``(trainable, frozen)``; ``combine(trainable, frozen)`` rebuilds ``tree``.

    Raises:
        InvalidConfigError: a bad regex, or a mask that does not fit the tree.

    Example:
        >>> trainable, frozen = partition({"lora_a": 1.0, "kernel": 2.0}, r"lora_.*")
        >>> trainable, frozen
        ({'kernel': None, 'lora_a': 1.0}, {'kernel': 2.0, 'lora_a': None})
    """
    leaves, mask, treedef = _split(tree, selector, is_leaf)
    trainable = [leaf if m else None for leaf, m in zip(leaves, mask)]
    frozen = [None if m else leaf for leaf, m in zip(leaves, mask)]
    return treedef.unflatten(trainable), treedef.unflatten(frozen)


def _combine(nodes: list[Any]) -> Any:
    present = [n for n in nodes if n is not None]
    if len(present) <= 1:
        return present[0] if present else None
    first = present[0]
    children, treedef = jax.tree_util.tree_flatten(first, is_leaf=lambda x: x is not first)
    if treedef.num_nodes == 1:  # a leaf (or an empty container): the first one wins
        return first
    columns = [children]
    for other in present[1:]:
        kids, other_def = jax.tree_util.tree_flatten(other, is_leaf=lambda x: x is not other)
        if other_def != treedef:
            raise InvalidConfigError(
                f"cannot combine trees of different structure: {treedef} vs {other_def}"
            )
        columns.append(kids)
    return treedef.unflatten([_combine(list(group)) for group in zip(*columns)])


def combine(*trees: Any) -> Any:
    """Merges trees that hold ``None`` placeholders; at each position the first non-None wins.

    The inverse of :func:`partition`: ``combine(*partition(t, s))`` has the treedef of ``t``
    and the very same leaf objects, whatever ``is_leaf`` the partition used.

    Args:
        *trees: pytrees with a common structure wherever more than one of them is not ``None``.

    Returns:
        The merged tree.

    Raises:
        InvalidConfigError: two trees disagree in structure at a position both fill.

    Example:
        >>> combine({"a": None, "b": 2.0}, {"a": 1.0, "b": None})
        {'a': 1.0, 'b': 2.0}
    """
    return _combine(list(trees))
