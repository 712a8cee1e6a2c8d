"""Flax NNX front-end: attach PEFT methods to any ``nnx.Module`` by module surgery.

Every adapted module ``m`` is replaced in its parent by an `AdaptedLayer` that keeps ``m`` as
``base_layer`` and holds one `AdapterSlot` per adapter name, so the state layout is the library's
canonical one, ``<site path>/<adapter name>/<param>`` (the same as Linen's ``"adapters"``
collection). Adapter variables are `AdapterParam`, a subclass of ``nnx.LoRAParam``, so the usual
NNX idioms select them: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``. Planning, checks, the
folding of methods and merging live in `peft_jax.sites`; this file only moves arrays in and out
of modules.

Example:
    >>> from flax import nnx
    >>> import peft_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> _ = attach(model, peft_jax.LoraConfig(targets=r"layers/\\d+", rank=2), rngs=nnx.Rngs(2))
    >>> print(summary(model))
    trainable params: 44 || all params: 102 || trainable%: 43.1373
    >>> sorted(summary(model).by_method.items())
    [(('default', 'lora'), 44)]
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax import errors
from peft_jax.core.count import ParamSummary, count_params
from peft_jax.core.paths import items_under
from peft_jax.hooks.roles import Roles
from peft_jax.methods.base import (
    Context,
    Method,
    Site,
    combine_regularizers,
    fold_result_for,
    require_mergeable,
)
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
from peft_jax.sites.drop import lowest_layers
from peft_jax.sites.layers import contraction_op, conv_op, describe, einsum_op


class AdapterParam(nnx.LoRAParam):
    """A variable a PEFT method added (LoRA factors, DoRA magnitudes, IA3 vectors, copies)."""


class TrainedParam(nnx.LoRAParam):
    """A base-model variable that a method trains in place (BitFit biases)."""


class SharedState(nnx.Variable):
    """Frozen state a method creates once per adapter (VeRA's random projections)."""


class MergeRecord(nnx.Variable):
    """What `unmerge` needs: the arrays before merging and the methods' records. Never trained."""


# --- which NNX layers are linear ops of their kernels -------------------------------------------
_OPS: dict[type, Callable[[Any], LinearOp]] = {
    nnx.Linear: lambda m: dense_op(m.in_features, m.out_features),
    nnx.LinearGeneral: lambda m: contraction_op(tuple(m.kernel.shape), m.axis, m.batch_axis),
    nnx.Einsum: lambda m: einsum_op(m.einsum_str, tuple(m.kernel.shape)),
    nnx.Conv: lambda m: conv_op(tuple(m.kernel.shape), kernel_size=m.kernel_size,
                                feature_group_count=m.feature_group_count, mask=m.mask,
                                strides=m.strides, padding=m.padding,
                                input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
                                precision=m.precision),
    nnx.Embed: lambda m: EmbedOp(in_shape=(m.num_embeddings,), out_shape=(m.features,)),
}


def layer_op(module: nnx.Module) -> LinearOp | None:
    """The `LinearOp` of a supported layer, or ``None`` for other modules."""
    if isinstance(module, AdaptedLayer):
        module = module.base_layer
    for kind, make in _OPS.items():
        if isinstance(module, kind):
            return make(module)
    return None


def _kernel_name(module: nnx.Module) -> str:
    return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _own_params(module: nnx.Module) -> dict:
    """The module's ``nnx.Param`` arrays as a nested dict (adapter wrappers excluded)."""
    state = nnx.state(module, nnx.Param)
    return nnx.to_pure_dict(state)


def _describe(module: nnx.Module, path: str, kind: str) -> Site | None:
    bias = getattr(module, "bias", None)
    return describe(path, kind, op_of=lambda: layer_op(module), layer=type(module).__name__,
                    has_bias=isinstance(bias, nnx.Variable) and bias is not None,
                    param_shapes=lambda: jax.tree.map(lambda x: tuple(x.shape), _own_params(module)),
                    tap=module)


# --- the modules surgery inserts -----------------------------------------------------------------
def _variables(values: dict, kind: type) -> nnx.Dict:
    return nnx.Dict({k: _variables(v, kind) if isinstance(v, dict) else kind(v) for k, v in values.items()})


def _values(node: Any) -> Any:
    if isinstance(node, nnx.Variable):
        return node[...]
    return {k: _values(v) for k, v in node.items()}


class SharedBank(nnx.Module):
    """An adapter's shared state, referenced by each of its slots (stored once): frozen
    ``values`` (VeRA's projections) and trainable ``params`` (Compacter's shared PHM rule)."""

    def __init__(self, values: dict, params: dict):
        self.values = _variables(values, SharedState)
        self.params = _variables(params, AdapterParam)

    def all(self) -> dict:
        return {**_values(self.values), **_values(self.params)}


class AdapterSlot(nnx.Module):
    """One named adapter on one site: its methods, their params, and its switches."""

    def __init__(self, methods: tuple[Method, ...], params: list[dict], shared: SharedBank | None,
                 rngs: nnx.Rngs):
        self.methods = methods
        self.param_names = tuple(tuple(p) for p in params)
        for values in params:
            for key, value in values.items():
                setattr(self, key, _variables(value, AdapterParam) if isinstance(value, dict) else AdapterParam(value))
        self.shared = shared
        self.deterministic = False  # nnx's model.train() / model.eval() flip it, as for nnx.Dropout
        needs_rng = any(m.needs_rng for m in methods)
        self.rngs = rngs["dropout"].fork() if needs_rng else nnx.data(None)
        self.active = True
        self.merged = False
        self.recording = False

    def entries(self) -> list[tuple]:
        shared = {} if self.shared is None else self.shared.all()
        key = None if self.deterministic or self.rngs is None else self.rngs()
        record = self._record if self.recording else None
        return [(m, {k: _values(getattr(self, k)) for k in names}, shared,
                 Context(None if key is None else jax.random.fold_in(key, i), record))
                for i, (m, names) in enumerate(zip(self.methods, self.param_names))]

    def _record(self, name: str, value: jax.Array) -> None:
        self.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


class AdaptedLayer(nnx.Module):
    """A module (``base_layer``) with named adapters wrapping its calls."""

    def __init__(self, base_layer: nnx.Module, site: Site):
        self.base_layer = base_layer
        self.site = site
        self.adapter_order: tuple[str, ...] = ()
        self.enabled = True
        self.merge_record = nnx.data(None)
        self.composition = None  # a composition Block (Stack / Parallel / Average), or None

    @property
    def kernel(self) -> nnx.Variable:
        return getattr(self.base_layer, _kernel_name(self.base_layer))

    def slots(self) -> list[tuple[str, AdapterSlot]]:
        return [(name, getattr(self, name)) for name in self.adapter_order]

    def _live(self) -> list[AdapterSlot]:
        if not self.enabled:
            return []
        return [s for _, s in self.slots() if s.active and not s.merged]

    def _base(self) -> dict:
        if self.site.kind == "linear":
            base = {"kernel": self.kernel[...]}
            bias = getattr(self.base_layer, "bias", None)
            if isinstance(bias, nnx.Variable):
                base["bias"] = bias[...]
            return base
        return _own_params(self.base_layer)

    def _write_base(self, values: dict) -> None:
        if self.site.kind == "linear":
            self.kernel[...] = values["kernel"]
            if "bias" in values:
                self.base_layer.bias[...] = values["bias"]
            return
        _assign(self.base_layer, values)

    def __call__(self, x, *args, **kwargs):
        live = self._live()
        if not live:
            return self.base_layer(x, *args, **kwargs)

        def call(y, params=None):
            if params is None:
                return self.base_layer(y, *args, **kwargs)
            return _call_with(self.base_layer, params, y, args, kwargs)

        if self.composition is not None:
            groups = {name: slot.entries() for name, slot in self.slots() if slot in live}
            return run_block(self.composition, groups, self.site, call, x, self._base())
        entries = [e for slot in live for e in slot.entries()]
        return run_site(entries, self.site, call, x, self._base())

    def attend(self, query):
        """Tied-head use of an adapted ``nnx.Embed``: ``query @ W'.T``."""
        out = self.base_layer.attend(query)
        entries = [e for slot in self._live() for e in slot.entries()]
        return attend_site(entries, self.site, query, out, self._base()) if entries else out


def _assign(module: nnx.Module, values: dict) -> None:
    """Writes a nested dict of arrays into the module's ``nnx.Param`` variables."""
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(module, state)


def _call_with(module: nnx.Module, params: dict, x, args, kwargs):
    """Calls a copy of ``module`` whose params are ``params`` (the module itself is untouched)."""
    copy = nnx.merge(*nnx.split(module), copy=True)
    _assign(copy, params)
    return copy(x, *args, **kwargs)


# --- surgery helpers ------------------------------------------------------------------------------
def _modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, module)`` for every module a user can target (not our wrappers' insides)."""
    items = [("/".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model) if path]
    inside = [key for key, m in items if isinstance(m, AdaptedLayer)]  # children come first
    return [(key, m) for key, m in items
            if not isinstance(m, (nnx.Dict, nnx.List, AdapterSlot, SharedBank))
            and not any(key.startswith(prefix + "/") for prefix in inside)]


def _parent_and_key(model: nnx.Module, path: str) -> tuple[Any, Any]:
    parts = path.split("/")
    parent = model
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, (list, nnx.List)) else (
            parent[part] if isinstance(parent, (dict, nnx.Dict)) else getattr(parent, part))
    last = parts[-1]
    return parent, (int(last) if isinstance(parent, (list, nnx.List)) else last)


