"""Planning an adapter: every check runs here, before anything is built or changed.

A selector that matches nothing, a method on a layer type it cannot handle, two methods that
cannot share a layer, and each method's own ``check`` (ranks, factors, block sizes, indices) all
fail here with a typed error.

Example:
    >>> from peft_jax.methods import LoraConfig
    >>> from peft_jax.methods.base import LinearSite
    >>> from peft_jax.ops import dense_op
    >>> site = LinearSite(path="q", op=dense_op(4, 4), layer="Linear", has_bias=True)
    >>> plan = plan_adapter("default", LoraConfig(targets=["q"], rank=2, bias="lora_only"),
    ...                     ["q", "k"], lambda path, kind: site if path == "q" else None)
    >>> [(s.path, [m.name for m in s.methods]) for s in plan.sites]
    [('q', ['lora', 'bias'])]
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

from peft_jax import errors
from peft_jax.core.select import compile_selector, select
from peft_jax.methods.base import Method, Site
from peft_jax.sites.layers import KINDS

#: what a model author adds for each tap kind (named in MissingHookError messages).
HOOKS = {
    "inputs": "call `embeds, mask = self.input_tap(Inputs(embeds, mask))` on the word embeddings, "
              "with `self.input_tap = peft_jax.hooks.InputTap(...)`, and accept "
              "inputs_embeds= / attention_mask=",
    "attention": "route the attention math through `self.attention_tap(Attention(q, k, v, mask), "
                 "attend)` with `self.attention_tap = peft_jax.hooks.AttentionTap(...)`, or give "
                 "the attention module an attention_fn attribute",
    "residual": "combine each sub-layer's output with the residual stream through "
                "`self.ffn_residual(Residual(y, x, norm))` (`peft_jax.hooks.ResidualTap`), or "
                "target the sub-layer modules themselves",
}


def missing_hook(kinds) -> str:
    """What to add to a model so it offers a site of one of ``kinds``."""
    return "; or ".join(HOOKS[k] for k in sorted(kinds) if k in HOOKS)

RESERVED = frozenset({"base_layer", "site", "adapter_order", "enabled", "merge_record", "shared"})
Describe = Callable[[str, str], "Site | None"]


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """The methods one adapter puts on one site, in the order they fold."""

    path: str
    site: Site
    methods: tuple[Method, ...]
    #: each method's top-level param names, aligned with ``methods`` (computed once, when planned).
    keys: tuple[tuple[str, ...], ...] = ()

    def owned(self, values: dict) -> list[tuple[Method, dict]]:
        """``(method, its params)`` pairs from the site's params of one adapter."""
        return [(m, {k: values[k] for k in keys}) for m, keys in zip(self.methods, self.keys)]


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """One named adapter: its config and its checked sites."""

    name: str
    config: Any
    sites: tuple[SitePlan, ...]

    @property
    def methods(self) -> tuple[Method, ...]:
        """Every distinct method value of the adapter, first-use order (for shared state)."""
        seen: dict[Method, None] = {}
        for s in self.sites:
            for m in s.methods:
                seen.setdefault(m, None)
        return tuple(seen)

    def sites_of(self, method: Method) -> list[Any]:
        return [s.site for s in self.sites if method in s.methods]


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name in RESERVED:
        raise errors.AdapterNameError(
            f"adapter name {name!r} is not allowed: use a non-empty string without '/' that is "
            f"not one of {sorted(RESERVED)}")


def _site_for(path: str, methods: list[Method], describe: Describe, module_type: str) -> Site:
    kinds = set(methods[0].sites)
    for m in methods[1:]:
        if not kinds & set(m.sites):
            first = next(o for o in methods if not set(o.sites) & set(m.sites))
            raise errors.IncompatibleMethodsError(
                f"{type(first).__name__} and {type(m).__name__} cannot share layer {path!r}: one "
                f"wraps it as a {'/'.join(first.sites)} site, the other as a {'/'.join(m.sites)} "
                "site; put them on different layers")
        kinds &= set(m.sites)
    for kind in KINDS:
        if kind in kinds:
            site = describe(path, kind)
            if site is not None:
                return site
    names = ", ".join(sorted({type(m).__name__ for m in methods}))
    if not kinds & {"linear", "module"}:
        raise errors.MissingHookError(
            f"{path!r} ({module_type}) matched the targets of {names}, which attach to "
            f"{' or '.join(sorted(kinds))} taps only, and it is not one: {missing_hook(kinds)}")
    raise errors.UnsupportedLayerError(
        f"layer {path!r} ({module_type}) matched the targets of {names} but cannot take it: "
        "supported layers are Dense/Linear, DenseGeneral/LinearGeneral, Einsum, Conv and Embed. "
        "Narrow the targets to those layers.")


