"""Flax Linen front-end: attach PEFT methods to any ``nn.Module`` by method interception.

The user's module code is not touched. `attach` returns an immutable `Peft` handle; `plan`
traces the module once (no compile) and returns a handle that holds the checked plan; ``init``
adds the adapter variables in the ``"adapters"`` collection, laid out as
``<site path>/<adapter name>/<param>`` (the canonical layout, the same as the NNX front-end's),
and ``apply`` runs the module under ``nn.intercept_methods`` so every adapted site's call goes
through its methods. Planning, folding and merging live in `peft_jax.sites`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft_jax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    >>> x = jnp.ones((2, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> peft = attach(model, peft_jax.LoraConfig(targets=["layers_0"], rank=2)).plan(variables, x)
    >>> variables = peft.init(jax.random.key(1), variables)
    >>> sorted(variables["adapters"]["layers_0"]["default"])
    ['lora_a', 'lora_b']
    >>> bool(jnp.allclose(peft.apply(variables, x), model.apply({"params": variables["params"]}, x)))
    True
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from peft_jax import errors
from peft_jax.core import combine, partition
from peft_jax.core.count import ParamSummary, count_params
from peft_jax.core.paths import items_under
from peft_jax.methods.base import Context, Site, combine_regularizers, fold_result_for, require_mergeable
from peft_jax.ops import EmbedOp, LinearOp, dense_op
from peft_jax.sites import (
    AdapterPlan,
    attend_site,
    count_shared,
    init_shared,
    merge_site,
    plan_adapter,
    run_site,
    unmerge_site,
)
from peft_jax.sites.composition import Block, as_block, run_block
from peft_jax.sites.layers import KINDS, contraction_op, conv_op, describe, einsum_op

COLLECTION = "adapters"
SHARED = "adapter_shared"
SHARED_PARAMS = "adapter_shared_params"
RECORD = "merge_record"

_OPS = {
    nn.Dense: lambda m, shape: dense_op(shape[0], shape[1]),
    nn.DenseGeneral: lambda m, shape: contraction_op(shape, m.axis, m.batch_dims),
    nn.Einsum: lambda m, shape: einsum_op(m.einsum_str, shape),
    nn.Conv: lambda m, shape: conv_op(shape, kernel_size=m.kernel_size,
                                      feature_group_count=m.feature_group_count, mask=m.mask,
                                      strides=m.strides, padding=m.padding,
                                      input_dilation=m.input_dilation,
                                      kernel_dilation=m.kernel_dilation, precision=m.precision),
    nn.Embed: lambda m, shape: EmbedOp(in_shape=shape[:1], out_shape=shape[1:]),
}


def _kernel_name(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _module_op(module: nn.Module) -> LinearOp | None:
    kind = next((k for k in _OPS if isinstance(module, k)), None)
    if kind is None or not module.has_variable("params", _kernel_name(module)):
        return None
    kernel = meta.unbox(module.get_variable("params", _kernel_name(module)))
    return _OPS[kind](module, tuple(kernel.shape))


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _nested_get(tree: dict, path: str) -> Any:
    for part in path.split("/") if path else []:
        tree = tree[part]
    return tree


def _nested_set(tree: dict, path: str, value: Any) -> dict:
    """A copy of ``tree`` with ``value`` at ``path`` (dicts along the way are copied, not mutated)."""
    if not path:
        return value
    head, _, rest = path.partition("/")
    return {**tree, head: _nested_set(tree.get(head, {}), rest, value)}


def _base_only(variables: dict) -> dict:
    return {k: v for k, v in variables.items() if k not in (COLLECTION, SHARED, SHARED_PARAMS, RECORD)}


def _shared(variables: dict, name: str) -> dict:
    """Adapter ``name``'s shared state, frozen and trainable, as methods see it."""
    return {**variables.get(SHARED, {}).get(name, {}), **variables.get(SHARED_PARAMS, {}).get(name, {})}


