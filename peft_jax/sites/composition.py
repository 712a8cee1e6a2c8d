"""AdapterHub's composition blocks over named adapters: `Stack`, `Parallel`, `Average`.

A block says how several adapters attached to one model combine at every site they share:

* ``Stack("a", "b")``: ``b`` wraps what ``a`` returns (the order given, not attach order).
* ``Average("a", "b", weights=(0.7, 0.3))``: the weighted mean of each adapter's output
  (weights default to equal; for additive methods that is the base plus the mean delta).
* ``Parallel("a", "b")``: the batch holds one copy of the inputs per adapter (`replicate`),
  and copy ``i`` runs through adapter ``i`` only: one forward pass serves several tasks.

Activate one with ``peft_jax.nnx.set_active(model, Average("a", "b"))`` or
``peft.apply(variables, x, active=Average("a", "b"))``. A block naming an adapter that is not
attached raises `AdapterNameError` before anything runs.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import Context, IA3, LinearSite
    >>> from peft_jax.ops import dense_op
    >>> site = LinearSite(path="k", op=dense_op(2, 2), layer="Linear", has_bias=False)
    >>> base = {"kernel": jnp.eye(2)}
    >>> groups = {n: [(IA3(), {"ia3_l": jnp.array(v)}, {}, Context())]
    ...           for n, v in (("a", [2.0, 2.0]), ("b", [4.0, 0.0]))}
    >>> run_block(Average("a", "b"), groups, site, lambda x: x @ base["kernel"], jnp.ones((1, 2)),
    ...           base).tolist()
    [[3.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import Params, Site
from peft_jax.sites.run import Entry, run_site


@dataclasses.dataclass(frozen=True, init=False)
class Block:
    """Base of the composition blocks: the adapter names it combines, in order."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        if len(names) < 1 or not all(isinstance(n, str) and n for n in names):
            raise errors.InvalidConfigError(
                f"{type(self).__name__} takes adapter names, e.g. {type(self).__name__}('a', 'b'); "
                f"got {names!r}")
        if len(set(names)) != len(names):
            raise errors.InvalidConfigError(f"{type(self).__name__} names an adapter twice: {names}")
        object.__setattr__(self, "names", tuple(names))

    def check(self, attached: Iterable[str]) -> None:
        """Raises `AdapterNameError` if a name is not an attached adapter."""
        attached = sorted(attached)
        unknown = [n for n in self.names if n not in attached]
        if unknown:
            raise errors.AdapterNameError(
                f"{self!r} names adapter(s) {unknown} that are not attached; attached: {attached}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.names))})"


class Stack(Block):
    """Adapters applied one after another at each site, in the order given."""


class Parallel(Block):
    """Copy ``i`` of a replicated batch runs through adapter ``i`` (see `replicate`)."""


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """The weighted mean of the adapters' outputs at each site (equal weights by default)."""

    weights: tuple[float, ...] = ()

    def __init__(self, *names: str, weights: Sequence[float] | None = None):
        super().__init__(*names)
        w = tuple(float(v) for v in weights) if weights is not None else (1.0 / len(names),) * len(names)
        if len(w) != len(names):
            raise errors.InvalidConfigError(f"Average of {len(names)} adapters got {len(w)} weights")
        object.__setattr__(self, "weights", w)


def as_block(active: Any) -> Block | None:
    """``active`` as a block when it is one (names and ``None`` select adapters instead)."""
    return active if isinstance(active, Block) else None


def replicate(tree: Any, n: int) -> Any:
    """Every array of ``tree`` repeated ``n`` times along the batch axis (for `Parallel`).

    Example:
        >>> replicate({"ids": jnp.ones((2, 3))}, 3)["ids"].shape
        (6, 3)
    """
    return jax.tree.map(lambda a: jnp.concatenate([a] * n, axis=0), tree)


def _chunk(x: Any, i: int, n: int) -> Any:
    def take(a):
        if not isinstance(a, jax.Array) or a.ndim == 0:
            return a
        if a.shape[0] % n:
            raise errors.BatchError(
                f"Parallel over {n} adapters needs a batch of {n} copies of the inputs (see "
                f"peft_jax.sites.composition.replicate); got a batch of {a.shape[0]}")
        size = a.shape[0] // n
        return a[i * size:(i + 1) * size]
    return jax.tree.map(take, x)


def run_block(block: Block, groups: Mapping[str, Sequence[Entry]], site: Site, call: Callable,
              x: Any, base: Params) -> Any:
    """The site's output under ``block``; ``groups`` maps each live adapter to its entries.

    Adapters of the block that do not reach this site run as the bare ``call`` (for `Stack`
    they are skipped; for `Average` and `Parallel` they contribute the base output).
    """
    if site.kind == "inputs" and not isinstance(block, Stack):
        raise errors.IncompatibleMethodsError(
            f"{block!r} cannot combine input methods (prompts) of several adapters at "
            f"{site.path!r}; use Stack, or keep the prompt in one adapter")
    if isinstance(block, Stack):
        entries = [e for name in block.names for e in groups.get(name, ())]
        return run_site(entries, site, call, x, base)
    if isinstance(block, Average):
        outs = [run_site(groups.get(name, ()), site, call, x, base) for name in block.names]
        return jax.tree.map(lambda *o: sum(w * v for w, v in zip(block.weights, o)).astype(o[0].dtype),
                            *outs)
    n = len(block.names)
    outs = [run_site(groups.get(name, ()), site, call, _chunk(x, i, n), base)
            for i, name in enumerate(block.names)]
    return jax.tree.map(lambda *o: jnp.concatenate(o, axis=0), *outs)