def plan_adapter(name: str, config: Any, paths: Sequence[str], describe: Describe,
                 type_of: Callable[[str], str] = lambda p: "module") -> AdapterPlan:
    """Checks ``config`` against a model's module paths and returns its `AdapterPlan`.

    Args:
        name: the adapter's name.
        config: anything with ``placements()`` (`LoraConfig`, `place`, `compose`).
        paths: every module path of the model, in model order.
        describe: the front-end's ``(path, kind) -> Site | None`` (``None``: not that kind).
        type_of: the class name at a path (for error messages).
    """
    check_name(name)
    if not hasattr(config, "placements"):
        raise errors.InvalidConfigError(
            f"attach() takes a config such as LoraConfig(...) or place(targets, method), got {config!r}")
    chosen: dict[str, list[Method]] = {}
    optional: set[tuple[str, int]] = set()
    for placement in config.placements():
        kind = getattr(placement, "kind", None)
        if placement.optional or kind is not None:
            match = compile_selector(placement.targets)
            hits = [p for p in paths if match(p, None)]
        else:
            hits = select(list(paths), placement.targets, what=placement.what)
        if kind is not None:
            hits = _taps(hits, kind, placement, describe)
        for path in hits:
            methods = chosen.setdefault(path, [])
            if placement.optional:
                optional.add((path, len(methods)))
            methods.append(placement.method_for(path))
    sites = []
    for path in paths:
        if path not in chosen:
            continue
        methods = _usable(path, chosen[path], optional, describe, type_of(path))
        if methods:
            sites.append(SitePlan(path, _site_for(path, methods, describe, type_of(path)), tuple(methods)))
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        for i, s in enumerate(sites):
            for m in s.methods:
                m.check(s.site)
            sites[i] = dataclasses.replace(s, keys=_param_keys(s))
    if notes:  # one warning per attach, however many layers it concerns
        warnings.warn("; ".join(dict.fromkeys(str(n.message) for n in notes)), notes[0].category,
                      stacklevel=3)
    return AdapterPlan(name=name, config=config, sites=tuple(sites))


def _taps(hits: list[str], kind: str, placement: Any, describe: Describe) -> list[str]:
    """The paths among ``hits`` that are taps of ``kind`` (and pass ``placement.where``)."""
    sites = {p: describe(p, kind) for p in hits}
    taps = [p for p in hits if sites[p] is not None]
    if not taps:
        method = placement.method_for("")
        raise errors.MissingHookError(
            f"{type(method).__name__} attaches to {kind} taps, and the model has none among its "
            f"{placement.what}. To add one: {HOOKS[kind]}")
    where = getattr(placement, "where", None)
    return [p for p in taps if where is None or where(sites[p])]


def _usable(path, methods, optional, describe, module_type) -> list[Method]:
    """The methods of ``path``, less optional ones the layer cannot take."""
    required = [m for i, m in enumerate(methods) if (path, i) not in optional]
    keep = []
    for i, m in enumerate(methods):
        if (path, i) in optional:
            try:
                site = _site_for(path, required + [m], describe, module_type)
                m.check(site)
            except errors.PeftError:
                continue
        keep.append(m)
    return keep


def _param_keys(s: SitePlan) -> tuple[tuple[str, ...], ...]:
    """Each method's param names; two methods of one adapter may not own the same name."""
    owner: dict[str, Method] = {}
    keys = []
    for m in s.methods:
        keys.append(tuple(m.param_shapes(s.site)))
        for key in keys[-1]:
            if key in owner:
                raise errors.IncompatibleMethodsError(
                    f"{type(owner[key]).__name__} and {type(m).__name__} cannot share layer "
                    f"{s.path!r} in one adapter: both own a param named {key!r}; attach one of them "
                    "as a second adapter")
            owner[key] = m
    return tuple(keys)