def _describe_module(module: nn.Module, path: str) -> dict[str, Site | Exception | None]:
    """Both site kinds of one module, computed while tracing (errors kept for later)."""
    found: dict[str, Site | Exception | None] = {}
    params = meta.unbox(module.variables.get("params", {}))
    for kind in KINDS:
        try:
            found[kind] = describe(
                path, kind, op_of=lambda: _module_op(module), layer=type(module).__name__,
                has_bias=module.has_variable("params", "bias"),
                param_shapes=lambda: jax.tree.map(lambda x: tuple(x.shape), dict(params)),
                tap=module)
        except errors.UnsupportedLayerError as e:
            found[kind] = e
    return found


@dataclasses.dataclass(frozen=True)
class Peft:
    """An unmodified Linen module plus named adapters; build it with `attach`, check it with `plan`.

    The handle is an immutable value: ``attach`` and ``plan`` return new handles. Variables live
    in the usual ``variables`` dict: adapter params in ``"adapters"``, shared frozen state in
    ``"adapter_shared"``, merge records in ``"merge_record"``.
    """

    module: nn.Module
    configs: tuple[tuple[str, Any], ...] = ()
    plans: tuple[AdapterPlan, ...] | None = None
    module_paths: tuple[str, ...] = ()

    # -- building ---------------------------------------------------------------------------------
    def attach(self, config: Any, name: str = "default") -> "Peft":
        """A new (unplanned) handle with one more adapter."""
        if name in {n for n, _ in self.configs}:
            raise errors.AdapterNameError(
                f"an adapter named {name!r} is already attached; pass another `name=` "
                f"(attached: {[n for n, _ in self.configs]})")
        return Peft(self.module, self.configs + ((name, config),))

    def plan(self, variables: dict, *args: Any, **kwargs: Any) -> "Peft":
        """Traces the module once (no compile, no FLOPs), checks every adapter, and returns the
        planned handle. Raises `NoMatchError`, `UnsupportedLayerError`, `InvalidConfigError`
        or `IncompatibleMethodsError` before anything is computed."""
        seen: dict[str, dict] = {}
        types: dict[str, str] = {}

        def record(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name == "__call__" and module.path and _path(module) not in seen:
                seen[_path(module)] = _describe_module(module, _path(module))
                types[_path(module)] = type(module).__name__
            return next_fun(*call_args, **call_kwargs)

        def trace(variables):
            with nn.intercept_methods(record):
                self.module.apply(_base_only(variables), *args, **kwargs)

        jax.eval_shape(trace, variables)

        def describe_at(path: str, kind: str) -> Site | None:
            site = seen[path][kind]
            if isinstance(site, Exception):
                raise site
            return site

        paths = tuple(seen)
        plans, kinds = [], {}
        for name, config in self.configs:
            adapter = plan_adapter(name, config, paths, describe_at, type_of=types.get)
            for s in adapter.sites:
                if kinds.setdefault(s.path, s.site.kind) != s.site.kind:
                    raise errors.IncompatibleMethodsError(
                        f"adapter {name!r} wraps {s.path!r} as a {s.site.kind} site but an earlier "
                        f"adapter wraps it as a {kinds[s.path]} site; target other layers")
            plans.append(adapter)
        return dataclasses.replace(self, plans=tuple(plans), module_paths=paths)

    def init(self, key: jax.Array, variables: dict, *args: Any, **kwargs: Any) -> dict:
        """Adds the variables of every adapter not yet in ``variables``.

        A handle from `plan` needs no sample input; otherwise ``args`` / ``kwargs`` are one
        (and the plan is made first). PiSSA / OLoRA inits also replace base kernels in
        ``"params"``.
        """
        planned = self if self.plans is not None and not args and not kwargs \
            else self.plan(variables, *args, **kwargs)
        params = meta.unbox(variables["params"])
        adapters = dict(variables.get(COLLECTION, {}))
        shared_all = dict(variables.get(SHARED, {}))
        shared_params = dict(variables.get(SHARED_PARAMS, {}))
        for adapter in planned.plans:
            if adapter.sites and _has(adapters, f"{adapter.sites[0].path}/{adapter.name}"):
                continue
            counter = iter(range(1 << 30))
            frozen, trainable = init_shared(adapter, lambda: jax.random.fold_in(
                key, zlib.crc32(f"{adapter.name}/shared/{next(counter)}".encode())))
            if frozen:
                shared_all[adapter.name] = frozen
            if trainable:
                shared_params[adapter.name] = trainable
            shared = {**frozen, **trainable}
            for s in adapter.sites:
                values_all = {}
                for i, method in enumerate(s.methods):
                    base = _init_base(params, s)
                    k = jax.random.fold_in(key, zlib.crc32(f"{adapter.name}/{s.path}/{i}".encode()))
                    values, updates = method.init(k, s.site, base, shared)
                    if updates:
                        params = _write_base(params, s, {**base, **updates})
                    values_all.update(values)
                adapters = _nested_set(adapters, f"{s.path}/{adapter.name}", values_all)
        out = {**variables, "params": params, COLLECTION: adapters}
        if shared_all:
            out[SHARED] = shared_all
        if shared_params:
            out[SHARED_PARAMS] = shared_params
        return out

    # -- running ----------------------------------------------------------------------------------
    def apply(self, variables: dict, *args: Any, active: Iterable[str] | Block | None = None,
              enabled: bool = True, rngs: dict | None = None,
              skip: Callable[[str], bool] | None = None, **kwargs: Any) -> Any:
        """Runs the module with its adapters (``active`` names only, if given, or combined by a
        composition block: `Stack`, `Parallel`, `Average` from `peft_jax.sites.composition`).
        Sites whose path ``skip`` holds for run as the base (AdapterDrop at inference:
        ``skip=peft_jax.sites.drop.lowest_layers(n, roles)``).

        Dropout inside methods is on when ``rngs`` holds a ``"dropout"`` key. With
        ``enabled=False`` (or after `merge`) the module runs on its own params. An unplanned
        handle plans from this call's inputs first (at trace time under ``jit``).
        """
        if not enabled or RECORD in variables:
            return self.module.apply(_base_only(variables), *args, rngs=rngs, **kwargs)
        planned = self if self.plans is not None else self.plan(variables, *args, **kwargs)
        block = as_block(active)
        if block is not None:
            block.check([a.name for a in planned._require_plans()])
            active = block.names
        live = planned._select(active)
        by_path: dict[str, list] = {}
        for adapter in live:
            for s in adapter.sites:
                if skip is None or not skip(s.path):
                    by_path.setdefault(s.path, []).append((adapter.name, s))
        adapters = variables.get(COLLECTION, {})

        def intercept(next_fun, call_args, call_kwargs, context):
            module = context.module
            path = _path(module)
            if path not in by_path or context.method_name not in ("__call__", "attend"):
                return next_fun(*call_args, **call_kwargs)
            site = by_path[path][0][1].site
            base = _module_base(module, site)
            noisy = module.has_rng("dropout")
            groups: dict[str, list] = {}
            for name, s in by_path[path]:
                values = _nested_get(adapters, f"{path}/{name}")
                key = module.make_rng("dropout") if noisy and any(m.needs_rng for m in s.methods) else None
                record = _sower(module, name)
                for i, (method, own) in enumerate(s.owned(values)):
                    ctx = Context(None if key is None else jax.random.fold_in(key, i), record)
                    groups.setdefault(name, []).append((method, own, _shared(variables, name), ctx))
            entries = [e for group in groups.values() for e in group]
            x, rest = call_args[0], call_args[1:]
            if context.method_name == "attend":
                return attend_site(entries, site, x, next_fun(*call_args, **call_kwargs), base)

            calls = []

            def call(y, params=None):
                # Linen runs a module's body once per call: Average / Parallel, which call the
                # base once per adapter, run the later ones on a detached copy.
                if params is None and not calls:
                    calls.append(1)
                    return next_fun(y, *rest, **call_kwargs)
                if params is None:
                    params = meta.unbox(dict(module.variables.get("params", {})))
                return module.clone(parent=None).apply({"params": params}, y, *rest, **call_kwargs)

            if block is not None:
                return run_block(block, groups, site, call, x, base)
            return run_site(entries, site, call, x, base)

        with nn.intercept_methods(intercept):
            return self.module.apply(_base_only(variables), *args, rngs=rngs, **kwargs)

    # -- training ---------------------------------------------------------------------------------
    def trainable_selector(self):
        """Selects the leaves that train: the ``"adapters"`` collection plus biases trained in place."""
        in_place = {f"params/{s.path}/{leaf}" for a in self._require_plans() for s in a.sites
                    for m in s.methods for leaf in m.trains_base}

        def selector(path: str, leaf: Any) -> bool:
            return path.startswith((COLLECTION + "/", SHARED_PARAMS + "/")) or path in in_place

        return selector

    def partition(self, variables: dict) -> tuple[dict, dict]:
        """``(trainable, frozen)`` halves of ``variables``; `peft_jax.core.combine` rejoins them."""
        return partition(variables, self.trainable_selector())

    def summary(self, variables: dict) -> ParamSummary:
        """Trainable / total counts (shared frozen state is not counted), with ``by_method``."""
        trainable, frozen = self.partition(meta.unbox(variables))
        t = count_params(trainable)
        params = meta.unbox(variables["params"])
        by_method: dict[tuple[str, str], int] = {}
        for adapter in self._require_plans():
            for s in adapter.sites:
                values = _nested_get(variables[COLLECTION], f"{s.path}/{adapter.name}")
                for method, own in s.owned(values):
                    n = count_params(own)
                    n += sum(count_params(_nested_get(params, f"{s.path}/{leaf}")) for leaf in method.trains_base)
                    key = (adapter.name, method.name)
                    by_method[key] = by_method.get(key, 0) + n
            shared = meta.unbox(variables.get(SHARED_PARAMS, {})).get(adapter.name, {})
            if shared:
                count_shared(by_method, adapter.name, shared, [(s.site, s.methods) for s in adapter.sites])
        return ParamSummary(trainable=t, total=t + count_params(frozen.get("params", {})), by_method=by_method)

    def regularizer(self, variables: dict) -> jax.Array:
        """The methods' loss terms (`Method.regularizer`, combined by `combine_regularizers`:
        AdaLoRA's orthogonality, averaged); ``0.0`` when none has one. Add it to the loss."""
        terms = [(method, term) for s, entries in self._sites(variables)
                 for method, params, shared, _ in entries
                 if (term := method.regularizer(params, shared, s.site)) is not None]
        return combine_regularizers(terms)

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, variables: dict, *, keep_original: bool = True) -> dict:
        """Variables whose params have every adapter folded in; `apply` then skips the adapters.

        With ``keep_original`` the ``"merge_record"`` collection keeps the pre-merge arrays and
        `unmerge` is bitwise exact. A method that cannot merge raises `NotMergeableError`.
        """
        if RECORD in variables:
            raise errors.StateError("these variables are already merged; unmerge them first")
        params = meta.unbox(variables["params"])
        work = self._sites(variables)
        for s, entries in work:
            for method, *_ in entries:
                require_mergeable(method, s.path)
        record = {}
        for s, entries in work:
            merged, rec = merge_site(entries, s.site, _site_base(params, s), keep_original=keep_original)
            params = _write_base(params, s, merged)
            record[s.path] = rec
        return {**variables, "params": params, RECORD: record}

    def unmerge(self, variables: dict) -> dict:
        """Undoes `merge`."""
        if RECORD not in variables:
            raise errors.StateError("these variables are not merged; call merge() first")
        params = meta.unbox(variables["params"])
        for s, entries in self._sites(variables):
            params = _write_base(params, s, unmerge_site(entries, s.site, _site_base(params, s),
                                                         variables[RECORD][s.path]))
        return {k: v for k, v in variables.items() if k != RECORD} | {"params": params}

    def unload(self, variables: dict, *, merge_adapters: bool = True) -> dict:
        """Variables for the plain module: ``{"params": ...}`` (merged, copies swapped in)."""
        merged = self.merge(variables, keep_original=False) if merge_adapters else variables
        return _base_only(merged)

    def fold(self, variables: dict) -> tuple["Peft", dict]:
        """``(handle, variables)`` with methods that have a cheaper form of identical outputs
        replaced by it (prefix tuning's MLP -> flat per-layer prefixes), as `peft_jax.nnx.fold`.

        Example:
            >>> # peft, variables = peft.fold(variables)
        """
        plans, out = [], dict(variables)
        for adapter in self._require_plans():
            sites = list(adapter.sites)
            for method in adapter.methods:
                chosen = [i for i, s in enumerate(sites) if method in s.methods]
                params = {sites[i].path: dict(sites[i].owned(
                    _nested_get(out[COLLECTION], f"{sites[i].path}/{adapter.name}"))[sites[i].methods.index(method)][1])
                    for i in chosen}
                site_list = [sites[i].site for i in chosen]
                folded = method.fold(_shared(out, adapter.name), site_list, params)
                if folded is None:
                    continue
                new, per_site = folded
                for i in chosen:
                    s = sites[i]
                    where = f"{s.path}/{adapter.name}"
                    values = {k: v for k, v in _nested_get(out[COLLECTION], where).items()
                              if k not in params[s.path]}
                    out[COLLECTION] = _nested_set(out[COLLECTION], where, {**values, **per_site[s.path]})
                    replacement = fold_result_for(new, s.path)
                    keys = tuple(tuple(per_site[s.path]) if m == method else k
                                 for m, k in zip(s.methods, s.keys))
                    methods = tuple(replacement if m == method else m for m in s.methods)
                    sites[i] = dataclasses.replace(s, methods=methods, keys=keys)
                kept = set().union(*(fold_result_for(new, s.path).shared_keys([s.site])
                                     for s in (sites[i] for i in chosen)))
                dropped = method.shared_keys(site_list) - kept
                shared = {k: v for k, v in out.get(SHARED_PARAMS, {}).get(adapter.name, {}).items()
                          if k not in dropped}
                out[SHARED_PARAMS] = {**out.get(SHARED_PARAMS, {}), adapter.name: shared}
            plans.append(dataclasses.replace(adapter, sites=tuple(sites)))
        return dataclasses.replace(self, plans=tuple(plans)), out

    # -- the canonical layout ---------------------------------------------------------------------
    def adapter_state(self, variables: dict, name: str | None = None) -> dict[str, jax.Array]:
        """``{"<site path>/<adapter>/<param>": array}`` (+ ``"<adapter>/shared/<param>"``), the
        same flat layout as `peft_jax.nnx.adapter_state` gives for the same architecture."""
        out: dict[str, jax.Array] = {}
        for adapter in self._require_plans():
            if name is not None and adapter.name != name:
                continue
            for s in adapter.sites:
                where = f"{s.path}/{adapter.name}"
                out.update(items_under(where, _nested_get(variables[COLLECTION], where)))
            for collection in (SHARED, SHARED_PARAMS):
                if adapter.name in variables.get(collection, {}):
                    out.update(items_under(f"{adapter.name}/shared", variables[collection][adapter.name]))
        return out

    def load_adapter_state(self, variables: dict, values: dict[str, Any]) -> dict:
        """``variables`` with the canonical flat ``values`` (from either front-end) written in."""
        current = self.adapter_state(variables)
        missing = sorted(set(values) - set(current))
        if missing:
            raise errors.StateError(f"no attached adapter param at {missing[:5]}; attach the same "
                                    "config (and adapter name) before loading")
        out = dict(variables)
        names = {a.name for a in self._require_plans()}
        for key, value in values.items():
            head, _, rest = key.partition("/")
            old = current[key]
            new = jnp.asarray(value, old.dtype).reshape(old.shape)
            if head in names and rest.startswith("shared/"):
                inner = f"{head}/{rest.removeprefix('shared/')}"
                collection = SHARED_PARAMS if _has(out.get(SHARED_PARAMS, {}), inner) else SHARED
                out[collection] = _nested_set(out.get(collection, {}), inner, new)
            else:
                out[COLLECTION] = _nested_set(out[COLLECTION], key, new)
        return out

    # -- helpers ----------------------------------------------------------------------------------
    def _require_plans(self) -> tuple[AdapterPlan, ...]:
        if self.plans is None:
            raise errors.StateError("this Peft handle has no plan yet: peft = peft.plan(variables, "
                                    "*sample_inputs) first (it returns the planned handle)")
        return self.plans

    def _select(self, active: Iterable[str] | None) -> list[AdapterPlan]:
        plans = self._require_plans()
        known = [a.name for a in plans]
        names = set(known) if active is None else set(active)
        unknown = names - set(known)
        if unknown:
            raise errors.AdapterNameError(f"no adapter named {sorted(unknown)}; attached: {known}")
        return [a for a in plans if a.name in names]

    def _sites(self, variables: dict):
        """``(site plan, entries)`` per adapted site, over every adapter (merge order)."""
        by_path: dict[str, tuple] = {}
        for adapter in self._require_plans():
            shared = _shared(variables, adapter.name)
            for s in adapter.sites:
                values = _nested_get(variables[COLLECTION], f"{s.path}/{adapter.name}")
                entries = by_path.setdefault(s.path, (s, []))[1]
                for method, own in s.owned(values):
                    entries.append((method, own, shared, Context()))
        return list(by_path.values())


