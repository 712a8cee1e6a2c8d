"""Flax NNX front-end: attach PEFT methods to any ``nnx.Module`` by module surgery.

A targeted layer ``m`` is replaced in its parent by an `AdaptedLayer` that keeps ``m`` as
``base_layer`` (frozen ``nnx.Param``) and holds one `Adapter` per name. Adapter variables are
`AdapterParam`, a subclass of ``nnx.LoRAParam``, so the usual NNX idioms select them:
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` or ``nnx.split(model, nnx.LoRAParam, ...)``.
The math lives in `peft_jax.methods`; this file only moves arrays in and out of modules.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> _ = attach(model, peft_jax.LoraConfig(targets=r"layers/\\d+", rank=2), rngs=nnx.Rngs(2))
    >>> print(summary(model))
    trainable params: 44 || all params: 102 || trainable%: 43.1373
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax import errors
from peft_jax.core.count import ParamSummary, count_params
from peft_jax.core.select import compile_selector, select
from peft_jax.methods import LoraConfig, merge_kernel, plan_targets, unmerge_kernel
from peft_jax.methods.base import TargetSettings, WeightMethod
from peft_jax.ops import ConvOp, ContractionOp, EinsumOp, EmbedOp, LinearOp, dense_op


class AdapterParam(nnx.LoRAParam):
    """A variable a PEFT method added (LoRA factors, DoRA magnitudes)."""


class TrainedParam(nnx.LoRAParam):
    """A base-model variable that the config trains in place (biases, ``modules_to_save`` copies)."""


class MergeRecord(nnx.Variable):
    """What `unmerge` needs: the kernel before merging and the method's own record. Never trained."""


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


# --- which NNX layers are linear ops of their kernels -------------------------------------------
def _conv_op(m: nnx.Conv) -> LinearOp:
    if m.feature_group_count != 1 or m.mask is not None:
        raise errors.UnsupportedLayerError(
            "grouped or masked convolutions (feature_group_count != 1, mask) cannot be adapted")
    shape = tuple(m.kernel.shape)
    return ConvOp(in_shape=shape[:-1], out_shape=shape[-1:], kernel_size=_hashable(m.kernel_size),
                  strides=_hashable(m.strides), padding=_hashable(m.padding),
                  input_dilation=_hashable(m.input_dilation),
                  kernel_dilation=_hashable(m.kernel_dilation), precision=m.precision)


def _linear_general_op(m: nnx.LinearGeneral) -> LinearOp:
    if m.batch_axis:
        raise errors.UnsupportedLayerError("LinearGeneral with batch_axis cannot be adapted")
    return ContractionOp(in_shape=tuple(m.in_features), out_shape=tuple(m.out_features),
                         axis=tuple(m.axis))


_OPS: dict[type, Callable[[Any], LinearOp]] = {
    nnx.Linear: lambda m: dense_op(m.in_features, m.out_features),
    nnx.LinearGeneral: _linear_general_op,
    nnx.Einsum: lambda m: EinsumOp.from_string(m.einsum_str, tuple(m.kernel.shape)),
    nnx.Conv: _conv_op,
    nnx.Embed: lambda m: EmbedOp(in_shape=(m.num_embeddings,), out_shape=(m.features,)),
}


def layer_op(module: nnx.Module) -> LinearOp | None:
    """The `LinearOp` of a supported layer, or ``None`` for other modules."""
    if isinstance(module, AdaptedLayer):
        return module.op
    for kind, make in _OPS.items():
        if isinstance(module, kind):
            return make(module)
    return None


