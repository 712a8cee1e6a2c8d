"""Flax Linen front-end: attach PEFT methods to any ``nn.Module`` by method interception.

The user's module code is not touched. `attach` returns a `Peft` handle; its ``init`` adds the
adapter variables in their own ``"lora"`` collection (next to the module path of each adapted
layer), and its ``apply`` runs the module under ``nn.intercept_methods`` so every targeted layer's
output gains its adapters' deltas. The math lives in `peft_jax.methods`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft_jax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    >>> x = jnp.ones((2, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> peft = attach(model, peft_jax.LoraConfig(targets=["layers_0"], rank=2))
    >>> variables = peft.init(jax.random.key(1), variables, x)
    >>> sorted(variables["lora"]["layers_0"]["default"])
    ['lora_a', 'lora_b']
    >>> bool(jnp.allclose(peft.apply(variables, x), model.apply({"params": variables["params"]}, x)))
    True
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from peft_jax import errors
from peft_jax.core import combine, partition
from peft_jax.core.count import ParamSummary, count_params
from peft_jax.core.select import compile_selector, select
from peft_jax.methods import LoraConfig, Target, merge_kernel, plan_targets, unmerge_kernel
from peft_jax.ops import ConvOp, ContractionOp, EinsumOp, EmbedOp, LinearOp, dense_op

COLLECTION = "lora"
RECORD = "merge_record"
_SAVED = "modules_to_save"


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _kernel_name(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _conv_op(m: nn.Conv, shape: tuple[int, ...]) -> LinearOp:
    if m.feature_group_count != 1 or m.mask is not None:
        raise errors.UnsupportedLayerError(
            "grouped or masked convolutions (feature_group_count != 1, mask) cannot be adapted")
    return ConvOp(in_shape=shape[:-1], out_shape=shape[-1:], kernel_size=_hashable(m.kernel_size),
                  strides=_hashable(m.strides), padding=_hashable(m.padding),
                  input_dilation=_hashable(m.input_dilation),
                  kernel_dilation=_hashable(m.kernel_dilation), precision=m.precision)


def _dense_general_op(m: nn.DenseGeneral, shape: tuple[int, ...]) -> LinearOp:
    if m.batch_dims:
        raise errors.UnsupportedLayerError("DenseGeneral with batch_dims cannot be adapted")
    n_in = len(_hashable(m.axis)) if isinstance(m.axis, (list, tuple)) else 1
    axis = _hashable(m.axis) if isinstance(m.axis, (list, tuple)) else (m.axis,)
    return ContractionOp(in_shape=shape[:n_in], out_shape=shape[n_in:], axis=axis)


def _einsum_op(m: nn.Einsum, shape: tuple[int, ...]) -> LinearOp:
    if m.einsum_str is None:
        raise errors.UnsupportedLayerError("an Einsum whose einsum_str is given at call time cannot "
                                           "be adapted; set it on the module")
    return EinsumOp.from_string(m.einsum_str, shape)


_OPS = {
    nn.Dense: lambda m, shape: dense_op(shape[0], shape[1]),
    nn.DenseGeneral: _dense_general_op,
    nn.Einsum: _einsum_op,
    nn.Conv: _conv_op,
    nn.Embed: lambda m, shape: EmbedOp(in_shape=shape[:1], out_shape=shape[1:]),
}


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


@dataclasses.dataclass(frozen=True)
class _Adapter:
    name: str
    config: LoraConfig


@dataclasses.dataclass(frozen=True)
class Peft:
    """An unmodified Linen module plus named adapters; build it with `attach`.

    The handle is static: variables live in the usual ``variables`` dict, with adapter params in
    the ``"lora"`` collection. ``init`` also records the plan (targets and their ops) that
    ``merge`` / ``unmerge`` / ``unload`` use.
    """

    module: nn.Module
    adapters: tuple[_Adapter, ...] = ()
    _plans: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # -- building ---------------------------------------------------------------------------------
    def attach(self, config: LoraConfig, name: str = "default") -> "Peft":
        """A new handle with one more adapter (its variables come from the next ``init``)."""
        if name in {a.name for a in self.adapters}:
            raise errors.AdapterNameError(
                f"an adapter named {name!r} is already attached; pass another `name=` "
                f"(attached: {[a.name for a in self.adapters]})")
        return Peft(self.module, self.adapters + (_Adapter(name, config),), dict(self._plans))

    def plan(self, variables: dict, *args: Any, **kwargs: Any) -> dict[str, dict[str, Target]]:
        """Traces the module once (no compile, no FLOPs) and checks every adapter's targets.

        Returns ``{adapter name: {module path: Target}}``; raises `NoMatchError`,
        `UnsupportedLayerError` or `InvalidConfigError` before anything is computed.
        """
        seen: dict[str, nn.Module] = {}
        ops: dict[str, LinearOp | Exception | None] = {}

        def record(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            module = context.module
            if context.method_name == "__call__" and module.path and _path(module) not in seen:
                seen[_path(module)] = module
                try:
                    ops[_path(module)] = _module_op(module)
                except errors.UnsupportedLayerError as e:
                    ops[_path(module)] = e
            return out

        def trace(variables):
            with nn.intercept_methods(record):
                self.module.apply(_base_only(variables), *args, **kwargs)

        jax.eval_shape(trace, variables)

        def op_of(module):
            op = ops[_path(module)]
            if isinstance(op, Exception):
                raise op
            return op

        modules = list(seen.items())
        plans = {}
        for adapter in self.adapters:
            config = adapter.config
            targets = plan_targets(config, modules, op_of)
            plans[adapter.name] = {t.path: t for t in targets}
            if config.modules_to_save is not None:
                select([p for p, _ in modules], config.modules_to_save, what="modules_to_save")
        self._plans.clear()
        self._plans.update(plans)
        self._plans["__modules__"] = tuple(p for p, _ in modules)
        return plans

    def init(self, key: jax.Array, variables: dict, *args: Any, **kwargs: Any) -> dict:
        """Adds the variables of every adapter not yet in ``variables`` (checks run first).

        ``args`` / ``kwargs`` are a sample input for the module; PiSSA / OLoRA inits also
        return the residual base kernels in ``"params"``.
        """
        plans = self.plan(variables, *args, **kwargs)
        params = meta.unbox(variables["params"])
        lora = dict(variables.get(COLLECTION, {}))
        new = [a for a in self.adapters if not _present(lora, plans[a.name], a.name)]
        for adapter in new:
            method = adapter.config.method
            for path, target in plans[adapter.name].items():
                layer_key = jax.random.fold_in(key, zlib.crc32(f"{adapter.name}/{path}".encode()))
                kernel_path = f"{path}/{_kernel_name_at(params, path)}"
                kernel = _nested_get(params, kernel_path)
                values, residual = method.init(layer_key, target.op, kernel, target.settings,
                                               adapter.config.init)
                lora = _nested_set(lora, f"{path}/{adapter.name}", values)
                if residual is not None:
                    params = _nested_set(params, kernel_path, residual)
            for path in self._saved_paths(adapter):
                copy = jax.tree.map(lambda x: jnp.array(x, copy=True), _nested_get(params, path))
                lora = _nested_set(lora, f"{path}/{_SAVED}/{adapter.name}", copy)
        return {**variables, "params": params, COLLECTION: lora}

    # -- running ----------------------------------------------------------------------------------
    def apply(self, variables: dict, *args: Any, active: Iterable[str] | None = None,
              enabled: bool = True, rngs: dict | None = None, **kwargs: Any) -> Any:
        """Runs the module with its adapters (``active`` names only, if given).

        Dropout on the low-rank path is on when ``rngs`` holds a ``"dropout"`` key. With
        ``enabled=False`` (or after `merge`) the module runs on its own params.
        """
        if not enabled or RECORD in variables:
            return self.module.apply(_base_only(variables), *args, rngs=rngs, **kwargs)
        plans = self._require_plans()
        names = {a.name for a in self.adapters} if active is None else set(active)
        unknown = names - {a.name for a in self.adapters}
        if unknown:
            raise errors.AdapterNameError(f"no adapter named {sorted(unknown)}; attached: "
                                          f"{[a.name for a in self.adapters]}")
        live = [a for a in self.adapters if a.name in names]
        by_path: dict[str, list[tuple[_Adapter, Target]]] = {}
        for adapter in live:
            for path, target in plans[adapter.name].items():
                by_path.setdefault(path, []).append((adapter, target))
        saved = {p: a.name for a in live for p in self._saved_paths(a)}
        lora = variables.get(COLLECTION, {})

        def intercept(next_fun, call_args, call_kwargs, context):
            module = context.module
            path = _path(module)
            if path in saved and context.method_name == "__call__":
                copy = _nested_get(lora, f"{path}/{_SAVED}/{saved[path]}")
                return module.clone(parent=None).apply({"params": copy}, *call_args, **call_kwargs)
            out = next_fun(*call_args, **call_kwargs)
            if path not in by_path or context.method_name not in ("__call__", "attend"):
                return out
            kernel = meta.unbox(module.get_variable("params", _kernel_name(module)))
            bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
            x = call_args[0]
            for adapter, target in by_path[path]:
                values = _nested_get(lora, f"{path}/{adapter.name}")
                method = adapter.config.method
                if context.method_name == "attend":
                    out = out + method.attend_delta(values, target.op, x, kernel, target.settings)
                    continue
                dropout_key = (module.make_rng("dropout")
                               if target.settings.dropout > 0 and module.has_rng("dropout") else None)
                out = out + method.delta(values, target.op, x, kernel, out, meta.unbox(bias),
                                         target.settings, dropout_key)
            return out

        with nn.intercept_methods(intercept):
            return self.module.apply(_base_only(variables), *args, rngs=rngs, **kwargs)

    # -- training ---------------------------------------------------------------------------------
    def trainable_selector(self):
        """Selects the leaves that train: the ``"lora"`` collection plus the configured biases."""
        plans = self._require_plans()
        lora_only = {p for a in self.adapters if a.config.bias == "lora_only" for p in plans[a.name]}
        train_all_bias = any(a.config.bias == "all" for a in self.adapters)

        def selector(path: str, leaf: Any) -> bool:
            if path.startswith(COLLECTION + "/"):
                return True
            if path.startswith("params/") and path.endswith("/bias"):
                layer = path[len("params/"):-len("/bias")]
                return train_all_bias or layer in lora_only
            return False

        return selector

    def partition(self, variables: dict) -> tuple[dict, dict]:
        """``(trainable, frozen)`` halves of ``variables``; `peft_jax.core.combine` rejoins them."""
        return partition(variables, self.trainable_selector())

    def summary(self, variables: dict) -> ParamSummary:
        """Trainable / total parameter counts (``modules_to_save`` copies count as trainable)."""
        trainable, frozen = self.partition(meta.unbox(variables))
        t = count_params(trainable)
        return ParamSummary(trainable=t, total=t + count_params(frozen.get("params", {})))

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, variables: dict, *, keep_original: bool = True) -> dict:
        """Variables whose params have every adapter folded in; `apply` then skips the adapters.

        With ``keep_original`` the ``"merge_record"`` collection keeps the pre-merge kernels and
        `unmerge` is bitwise exact; otherwise it inverts the merge arithmetically.
        """
        if RECORD in variables:
            raise errors.StateError("these variables are already merged; unmerge them first")
        params = meta.unbox(variables["params"])
        record = {}
        for path, live, op in self._layers(variables):
            kernel_path = f"{path}/{_kernel_name_at(params, path)}"
            merged, rec = merge_kernel(live, op, _nested_get(params, kernel_path), keep_original=keep_original)
            params = _nested_set(params, kernel_path, merged)
            record[path] = rec
        for adapter in self.adapters:
            for path in self._saved_paths(adapter):
                record[f"{_SAVED}/{path}"] = _nested_get(params, path)
                params = _nested_set(params, path, _nested_get(
                    variables[COLLECTION], f"{path}/{_SAVED}/{adapter.name}"))
        return {**variables, "params": params, RECORD: record}

    def unmerge(self, variables: dict) -> dict:
        """Undoes `merge`."""
        if RECORD not in variables:
            raise errors.StateError("nothing to unmerge: these variables were not merged; call merge() first")
        params = variables["params"]
        for key, original in variables[RECORD].items():
            if key.startswith(_SAVED + "/"):
                params = _nested_set(params, key[len(_SAVED) + 1:], original)
        for path, live, op in self._layers(variables):
            kernel_path = f"{path}/{_kernel_name_at(params, path)}"
            params = _nested_set(params, kernel_path, unmerge_kernel(
                live, op, _nested_get(params, kernel_path), variables[RECORD][path]))
        return {k: v for k, v in variables.items() if k != RECORD} | {"params": params}

    def unload(self, variables: dict, *, merge_adapters: bool = True) -> dict:
        """Plain variables for the user's module: adapters merged (or dropped), copies swapped in."""
        merged = self.merge(variables, keep_original=False) if merge_adapters else variables
        return _base_only(merged)

    # -- helpers ----------------------------------------------------------------------------------
    def _require_plans(self) -> dict:
        if not self._plans:
            raise errors.StateError("this Peft handle has no plan yet: call peft.init(key, variables, "
                                    "*sample_inputs) (or peft.plan(variables, *sample_inputs)) first")
        return self._plans

    def _saved_paths(self, adapter: _Adapter) -> list[str]:
        if adapter.config.modules_to_save is None:
            return []
        match = compile_selector(adapter.config.modules_to_save)
        return [p for p in self._require_plans()["__modules__"] if match(p, None)]

    def _layers(self, variables: dict):
        plans = self._require_plans()
        lora = variables[COLLECTION]
        paths = {}
        for adapter in self.adapters:
            for path, target in plans[adapter.name].items():
                values = _nested_get(lora, f"{path}/{adapter.name}")
                paths.setdefault(path, (target.op, []))[1].append(
                    (adapter.config.method, values, target.settings))
        for path, (op, live) in paths.items():
            yield path, live, op


def _present(lora: dict, plan: dict[str, Target], name: str) -> bool:
    """Whether adapter ``name`` already has variables (checked at its first target)."""
    try:
        _nested_get(lora, f"{next(iter(plan))}/{name}")
        return True
    except KeyError:
        return False


def _kernel_name_at(params: dict, path: str) -> str:
    return "embedding" if "embedding" in _nested_get(params, path) else "kernel"


def _base_only(variables: dict) -> dict:
    return {k: v for k, v in variables.items() if k not in (COLLECTION, RECORD)}


def attach(module: nn.Module, config: LoraConfig, name: str = "default") -> Peft:
    """Wraps a Linen module (unmodified) with one adapter; chain ``.attach(...)`` for more.

    Example:
        >>> from flax import linen as nn
        >>> import peft_jax
        >>> peft = attach(nn.Dense(4), peft_jax.LoraConfig(targets=r".*"))
        >>> [a.name for a in peft.attach(peft_jax.LoraConfig(targets=r".*"), "second").adapters]
        ['default', 'second']
    """
    return Peft(module).attach(config, name)