def _sower(module: nn.Module, adapter: str):
    """Reports go to the ``"intermediates"`` collection as ``<adapter>/<name>`` under the
    site's path (kept when ``apply(..., mutable=["intermediates"])``, else dropped)."""

    def record(name: str, value: jax.Array) -> None:
        module.sow("intermediates", f"{adapter}/{name}", value, reduce_fn=lambda _, new: new,
                   init_fn=lambda: None)

    return record


def _has(tree: dict, path: str) -> bool:
    try:
        _nested_get(tree, path)
        return True
    except KeyError:
        return False


def _kernel_key(params: dict, path: str) -> str:
    return "embedding" if "embedding" in _nested_get(params, path) else "kernel"


def _site_base(params: dict, s) -> dict:
    """The site's base arrays from a params dict: ``{"kernel", "bias"}`` or the module's tree."""
    if s.site.kind not in ("linear", "module"):
        return {}
    if s.site.kind == "module" and not _has(params, s.path):
        return {}  # a module without params of its own (an adapter around an identity)
    layer = _nested_get(params, s.path)
    if s.site.kind != "linear":
        return dict(layer)
    base = {"kernel": layer[_kernel_key(params, s.path)]}
    if "bias" in layer:
        base["bias"] = layer["bias"]
    return base


def _init_base(params: dict, s) -> dict:
    """What a method's ``init`` sees as the site's base (an input tap: the embedding table)."""
    if s.site.kind != "inputs":
        return _site_base(params, s)
    table = _nested_get(params, s.site.embed_path)
    return {"embedding": table["embedding"] if "embedding" in table else table["kernel"]}