def _replace(model: nnx.Module, path: str, new: nnx.Module) -> None:
    parent, key = _parent_and_key(model, path)
    if isinstance(parent, (list, dict, nnx.List, nnx.Dict)):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _retag(module: nnx.Module, old: type, new: type, names: tuple[str, ...] | None = None) -> None:
    """Turns ``old`` variables (exactly that type) of ``module`` into ``new`` ones, in place.

    ``names`` limits it to the module's own attributes of those names; ``None`` walks every
    submodule.
    """
    subs = [module] if names is not None else [m for _, m in nnx.iter_modules(module)]
    for sub in subs:
        for name, value in list(vars(sub).items()):
            if type(value) is old and (names is None or name in names):
                setattr(sub, name, new(value[...]))


def adapted_layers(model: nnx.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(path, AdaptedLayer)`` for every adapted site of ``model``."""
    for path, module in _modules(model):
        if isinstance(module, AdaptedLayer):
            yield path, module


def adapter_names(model: nnx.Module) -> set[str]:
    """Names of the adapters attached anywhere in ``model``."""
    return {n for _, layer in adapted_layers(model) for n in layer.adapter_order}


def plan(model: nnx.Module, config: Any, name: str = "default") -> AdapterPlan:
    """Checks ``config`` against ``model`` and returns what `attach` would build; changes nothing."""
    modules = _modules(model)
    by_path = dict(modules)

    def describe_at(path: str, kind: str) -> Site | None:
        module = by_path[path]
        if isinstance(module, AdaptedLayer):
            if module.site.kind != kind:
                return None
            return module.site
        return _describe(module, path, kind)

    return plan_adapter(name, config, [p for p, _ in modules], describe_at,
                        type_of=lambda p: type(by_path[p]).__name__)


# --- public API -----------------------------------------------------------------------------------
def attach(model: nnx.Module, config: Any, *, rngs: nnx.Rngs, name: str = "default") -> nnx.Module:
    """Adds adapter ``name`` (any config: `LoraConfig`, `place`, `compose`) to ``model``, in place.

    All checks (targets match, layer types, method settings, a free name) run before anything
    changes. Returns ``model``.

    Example:
        >>> from flax import nnx
        >>> import peft_jax
        >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
        >>> _ = attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1))
        >>> type(model.layers[0]).__name__, model.layers[0].default.lora_a.shape
        ('AdaptedLayer', (4, 2))
    """
    if name in adapter_names(model):
        raise errors.AdapterNameError(
            f"an adapter named {name!r} is already attached; pass another `name=` or detach it "
            f"first (attached: {sorted(adapter_names(model))})")
    adapter = plan(model, config, name)
    by_path = dict(_modules(model))
    layers = {}
    for s in adapter.sites:
        layer = by_path[s.path]
        if not isinstance(layer, AdaptedLayer):
            layer = AdaptedLayer(layer, s.site)
        layers[s.path] = layer
    for s in adapter.sites:  # resolve embedding tables now: a bad embed_path changes nothing
        if s.site.kind == "inputs":
            _init_base(model, layers[s.path])
    frozen, trainable = init_shared(adapter, lambda: rngs.params())
    bank = SharedBank(frozen, trainable) if frozen or trainable else None
    shared = {} if bank is None else bank.all()
    for s in adapter.sites:
        layer = layers[s.path]
        if not isinstance(by_path[s.path], AdaptedLayer):
            _replace(model, s.path, layer)
        params = []
        for method in s.methods:
            base = _init_base(model, layer)
            values, updates = method.init(rngs.params(), s.site, base, shared)
            if updates:
                layer._write_base({**base, **updates})
            params.append(values)
            if method.trains_base:
                _retag(layer.base_layer, nnx.Param, TrainedParam, method.trains_base)
        setattr(layer, name, AdapterSlot(s.methods, params, bank, rngs))
        layer.adapter_order = (*layer.adapter_order, name)
    return model


def _init_base(model: nnx.Module, layer: AdaptedLayer) -> dict:
    """What a method's ``init`` sees as the site's base (an input tap: the embedding table)."""
    if layer.site.kind != "inputs":
        return layer._base()
    try:
        parent, key = _parent_and_key(model, layer.site.embed_path)
        table = parent[key] if isinstance(parent, (list, dict, nnx.List, nnx.Dict)) else getattr(parent, key)
        table = table.kernel if isinstance(table, AdaptedLayer) else getattr(table, "embedding")
    except (AttributeError, KeyError, IndexError, ValueError):
        raise errors.MissingHookError(
            f"the input tap {layer.site.path!r} names embed_path={layer.site.embed_path!r}, which is "
            "not an embedding module of this model; give InputTap the word-embedding module's path "
            "relative to the module that holds the tap") from None
    return {"embedding": table[...]}


def set_active(model: nnx.Module, names: str | list[str] | Block | None) -> None:
    """Runs only the named adapters (``None``: all of them, in attach order), or combines them
    by a composition block (`Stack`, `Parallel`, `Average` from `peft_jax.sites.composition`).

    Example:
        >>> # set_active(model, Average("task_a", "task_b", weights=(0.7, 0.3)))
    """
    block = as_block(names)
    if block is not None:
        block.check(adapter_names(model))
        names = list(block.names)
    wanted = None if names is None else ({names} if isinstance(names, str) else set(names))
    known = adapter_names(model)
    if wanted is not None and not wanted <= known:
        raise errors.AdapterNameError(f"no adapter named {sorted(wanted - known)}; attached: {sorted(known)}")
    for _, layer in adapted_layers(model):
        layer.composition = block
        for key, slot in layer.slots():
            slot.active = wanted is None or key in wanted


def drop_adapters(model: nnx.Module, n: int, roles: Roles) -> nnx.Module:
    """AdapterDrop at inference: switches off every adapter in the layers ``0 .. n - 1``
    (``roles.layers``; `peft_jax.sites.drop`) and on in all others, in place; ``n=0`` runs
    them all again. The choice is static: a jitted call compiles once per ``n``.

    Example:
        >>> # drop_adapters(model, 2, ROLES); logits = model(ids)  # lowest 2 layers as the base
    """
    dropped = lowest_layers(n, roles)
    for path, layer in adapted_layers(model):
        layer.enabled = not dropped(path)
    return model


@contextlib.contextmanager
def disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Within the block the model computes the base outputs (every adapter off).

    Biases that `TrainBias` (``bias="all"`` / ``"lora_only"``) trains in place keep their values.

    Example:
        >>> # with disabled(model): base_logits = model(x)
    """
    layers = [(layer, layer.enabled) for _, layer in adapted_layers(model)]
    for layer, _ in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in layers:
            layer.enabled = was


