"""An adapter as plain values: its methods per site and its canonical flat state.

The functions of `peft_jax.arithmetic` take and return adapters as ``(sites, state)``: ``sites``
maps each module path to its method (or tuple of methods, in attach order) and ``state`` is the
canonical flat dict ``{"<path>/<adapter>/<param>": array}`` plus ``"<adapter>/shared/<param>"``
(`peft_jax.nnx.adapter_state`, ``handle.adapter_state``). `as_config` turns ``sites`` back into
a config, so that attaching it under the same adapter name and loading ``state`` rebuilds it.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import Lora
    >>> sites = {"q": Lora(rank=1)}
    >>> state = {"q/a/lora_a": jnp.ones((2, 1)), "q/a/lora_b": jnp.ones((1, 3))}
    >>> adapter_name(sites, state), sorted(site_params(state, "q", "a"))
    ('a', ['lora_a', 'lora_b'])
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax

from peft_jax import errors
from peft_jax.methods.base import Method, Site
from peft_jax.methods.config import Composed, compose, place

Sites = Mapping[str, "Method | Sequence[Method]"]
State = Mapping[str, jax.Array]

__all__ = ["Sites", "State", "adapter_name", "as_config", "method_params", "shared_params", "site_methods",
           "site_params"]


def site_methods(value: Any, path: str = "?") -> tuple[Method, ...]:
    """The methods of one site: a `Method` or a sequence of them."""
    methods = (value,) if isinstance(value, Method) else tuple(value)
    if not methods or not all(isinstance(m, Method) for m in methods):
        raise errors.InvalidConfigError(
            f"site {path!r}: expected a method (e.g. Lora(rank=8)) or a tuple of methods, got {value!r}")
    return methods


def _owner(key: str, paths: Sequence[str]) -> str | None:
    owners = [p for p in paths if key.startswith(p + "/")]
    return max(owners, key=len) if owners else None


def adapter_name(sites: Sites, state: State) -> str:
    """The one adapter name the keys of ``state`` use for the paths of ``sites``."""
    paths, names = list(sites), set()
    for key in state:
        owner = _owner(key, paths)
        parts = key[len(owner) + 1:].split("/") if owner else key.split("/")
        if owner is None and (len(parts) < 3 or parts[1] != "shared"):
            raise errors.StateError(f"state key {key!r} belongs to none of the sites {paths[:5]}")
        names.add(parts[0])
    if len(names) != 1:
        raise errors.StateError(
            f"the state holds adapters {sorted(names)}; pass the state of exactly one adapter "
            "(peft_jax.nnx.adapter_state(model, name))")
    return names.pop()


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def site_params(state: State, path: str, name: str) -> dict[str, Any]:
    """The params of adapter ``name`` at ``path``, nested as the methods hold them."""
    prefix = f"{path}/{name}/"
    return _nest({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def shared_params(state: State, name: str) -> dict[str, Any]:
    """Adapter ``name``'s shared state (VeRA's projections, ...), nested."""
    prefix = f"{name}/shared/"
    return _nest({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def method_params(methods: Sequence[Method], site: Site, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``params`` of one site split per method (each method's own param names)."""
    if len(methods) == 1:
        return [dict(params)]
    out = []
    for m in methods:
        names = set(m.param_shapes(site))
        out.append({k: v for k, v in params.items() if k in names})
    return out


def as_config(sites: Sites) -> Composed:
    """A config placing each site's methods on exactly that path (regex fullmatch).

    Example:
        >>> from peft_jax.methods import Lora
        >>> cfg = as_config({"layers/0/q": Lora(rank=2)})
        >>> cfg.placements()[0].targets
        'layers/0/q'
    """
    return compose(*[place(re.escape(path), m) for path, value in sites.items()
                     for m in site_methods(value, path)])
