"""Selectors: which paths a PEFT method targets, which leaves train, which rank goes where.

A *selector* is one of

* a ``str``: a regex that must match the whole path (``re.fullmatch``);
* a list/tuple/set of names: a path matches a name when it equals the name or ends with
  ``"/" + name`` (the HF PEFT ``target_modules`` rule, so ``"q_proj"`` matches
  ``"layers/0/attn/q_proj"`` but not ``"layers/0/attn/xq_proj"``);
* a callable ``(path, leaf) -> bool``;
* a :class:`Rules` (a path matches when the rule it gets has a truthy value);
* ``None``, which matches nothing.

Matching is done on whatever path string is given: module paths (``"layers/0/attn/q_proj"``) or
leaf paths (``"layers/0/attn/q_proj/kernel"``, for which the name ``"q_proj"`` does not match; use
``"kernel"``, ``"q_proj/kernel"`` or a regex such as ``r".*q_proj/kernel"``).

Example:
    >>> paths = ["layers/0/attn/q_proj", "layers/0/attn/v_proj", "layers/0/mlp/up"]
    >>> select(paths, ["q_proj", "v_proj"])
    ['layers/0/attn/q_proj', 'layers/0/attn/v_proj']
    >>> Rules([(["q_proj"], 16), (r".*mlp.*", 4)], default=8).lookup("layers/0/mlp/up")
    4
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

from peft_jax.core.paths import IsLeaf, tree_items
from peft_jax.errors import InvalidConfigError, NoMatchError

__all__ = ["Selector", "is_selector", "compile_selector", "Rules", "select", "nearest_paths",
           "explain", "Explanation"]

Selector = Union[str, Sequence[str], Callable[[str, Any], bool], "Rules", None]
_NAME_CONTAINERS = (list, tuple, set, frozenset)


def _is_names(selector: Any) -> bool:
    return isinstance(selector, _NAME_CONTAINERS) and all(isinstance(n, str) for n in selector)


def is_selector(x: Any) -> bool:
    """True when ``x`` is a selector rather than a pytree mask of bools.

    Example:
        >>> is_selector(["q_proj"]), is_selector({"kernel": True})
        (True, False)
    """
    return x is None or isinstance(x, (str, Rules)) or callable(x) or _is_names(x)


def compile_selector(selector: Selector) -> Callable[[str, Any], bool]:
    """Turns a selector into a predicate ``(path, leaf) -> bool``.

    Args:
        selector: a regex string, a collection of names, a callable ``(path, leaf) -> bool``,
            a :class:`Rules`, or ``None`` (matches nothing).

    Returns:
        The predicate.

    Raises:
        InvalidConfigError: the regex does not compile, or the selector has an unsupported type.

    Example:
        >>> match = compile_selector(["q_proj"])
        >>> match("attn/q_proj", None), match("attn/xq_proj", None)
        (True, False)
        >>> compile_selector(r".*/(q|v)_proj")("attn/v_proj", None)
        True
    """
    if selector is None:
        return lambda path, leaf: False
    if isinstance(selector, Rules):
        return lambda path, leaf: bool(selector.lookup(path, leaf))
    if isinstance(selector, str):
        try:
            regex = re.compile(selector)
        except re.error as e:
            raise InvalidConfigError(
                f"selector regex {selector!r} does not compile ({e}); a string selector is a "
                "regex matched against the whole '/'-joined path, e.g. r'.*attn/(q|v)_proj'"
            ) from None
        return lambda path, leaf: regex.fullmatch(path) is not None
    if _is_names(selector):
        names = frozenset(selector)
        suffixes = tuple("/" + n for n in names)
        return lambda path, leaf: path in names or path.endswith(suffixes)
    if callable(selector):
        return lambda path, leaf: bool(selector(path, leaf))
    raise InvalidConfigError(
        f"unsupported selector {selector!r}: pass a regex string, a list of names, "
        "a callable (path, leaf) -> bool, a Rules, or None"
    )


class Rules:
    """An ordered list of ``(selector, value)`` rules; the first rule that matches a path wins.

    Used for per-target overrides (``{r".*q_proj": 16}`` for rank or alpha) and, with boolean
    values, for choosing trainable leaves.

    Args:
        rules: ``(selector, value)`` pairs, or a mapping ``{selector: value}`` (its order is kept).
        default: the value for a path no rule matches.

    Example:
        >>> rules = Rules([(["q_proj"], 16), (r".*mlp.*", 4)], default=8)
        >>> rules.match("layers/0/attn/q_proj"), rules.match("layers/0/norm")
        ((0, 16), (None, 8))
    """

    def __init__(self, rules: Iterable[tuple[Selector, Any]] | Mapping[Any, Any],
                 default: Any = None) -> None:
        pairs = tuple(rules.items() if isinstance(rules, Mapping) else rules)
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise InvalidConfigError(
                    f"each rule must be a (selector, value) pair, got {pair!r}"
                )
        self.rules: tuple[tuple[Selector, Any], ...] = pairs
        self.default = default
        self._predicates = tuple(compile_selector(s) for s, _ in pairs)

    def match(self, path: str, leaf: Any = None) -> tuple[int | None, Any]:
        """Returns ``(index of the first matching rule, its value)``, or ``(None, default)``.

        Example:
            >>> Rules({r".*/kernel": True}, default=False).match("dense/kernel")
            (0, True)
        """
        for i, predicate in enumerate(self._predicates):
            if predicate(path, leaf):
                return i, self.rules[i][1]
        return None, self.default

    def lookup(self, path: str, leaf: Any = None) -> Any:
        """Returns the value of the first matching rule, or the default.

        Example:
            >>> Rules([(r".*mlp.*", 4)], default=8).lookup("layers/0/attn/q_proj")
            8
        """
        return self.match(path, leaf)[1]

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"Rules({list(self.rules)!r}, default={self.default!r})"


def _describe(selector: Selector) -> str:
    if isinstance(selector, str):
        return f"regex {selector!r}"
    if _is_names(selector):
        return f"names {sorted(selector)!r}"
    if callable(selector) and not isinstance(selector, Rules):
        return f"callable {getattr(selector, '__qualname__', repr(selector))}"
    return repr(selector)


def _queries(selector: Selector) -> list[str]:
    """Plain strings to compare real paths against when suggesting near matches."""
    if isinstance(selector, str):  # drop regex syntax: r".*attn/(q)_proj" -> "attn/q_proj"
        return [re.sub(r"\\.|\[[^\]]*\]|[\^$.*+?(){}|]", "", selector)]
    if _is_names(selector):
        return sorted(selector)
    if isinstance(selector, Rules):
        return [q for s, _ in selector.rules for q in _queries(s)]
    return []


def nearest_paths(selector: Selector, paths: Sequence[str], k: int = 10) -> list[str]:
    """Up to ``k`` real paths most similar to what the selector names (difflib ratios).

    Each path is scored on the whole string and on its last component, so ``"q_prj"`` finds
    ``"layers/0/attn/q_proj"``.

    Example:
        >>> nearest_paths(["q_prj"], ["mlp/up", "attn/q_proj", "attn/k_proj"], k=1)
        ['attn/q_proj']
    """
    queries = _queries(selector)
    if not queries:
        return list(paths[:k])

    def score(path: str) -> float:
        last = path.rsplit("/", 1)[-1]
        return max(
            max(difflib.SequenceMatcher(None, q, path).ratio(),
                difflib.SequenceMatcher(None, q.rsplit("/", 1)[-1], last).ratio())
            for q in queries
        )

    return sorted(dict.fromkeys(paths), key=score, reverse=True)[:k]


def _as_items(paths_or_tree: Any, is_leaf: IsLeaf) -> list[tuple[str, Any]]:
    x = paths_or_tree
    if isinstance(x, (list, tuple)):
        if all(isinstance(p, str) for p in x):
            return [(p, None) for p in x]
        if all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in x):
            return list(x)
    return tree_items(x, is_leaf)


def select(paths_or_items: Any, selector: Selector, *, what: str = "target",
           is_leaf: IsLeaf = None) -> list[str]:
    """Returns the paths a selector matches, and fails loudly when it matches none.

    Args:
        paths_or_items: a list of path strings, a list of ``(path, leaf)`` pairs, or a pytree
            (whose leaf paths are used).
        selector: see the module docstring.
        what: what the selector is for, used in the error message ("target", "trainable", ...).
        is_leaf: when a pytree is given, an optional predicate that stops flattening.

    Returns:
        The matched paths, in the given order.

    Raises:
        NoMatchError: nothing matched; the message names the selector and lists the nearest
            real paths.

    Example:
        >>> select(["attn/q_proj/kernel", "attn/q_proj/bias"], r".*/kernel")
        ['attn/q_proj/kernel']
    """
    items = _as_items(paths_or_items, is_leaf)
    predicate = compile_selector(selector)
    hits = [path for path, leaf in items if predicate(path, leaf)]
    if hits:
        return hits
    paths = [path for path, _ in items]
    if not paths:
        raise NoMatchError(f"{what} selector {_describe(selector)} has no paths to match: "
                           "the tree (or path list) is empty")
    near = "\n".join(f"  {p}" for p in nearest_paths(selector, paths))
    as_name = compile_selector([selector]) if isinstance(selector, str) else None
    hint = ""
    if as_name is not None and any(as_name(p, None) for p in paths):
        hint = f"Did you mean the name list [{selector!r}]? "
    raise NoMatchError(
        f"{what} selector {_describe(selector)} matched none of the {len(paths)} paths. "
        f"Nearest real paths:\n{near}\n{hint}"
        "A string is a regex that must match the whole '/'-joined path; a list of names matches "
        "a path equal to a name or ending in '/' + name. Check the names with "
        "peft_jax.core.explain(tree, selector) or list them with peft_jax.core.tree_paths(tree)."
    )


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Which rule matched which path; ``print()`` it for an aligned table.

    Attributes:
        rows: ``(path, index of the matching rule or None, value)`` per path.
        rules: the rules that were applied.
    """

    rows: list[tuple[str, int | None, Any]]
    rules: Rules

    @property
    def matched(self) -> list[str]:
        """The paths some rule matched."""
        return [path for path, index, _ in self.rows if index is not None]

    def __str__(self) -> str:
        lines = ["rules (first match wins):"]
        lines += [f"  [{i}] {_describe(s)} -> {v!r}" for i, (s, v) in enumerate(self.rules.rules)]
        lines.append(f"  [-] default -> {self.rules.default!r}")
        width = max([len("path")] + [len(p) for p, _, _ in self.rows])
        lines.append(f"{'path':<{width}}  rule  value")
        for path, index, value in self.rows:
            lines.append(f"{path:<{width}}  {'-' if index is None else index:>4}  {value!r}")
        return "\n".join(lines)


