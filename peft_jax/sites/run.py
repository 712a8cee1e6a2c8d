"""Running, merging and unmerging one site with its live methods (both front-ends call this).

An *entry* is ``(method, params, shared, ctx)`` for one method of one adapter on the site.
Methods fold in attach order: each one's ``call`` is the site as the methods before it left it.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import Context, IA3, LinearSite
    >>> from peft_jax.ops import dense_op
    >>> site = LinearSite(path="k", op=dense_op(2, 2), layer="Linear", has_bias=False)
    >>> base = {"kernel": jnp.eye(2)}
    >>> entries = [(IA3(), {"ia3_l": jnp.array([2.0, 3.0])}, {}, Context())]
    >>> run_site(entries, site, lambda x: x @ base["kernel"], jnp.ones((1, 2)), base).tolist()
    [[2.0, 3.0]]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp

from peft_jax import errors
from peft_jax.core.count import count_params
from peft_jax.methods.base import Params, Site, require_mergeable

Entry = tuple[Any, Params, Params, Any]


def _wrap(entry: Entry, site: Site, inner: Callable, base: Params) -> Callable:
    method, params, shared, ctx = entry

    def call(x, **outer):
        # Keyword overrides from an outer method (a trained copy's params) win over inner ones.
        return method.apply(params, shared, site, lambda y, **kw: inner(y, **{**kw, **outer}),
                            x, base, ctx)

    return call


def init_shared(adapter: Any, next_key: Callable[[], Any]) -> tuple[Params, Params]:
    """``(frozen, trainable)``: the shared state of every method of ``adapter``, one namespace
    per adapter (``<adapter>/shared/<param>``); two methods may not share a name."""
    frozen: Params = {}
    trainable: Params = {}
    owner: dict[str, Any] = {}
    for method in adapter.methods:
        sites = adapter.sites_of(method)
        for store, values in ((frozen, method.init_shared(next_key(), sites, jnp.float32)),
                              (trainable, method.init_shared_params(next_key(), sites, jnp.float32))):
            for key, value in values.items():
                if key in owner and owner[key] != method:
                    raise errors.IncompatibleMethodsError(
                        f"{type(owner[key]).__name__} and {type(method).__name__} in adapter "
                        f"{adapter.name!r} both keep shared state named {key!r}; attach one of "
                        "them as a second adapter")
                owner[key] = method
                store[key] = value
    return frozen, trainable


def count_shared(by_method: dict, adapter: str, params: dict, sites: list) -> None:
    """Adds each method's trainable shared params (Compacter's rule, prefix MLP) to its count."""
    methods = dict.fromkeys(m for _, ms in sites for m in ms)
    for method in methods:
        keys = method.shared_keys([site for site, ms in sites if method in ms]) & set(params)
        if keys:
            key = (adapter, method.name)
            by_method[key] = by_method.get(key, 0) + sum(count_params(params[k]) for k in keys)


def run_site(entries: Sequence[Entry], site: Site, call: Callable, x: Any, base: Params) -> Any:
    """The site's output with ``entries`` folded over ``call`` in order."""
    for entry in entries:
        call = _wrap(entry, site, call, base)
    return call(x)


def attend_site(entries: Sequence[Entry], site: Site, query, out, base: Params):
    """A tied embedding head's ``query @ W'.T`` given the base ``out``."""
    for method, params, shared, _ in entries:
        out = method.attend(params, shared, site, query, out, base)
    return out


def merge_site(entries: Sequence[Entry], site: Site, base: Params, *, keep_original: bool
               ) -> tuple[Params, dict]:
    """``(merged base arrays, record)``; raises `NotMergeableError` before changing anything."""
    for method, *_ in entries:
        require_mergeable(method, site.path)
    merged, records = dict(base), []
    for method, params, shared, _ in entries:
        updates, record = method.merge(params, shared, site, merged)
        merged = {**merged, **updates}
        records.append(record)
    return merged, {"original": dict(base) if keep_original else None, "methods": records}


def unmerge_site(entries: Sequence[Entry], site: Site, merged: Params, record: dict) -> Params:
    """The base arrays before `merge_site` (bitwise when the original was kept)."""
    if record["original"] is not None:
        return dict(record["original"])
    for (method, params, shared, _), rec in zip(reversed(entries), reversed(record["methods"])):
        merged = {**merged, **method.unmerge(params, shared, site, merged, rec)}
    return merged