def merge(model: nnx.Module, *, keep_original: bool = True) -> nnx.Module:
    """Folds the active adapters into the base arrays, in place; the adapters stop running.

    Outputs do not change (up to float rounding). With ``keep_original`` the pre-merge arrays are
    kept, so `unmerge` restores them bitwise. A method that cannot merge raises
    `NotMergeableError` naming itself, before anything changes.
    """
    work = []
    for _, layer in adapted_layers(model):
        if layer.composition is not None:
            raise errors.NotMergeableError(
                f"adapters combined by {layer.composition!r} cannot be merged into one set of "
                "weights; set_active(model, None) (or names) before merging")
        live = layer._live()
        if live:
            entries = [e for slot in live for e in slot.entries()]
            work.append((layer, live, entries))
    for layer, _, entries in work:
        for method, *_ in entries:
            require_mergeable(method, layer.site.path)
    # Every merge is computed before any is written, so a failing one changes nothing.
    done = [(layer, live, *merge_site(entries, layer.site, layer._base(), keep_original=keep_original))
            for layer, live, entries in work]
    for layer, live, merged, record in done:
        layer._write_base(merged)
        layer.merge_record = MergeRecord(record)
        for slot in live:
            slot.merged = True
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undoes `merge`, in place: base arrays as before, adapters running again."""
    layers = [layer for _, layer in adapted_layers(model) if layer.merge_record is not None]
    if not layers:
        raise errors.StateError("nothing to unmerge: no adapter of this model is merged; call merge() first")
    for layer in layers:
        merged = [s for _, s in layer.slots() if s.merged]
        entries = [e for slot in merged for e in slot.entries()]
        layer._write_base(unmerge_site(entries, layer.site, layer._base(), layer.merge_record.get_value()))
        layer.merge_record = nnx.data(None)
        for slot in merged:
            slot.merged = False
    return model


def unload(model: nnx.Module, *, merge_adapters: bool = True) -> nnx.Module:
    """Removes every wrapper, in place, leaving the user's own module classes.

    With ``merge_adapters`` (the serving path) the active adapters are folded into the base
    arrays (trained copies swapped in); without it the base model comes back as it was (up to
    biases trained in place). Returns ``model``.
    """
    if merge_adapters:
        merge(model, keep_original=False)
    for path, layer in reversed(list(adapted_layers(model))):
        _replace(model, path, layer.base_layer)
    _retag(model, TrainedParam, nnx.Param)
    return model


def fold(model: nnx.Module) -> nnx.Module:
    """Replaces methods that have a cheaper form with identical outputs by it, in place (prefix
    tuning's reparameterization MLP becomes flat per-layer prefixes: what HF PEFT saves).

    Example:
        >>> # fold(model); logits are unchanged and the MLP's params are gone
    """
    for adapter in sorted(adapter_names(model)):
        slots = {path: getattr(layer, adapter) for path, layer in adapted_layers(model)
                 if adapter in layer.adapter_order}
        sites = {path: layer.site for path, layer in adapted_layers(model) if path in slots}
        methods = dict.fromkeys(m for slot in slots.values() for m in slot.methods)
        for method in methods:
            paths = [p for p, slot in slots.items() if method in slot.methods]
            bank = slots[paths[0]].shared
            params = {p: _slot_params(slots[p], method) for p in paths}
            folded = method.fold({} if bank is None else bank.all(), [sites[p] for p in paths], params)
            if folded is None:
                continue
            new, per_site = folded
            for p in paths:
                _replace_method(slots[p], method, fold_result_for(new, p), per_site[p])
            if bank is not None:
                kept = set().union(*(fold_result_for(new, p).shared_keys([sites[p]]) for p in paths))
                for key in method.shared_keys([sites[p] for p in paths]) - kept:
                    del bank.params[key]
    return model


def _slot_params(slot: AdapterSlot, method: Method) -> dict:
    names = slot.param_names[slot.methods.index(method)]
    return {k: _values(getattr(slot, k)) for k in names}


def _replace_method(slot: AdapterSlot, old: Method, new: Method, params: dict) -> None:
    i = slot.methods.index(old)
    for key in slot.param_names[i]:
        delattr(slot, key)
    for key, value in params.items():
        setattr(slot, key, _variables(value, AdapterParam) if isinstance(value, dict) else AdapterParam(value))
    slot.methods = (*slot.methods[:i], new, *slot.methods[i + 1:])
    slot.param_names = (*slot.param_names[:i], tuple(params), *slot.param_names[i + 1:])


def record(model: nnx.Module, on: bool = True) -> None:
    """Turns on (or off) recording of values methods report (UniPELT's gates) on each call.

    Read them after a forward pass with `recorded`.

    Example:
        >>> # record(model); model(x); gates = recorded(model)
    """
    for _, layer in adapted_layers(model):
        for _, slot in layer.slots():
            slot.recording = on


def recorded(model: nnx.Module, *, clear: bool = True) -> dict[str, jax.Array]:
    """What methods reported on the last call, ``{"<site path>/<adapter>/<name>": value}`` (e.g.
    ``".../attention_tap/default/prefix_gate"``: ``[batch, G]``); ``clear`` removes them."""
    out = {}
    for path, layer in adapted_layers(model):
        for name, slot in layer.slots():
            for key, value in list(vars(slot).items()):
                if isinstance(value, nnx.Intermediate):
                    out[f"{path}/{name}/{key}"] = value[...]
                    if clear:
                        delattr(slot, key)
    return out


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)``: trainable is every ``nnx.LoRAParam`` (adapters and
    biases trained in place); frozen is all other state. ``nnx.merge(graphdef, trainable,
    frozen)`` rebuilds the model."""
    return nnx.split(model, nnx.LoRAParam, ...)


def summary(model: nnx.Module) -> ParamSummary:
    """Trainable / total parameter counts, with ``by_method[(adapter, method)]`` counts.

    Counts ``nnx.Param``-family variables only (shared frozen projections are state, not params).
    """
    trainable = count_params(nnx.state(model, nnx.LoRAParam))
    frozen = count_params(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    by_method: dict[tuple[str, str], int] = {}
    for _, layer in adapted_layers(model):
        for name, slot in layer.slots():
            for method, names in zip(slot.methods, slot.param_names):
                n = sum(count_params(_values(getattr(slot, k))) for k in names)
                n += sum(count_params(getattr(layer.base_layer, k)[...]) for k in method.trains_base)
                key = (name, method.name)
                by_method[key] = by_method.get(key, 0) + n
    for name in adapter_names(model):
        slots = [(layer.site, getattr(layer, name)) for _, layer in adapted_layers(model)
                 if name in layer.adapter_order]
        bank = next((slot.shared for _, slot in slots if slot.shared is not None), None)
        if bank is not None:
            params = _values(bank.params)
            count_shared(by_method, name, params, [(site, slot.methods) for site, slot in slots])
    return ParamSummary(trainable=trainable, total=trainable + frozen, by_method=by_method)


def regularizer(model: nnx.Module) -> jax.Array:
    """The live methods' loss terms (`Method.regularizer`, combined by `combine_regularizers`:
    AdaLoRA's orthogonality, averaged); ``0.0`` when none has one. `make_loss` adds it."""
    return combine_regularizers([
        (method, term) for _, layer in adapted_layers(model) for slot in layer._live()
        for method, params, shared, _ in slot.entries()
        if (term := method.regularizer(params, shared, layer.site)) is not None])


def with_regularizer(model: nnx.Module, out: Any) -> Any:
    """``out`` (a loss, or ``(loss, aux)``) plus `regularizer` when a method defines one."""
    if not has_regularizer(model):
        return out
    penalty = regularizer(model)
    if isinstance(out, tuple):
        return (out[0] + penalty.astype(out[0].dtype), *out[1:])
    return out + penalty.astype(out.dtype)


def has_regularizer(model: nnx.Module) -> bool:
    """Whether a live method defines a loss term (checked once, when the loss is traced)."""
    return any(type(method).regularizer is not Method.regularizer
               for _, layer in adapted_layers(model) for slot in layer._live()
               for method, *_ in slot.entries())


def _noisy(model: nnx.Module) -> list[AdapterSlot]:
    return [s for _, layer in adapted_layers(model) for s in layer._live()
            if s.rngs is not None and not s.deterministic]


def seed_adapter_dropout(model: nnx.Module, batch: Any) -> None:
    """Gives every adapter with dropout in training mode a fresh RNG stream from
    ``batch["dropout_rng"]`` (inside a traced loss, where RNG state carried in the params cannot
    advance). Does nothing when no adapter draws dropout masks.

    Raises:
        BatchError: an adapter needs dropout masks and ``batch`` has no ``"dropout_rng"``.
    """
    noisy = _noisy(model)
    if not noisy:
        return
    if not (isinstance(batch, dict) and "dropout_rng" in batch):
        raise errors.BatchError(
            "the model has adapters with dropout in training mode, so each batch needs a "
            "fresh key: batch['dropout_rng'] = jax.random.fold_in(key, step) (or call "
            "model.eval() to train without dropout)")
    for i, slot in enumerate(noisy):
        slot.rngs = nnx.Rngs(dropout=jax.random.fold_in(batch["dropout_rng"], i))["dropout"]


def make_loss(graphdef: nnx.GraphDef, model_loss: Callable[..., Any]) -> Callable[..., Any]:
    """Turns ``model_loss(model, batch)`` into ``loss(trainable, frozen, batch)`` for `make_train_step`.

    The attached methods' loss terms (`regularizer`: AdaLoRA's orthogonality) are added to the
    loss (the first element when ``model_loss`` returns ``(loss, aux)``).

    Adapters with dropout that are in training mode draw their masks from ``batch["dropout_rng"]``
    (a fresh key each step), since RNG state carried in ``frozen`` cannot advance inside the step.

    Example:
        >>> # step = make_train_step(make_loss(graphdef, lambda m, b: mse(m(b["x"]), b["y"])), tx)
    """

    def loss(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        seed_adapter_dropout(model, batch)
        return with_regularizer(model, model_loss(model, batch))

    return loss


def adapter_state(model: nnx.Module, name: str | None = None) -> dict[str, jax.Array]:
    """The canonical flat layout of the adapters: ``{"<site path>/<adapter>/<param>": array}``,
    plus ``"<adapter>/shared/<param>"`` for shared state. Identical for the Linen front-end
    (`peft_jax.linen.Peft.adapter_state`) on the same architecture.

    Example:
        >>> from flax import nnx
        >>> import peft_jax
        >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
        >>> _ = attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1))
        >>> sorted(adapter_state(model))
        ['layers/0/default/lora_a', 'layers/0/default/lora_b']
    """
    out: dict[str, jax.Array] = {}
    banks: dict[str, SharedBank] = {}
    for path, layer in adapted_layers(model):
        for adapter, slot in layer.slots():
            if name is not None and adapter != name:
                continue
            for names in slot.param_names:
                for key in names:
                    out.update(items_under(f"{path}/{adapter}/{key}", _values(getattr(slot, key))))
            if slot.shared is not None:
                if banks.setdefault(adapter, slot.shared) is not slot.shared:
                    raise errors.StateError(
                        f"adapter {adapter!r} has two different shared banks (two modules built "
                        "separately, e.g. Compacter blocks without shared=): their shared params "
                        "would collide; build the later ones with shared=<the first>")
                out.update(items_under(f"{adapter}/shared", slot.shared.all()))
    return out


def load_adapter_state(model: nnx.Module, values: dict[str, Any]) -> None:
    """Writes a canonical flat dict (from either front-end) into the attached adapters."""
    current = adapter_state(model)
    missing = sorted(set(values) - set(current))
    if missing:
        raise errors.StateError(f"no attached adapter param at {missing[:5]}; attach the same "
                                "config (and adapter name) before loading")
    for path, layer in adapted_layers(model):
        for adapter, slot in layer.slots():
            for names in slot.param_names:
                for key in names:
                    _load(getattr(slot, key), f"{path}/{adapter}/{key}", values)
            if slot.shared is not None:
                _load(slot.shared.values, f"{adapter}/shared", values)
                _load(slot.shared.params, f"{adapter}/shared", values)


def _load(node: Any, prefix: str, values: dict) -> None:
    if isinstance(node, nnx.Variable):
        if prefix in values:
            node[...] = jnp.asarray(values[prefix], node[...].dtype).reshape(node[...].shape)
        return
    for k, v in node.items():
        _load(v, f"{prefix}/{k}", values)