def explain(tree_or_paths: Any, selector_or_rules: Selector, *,
            is_leaf: IsLeaf = None) -> Explanation:
    """Reports which rule matched which path (a plain selector is the rule ``selector -> True``).

    Args:
        tree_or_paths: a pytree, a list of path strings, or a list of ``(path, leaf)`` pairs.
        selector_or_rules: a :class:`Rules` or any selector.
        is_leaf: when a pytree is given, an optional predicate that stops flattening.

    Returns:
        An :class:`Explanation`; ``print`` it to see the table.

    Example:
        >>> rules = Rules([(["q_proj"], 16), (r".*mlp.*", 4)], default=8)
        >>> print(explain(["attn/q_proj", "mlp/up", "norm"], rules))
        rules (first match wins):
          [0] names ['q_proj'] -> 16
          [1] regex '.*mlp.*' -> 4
          [-] default -> 8
        path         rule  value
        attn/q_proj     0  16
        mlp/up          1  4
        norm            -  8
    """
    rules = (selector_or_rules if isinstance(selector_or_rules, Rules)
             else Rules([(selector_or_rules, True)], default=False))
    rows = [(path, *rules.match(path, leaf)) for path, leaf in _as_items(tree_or_paths, is_leaf)]
    return Explanation(rows=rows, rules=rules)