def _write_base(params: dict, s, values: dict) -> dict:
    if s.site.kind != "linear":
        return _nested_set(params, s.path, {**_nested_get(params, s.path), **values})
    layer = dict(_nested_get(params, s.path))
    layer[_kernel_key(params, s.path)] = values["kernel"]
    if "bias" in values:
        layer["bias"] = values["bias"]
    return _nested_set(params, s.path, layer)


def _module_base(module: nn.Module, site: Site) -> dict:
    if site.kind != "linear":
        return meta.unbox(dict(module.variables.get("params", {}))) if site.kind == "module" else {}
    base = {"kernel": meta.unbox(module.get_variable("params", _kernel_name(module)))}
    if module.has_variable("params", "bias"):
        base["bias"] = meta.unbox(module.get_variable("params", "bias"))
    return base


def attach(module: nn.Module, config: Any, name: str = "default") -> Peft:
    """Wraps a Linen module (unmodified) with one adapter; chain ``.attach(...)`` for more,
    then ``.plan(variables, *sample_inputs)``.

    Example:
        >>> from flax import linen as nn
        >>> import peft_jax
        >>> peft = attach(nn.Dense(4), peft_jax.LoraConfig(targets=r".*"))
        >>> [n for n, _ in peft.attach(peft_jax.LoraConfig(targets=r".*"), "second").configs]
        ['default', 'second']
    """
    return Peft(module).attach(config, name)


__all__ = ["COLLECTION", "Peft", "attach", "combine"]
