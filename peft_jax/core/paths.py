"""Pytree paths as "/"-joined strings, the one spelling every selector in peft_jax matches against.

A leaf's path is its key path with each key written plainly: dict keys and attribute names as they
are, sequence indices as digits. A trailing ``.value`` attribute is dropped, so a flax NNX ``State``
leaf reads ``"layers/0/kernel"`` rather than ``"layers/0/kernel/value"``.

Example:
    >>> import numpy as np
    >>> tree_paths({"encoder": [{"kernel": np.zeros(2)}], "head": np.zeros(3)})
    ['encoder/0/kernel', 'head']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

__all__ = ["path_to_str", "tree_paths", "tree_items", "map_with_path", "items_under"]

IsLeaf = Callable[[Any], bool] | None


def _key_to_str(key: Any) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_str(keypath: Sequence[Any]) -> str:
    """Writes a JAX key path as a "/"-joined string.

    Args:
        keypath: a key path from ``jax.tree_util.tree_flatten_with_path`` (a tuple of ``DictKey``,
            ``GetAttrKey``, ``SequenceKey`` or ``FlattenedIndexKey``).

    Returns:
        The path, e.g. ``"encoder/layer_0/attn/query/kernel"``. A trailing ``GetAttrKey("value")``
        (the array inside an NNX ``Variable`` or a Linen ``Partitioned`` box) is left out.

    Example:
        >>> from jax.tree_util import DictKey, GetAttrKey, SequenceKey
        >>> path_to_str((DictKey("layers"), SequenceKey(0), DictKey("kernel"), GetAttrKey("value")))
        'layers/0/kernel'
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    return "/".join(_key_to_str(k) for k in keys)


def tree_items(tree: Any, is_leaf: IsLeaf = None) -> list[tuple[str, Any]]:
    """Lists ``(path, leaf)`` pairs of a pytree in flatten order.

    Args:
        tree: any pytree (nested dicts/lists/tuples, an NNX ``State``, Linen params, ...).
        is_leaf: optional predicate that stops flattening at a subtree, as in ``jax.tree.flatten``.

    Returns:
        One ``(path, leaf)`` pair per leaf.

    Example:
        >>> tree_items({"b": 2, "a": (1,)})
        [('a/0', 1), ('b', 2)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(kp), leaf) for kp, leaf in flat]


def tree_paths(tree: Any, is_leaf: IsLeaf = None) -> list[str]:
    """Lists the path of every leaf of a pytree in flatten order.

    Args:
        tree: any pytree.
        is_leaf: optional predicate that stops flattening at a subtree.

    Returns:
        The leaf paths.

    Example:
        >>> tree_paths({"attn": {"q_proj": {"kernel": 0, "bias": 0}}})
        ['attn/q_proj/bias', 'attn/q_proj/kernel']
    """
    return [path for path, _ in tree_items(tree, is_leaf)]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any, is_leaf: IsLeaf = None) -> Any:
    """Like ``jax.tree.map``, but ``fn`` also receives the leaf's path string first.

    Args:
        fn: called as ``fn(path, leaf, *rest_leaves)`` for every leaf of ``tree``.
        tree: the pytree whose structure the result has.
        *rest: more pytrees with the structure of ``tree`` (or with ``tree`` as a prefix).
        is_leaf: optional predicate that stops flattening at a subtree.

    Returns:
        A pytree with the structure of ``tree`` holding ``fn``'s results.

    Example:
        >>> map_with_path(lambda p, x, y: f"{p}={x + y}", {"a": 1, "b": [2]}, {"a": 10, "b": [20]})
        {'a': 'a=11', 'b': ['b/0=22']}
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *xs: fn(path_to_str(kp), x, *xs), tree, *rest, is_leaf=is_leaf
    )


def items_under(prefix: str, tree: Any) -> dict[str, Any]:
    """``{"<prefix>/<path>": leaf}`` for every leaf of ``tree`` (``{prefix: tree}`` for a leaf).

    Example:
        >>> items_under("q/default", {"lora_a": 1, "lora_b": 2}), items_under("x", 3)
        ({'q/default/lora_a': 1, 'q/default/lora_b': 2}, {'x': 3})
    """
    return {f"{prefix}/{p}" if p else prefix: x for p, x in tree_items(tree)}