# --- the modules surgery inserts -----------------------------------------------------------------
class Adapter(nnx.Module):
    """One named adapter on one layer: its method, settings, variables and merge state."""

    def __init__(self, method: WeightMethod, settings: TargetSettings, params: dict[str, jax.Array],
                 rngs: nnx.Rngs):
        self.method = method
        self.settings = settings
        self.param_names = tuple(params)
        for key, value in params.items():
            setattr(self, key, AdapterParam(value))
        self.deterministic = False  # nnx's model.train() / model.eval() flip it, as for nnx.Dropout
        self.rngs = rngs["dropout"].fork() if settings.dropout > 0 else nnx.data(None)
        self.active = True
        self.merged = False

    def params(self) -> dict[str, jax.Array]:
        return {key: getattr(self, key)[...] for key in self.param_names}

    def dropout_key(self) -> jax.Array | None:
        return None if self.deterministic or self.rngs is None else self.rngs()


class AdaptedLayer(nnx.Module):
    """A supported layer (``base_layer``) with named adapters added to its output."""

    def __init__(self, base_layer: nnx.Module, op: LinearOp):
        self.base_layer = base_layer
        self.op = op
        self.kernel_name = "embedding" if isinstance(op, EmbedOp) else "kernel"
        self.adapters = nnx.Dict()
        self.enabled = True
        self.merge_record = nnx.data(None)

    @property
    def kernel(self) -> nnx.Variable:
        return getattr(self.base_layer, self.kernel_name)

    def _live(self) -> list[Adapter]:
        if not self.enabled:
            return []
        return [a for a in self.adapters.values() if a.active and not a.merged]

    def __call__(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        live = self._live()
        if not live:
            return out
        kernel = self.kernel[...]
        bias = getattr(self.base_layer, "bias", None)
        bias = None if bias is None else bias[...]
        for adapter in live:
            out = out + adapter.method.delta(adapter.params(), self.op, x, kernel, out, bias,
                                             adapter.settings, adapter.dropout_key())
        return out

    def attend(self, query):
        """Tied-head use of an adapted ``nnx.Embed``: ``query @ (W + delta).T``."""
        out = self.base_layer.attend(query)
        kernel = self.kernel[...]
        for adapter in self._live():
            out = out + adapter.method.attend_delta(adapter.params(), self.op, query, kernel,
                                                    adapter.settings)
        return out


class ModulesToSave(nnx.Module):
    """A module trained fully: ``original_module`` stays frozen, ``trained`` copies train."""

    def __init__(self, original: nnx.Module):
        self.original_module = original
        self.trained = nnx.Dict()
        self.active: str | None = None  # static: which trained copy runs (None: the original)

    def __call__(self, *args, **kwargs):
        module = self.original_module if self.active is None else self.trained[self.active]
        return module(*args, **kwargs)


# --- surgery helpers ------------------------------------------------------------------------------
def _modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, module)`` for every module a user can target (not our wrappers' insides)."""
    found, inside = [], []
    for path, module in nnx.iter_modules(model):
        key = "/".join(str(p) for p in path)
        if not path or isinstance(module, (nnx.Dict, nnx.List)):
            continue
        if any(key.startswith(prefix + "/") for prefix in inside):
            continue
        if isinstance(module, (AdaptedLayer, ModulesToSave)):
            inside.append(key)
        found.append((key, module))
    return found


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


def _retag(module: nnx.Module, old: type, new: type, *, copy: bool = False) -> None:
    """Turns every ``old`` variable (exactly that type) inside ``module`` into a ``new`` one.

    With ``copy`` the arrays get their own buffers, so donating one copy never frees the other.
    """
    for _, sub in nnx.iter_modules(module):
        for name, value in list(vars(sub).items()):
            if type(value) is old:
                setattr(sub, name, new(jnp.array(value[...], copy=True) if copy else value[...]))


def _adapted_layers(model: nnx.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for path, module in _modules(model):
        if isinstance(module, AdaptedLayer):
            yield path, module


def adapter_names(model: nnx.Module) -> set[str]:
    """Names of the adapters attached anywhere in ``model``."""
    names = {n for _, layer in _adapted_layers(model) for n in layer.adapters}
    names |= {n for _, m in _modules(model) if isinstance(m, ModulesToSave) for n in m.trained}
    return names


# --- public API -----------------------------------------------------------------------------------
def attach(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, name: str = "default") -> nnx.Module:
    """Adds adapter ``name`` to the layers ``config.targets`` selects, in place; returns ``model``.

    All checks (targets match, layer types, ranks, a free name) run before anything changes.

    Example:
        >>> from flax import nnx
        >>> import peft_jax
        >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
        >>> _ = attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1))
        >>> type(model.layers[0]).__name__, model.layers[0].adapters["default"].lora_a.shape
        ('AdaptedLayer', (4, 2))
    """
    if name in adapter_names(model):
        raise errors.AdapterNameError(
            f"an adapter named {name!r} is already attached; pass another `name=` or detach it "
            f"first (attached: {sorted(adapter_names(model))})")
    modules = _modules(model)
    targets = plan_targets(config, modules, layer_op)
    saved = select([p for p, _ in modules], config.modules_to_save, what="modules_to_save") \
        if config.modules_to_save is not None else []
    by_path = dict(modules)
    method = config.method
    for target in targets:
        layer = by_path[target.path]
        if not isinstance(layer, AdaptedLayer):
            layer = AdaptedLayer(layer, target.op)
            _replace(model, target.path, layer)
        kernel = layer.kernel
        params, residual = method.init(rngs.params(), target.op, kernel[...], target.settings, config.init)
        if residual is not None:
            kernel[...] = residual
        layer.adapters[name] = Adapter(method, target.settings, params, rngs)
        if config.bias == "lora_only":
            _retag_bias(layer.base_layer)
    if config.bias == "all":
        for _, module in _modules(model):
            _retag_bias(module)
    for path in saved:
        module = by_path[path]
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        trained = nnx.clone(wrapper.original_module)
        _retag(trained, nnx.Param, TrainedParam, copy=True)
        wrapper.trained[name] = trained
        wrapper.active = name
        _replace(model, path, wrapper)
    return model


def _retag_bias(module: nnx.Module) -> None:
    bias = getattr(module, "bias", None)
    if type(bias) is nnx.Param:
        module.bias = TrainedParam(bias[...])


def set_active(model: nnx.Module, names: str | list[str] | None) -> None:
    """Runs only the named adapters (``None``: all of them)."""
    wanted = None if names is None else ({names} if isinstance(names, str) else set(names))
    known = adapter_names(model)
    if wanted is not None and not wanted <= known:
        raise errors.AdapterNameError(f"no adapter named {sorted(wanted - known)}; attached: {sorted(known)}")
    for _, layer in _adapted_layers(model):
        for key, adapter in layer.adapters.items():
            adapter.active = wanted is None or key in wanted
    for _, module in _modules(model):
        if isinstance(module, ModulesToSave):
            choices = [n for n in module.trained if wanted is None or n in wanted]
            module.active = choices[-1] if choices else None


@contextlib.contextmanager
def disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Within the block the model computes the base outputs (adapters and saved-module copies off).

    Biases that ``bias="all"`` / ``"lora_only"`` train in place keep their trained values.

    Example:
        >>> # with disabled(model): base_logits = model(x)
    """
    layers = [layer for _, layer in _adapted_layers(model)]
    saved = [m for _, m in _modules(model) if isinstance(m, ModulesToSave)]
    before = [m.active for m in saved]
    for layer in layers:
        layer.enabled = False
    for module in saved:
        module.active = None
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        for module, active in zip(saved, before):
            module.active = active


def merge(model: nnx.Module, *, keep_original: bool = True) -> nnx.Module:
    """Folds the active adapters into the base kernels, in place; the adapters stop running.

    Outputs do not change (up to float rounding). With ``keep_original`` the pre-merge kernel is
    kept, so `unmerge` restores it bitwise; otherwise `unmerge` inverts the merge arithmetically.
    """
    for _, layer in _adapted_layers(model):
        live = layer._live()
        if not live:
            continue
        merged, record = merge_kernel(_math(live), layer.op, layer.kernel[...], keep_original=keep_original)
        layer.kernel[...] = merged
        layer.merge_record = MergeRecord(record)
        for adapter in live:
            adapter.merged = True
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undoes `merge`, in place: base kernels as before, adapters running again."""
    layers = [layer for _, layer in _adapted_layers(model) if layer.merge_record is not None]
    if not layers:
        raise errors.StateError("nothing to unmerge: no adapter of this model is merged; call merge() first")
    for layer in layers:
        merged = [a for a in layer.adapters.values() if a.merged]
        layer.kernel[...] = unmerge_kernel(_math(merged), layer.op, layer.kernel[...],
                                           layer.merge_record.get_value())
        layer.merge_record = nnx.data(None)
        for adapter in merged:
            adapter.merged = False
    return model


def _math(adapters: list[Adapter]) -> list[tuple[WeightMethod, dict, TargetSettings]]:
    return [(a.method, a.params(), a.settings) for a in adapters]


def unload(model: nnx.Module, *, merge_adapters: bool = True) -> nnx.Module:
    """Removes every wrapper, in place, leaving the user's own module classes.

    With ``merge_adapters`` (the serving path) the active adapters are folded into the kernels and
    ``modules_to_save`` keep their trained copies; without it the base model comes back as it was
    (up to biases trained in place). Returns ``model``.
    """
    if merge_adapters:
        merge(model, keep_original=False)
    for path, module in reversed(_modules(model)):
        if isinstance(module, AdaptedLayer):
            _replace(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave):
            keep = module.trained[module.active] if merge_adapters and module.active else module.original_module
            _replace(model, path, keep)
    _retag(model, TrainedParam, nnx.Param)
    return model


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)``: trainable is every ``nnx.LoRAParam`` (adapters, trained
    biases and copies); frozen is all other state. ``nnx.merge(graphdef, trainable, frozen)``
    rebuilds the model."""
    return nnx.split(model, nnx.LoRAParam, ...)


def summary(model: nnx.Module) -> ParamSummary:
    """Trainable / total parameter counts (counts ``nnx.Param`` family variables only)."""
    trainable = count_params(nnx.state(model, nnx.LoRAParam))
    frozen = count_params(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    return ParamSummary(trainable=trainable, total=trainable + frozen)


def seed_adapter_dropout(model: nnx.Module, batch: Any) -> None:
    """Gives every adapter with dropout in training mode a fresh RNG stream from
    ``batch["dropout_rng"]`` (inside a traced loss, where RNG state carried in the params cannot
    advance). Does nothing when no adapter draws dropout masks.

    Raises:
        BatchError: an adapter needs dropout masks and ``batch`` has no ``"dropout_rng"``.
    """
    noisy = [a for _, layer in _adapted_layers(model) for a in layer._live()
             if a.settings.dropout > 0 and not a.deterministic]
    if not noisy:
        return
    if not (isinstance(batch, dict) and "dropout_rng" in batch):
        raise errors.BatchError(
            "the model has adapters with dropout in training mode, so each batch needs a "
            "fresh key: batch['dropout_rng'] = jax.random.fold_in(key, step) (or call "
            "model.eval() to train without dropout)")
    for i, adapter in enumerate(noisy):
        adapter.rngs = nnx.Rngs(dropout=jax.random.fold_in(batch["dropout_rng"], i))["dropout"]


def make_loss(graphdef: nnx.GraphDef, model_loss: Callable[..., Any]) -> Callable[..., Any]:
    """Turns ``model_loss(model, batch)`` into ``loss(trainable, frozen, batch)`` for `make_train_step`.

    Adapters with dropout that are in training mode draw their masks from ``batch["dropout_rng"]``
    (a fresh key each step), since RNG state carried in ``frozen`` cannot advance inside the step.

    Example:
        >>> # step = make_train_step(make_loss(graphdef, lambda m, b: mse(m(b["x"]), b["y"])), tx)
    """

    def loss(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        seed_adapter_dropout(model, batch)
        return model_loss(model, batch)

    return loss
