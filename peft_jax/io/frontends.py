"""What a saved adapter needs from each front-end, and how a loaded one goes back in.

`AdapterParts` is the front-end-neutral view of one named adapter: its sites (path, kind and
the methods on it), its canonical state (`peft_jax.nnx.adapter_state` layout, plus base leaves
trained in place under ``<path>/<adapter>/trained_base/<leaf>``), and the frozen base tensors
that identify the model it belongs to. `nnx_parts` / `linen_parts` read it; `write_nnx` /
`write_linen` put a state back. One layout for both front-ends, so an adapter saved from one
loads into the other on the same architecture.

Example:
    >>> import peft_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> _ = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1))
    >>> parts = nnx_parts(model, "default")
    >>> [(p, k, [m.name for m in ms]) for p, k, ms in parts.sites], sorted(parts.state)
    ([('layers/0', 'linear', ['lora'])], ['layers/0/default/lora_a', 'layers/0/default/lora_b'])
    >>> sorted(parts.base)
    ['layers/0/bias', 'layers/0/kernel']
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from peft_jax import errors
from peft_jax.core.paths import tree_items
from peft_jax.methods.base import Method
from peft_jax.methods.initializers import OLoRA, PiSSA
from peft_jax.methods.selection import TrainCopy

__all__ = ["AdapterParts", "TRAINED_BASE", "linen_parts", "nnx_parts", "rename", "write_linen",
           "write_nnx"]

#: the path segment under which base leaves trained in place (biases) are saved.
TRAINED_BASE = "trained_base"


@dataclasses.dataclass(frozen=True)
class AdapterParts:
    """One adapter as files need it; see the module docstring."""

    name: str
    architecture: str
    sites: tuple[tuple[str, str, tuple[Method, ...]], ...]
    state: dict[str, np.ndarray]
    #: frozen base tensors by the user's own paths (no wrapper segments), less ``unchecked``.
    base: dict[str, Any]
    #: base leaves left out of ``base``: trained in place, or rewritten when the adapter is
    #: attached (PiSSA / OLoRA residual kernels).
    unchecked: tuple[str, ...] = ()


def rewrites_base(method: Any) -> bool:
    """Whether attaching ``method`` replaces base arrays (a PiSSA / OLoRA init, at any depth)."""
    if isinstance(method, (PiSSA, OLoRA)):
        return True
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        return any(rewrites_base(getattr(method, f.name)) for f in dataclasses.fields(method))
    return False


def rename(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """The canonical keys of adapter ``old`` under the name ``new``.

    Example:
        >>> rename({"q/a/lora_a": 1, "a/shared/x": 2}, "a", "b")
        {'q/b/lora_a': 1, 'b/shared/x': 2}
    """
    out = {}
    for key, value in state.items():
        parts = key.split("/")
        if parts[0] == old and len(parts) > 1 and parts[1] == "shared":
            parts[0] = new
        else:
            at = _name_index(parts, old, key)
            parts[at] = new
        out["/".join(parts)] = value
    return out


def _name_index(parts: list[str], name: str, key: str) -> int:
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == name:
            return i
    raise errors.CheckpointError(f"key {key!r} does not belong to adapter {name!r}")


def _numpy(values: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in values.items()}


def _missing(name: str, known: set[str]) -> errors.AdapterNameError:
    return errors.AdapterNameError(
        f"no adapter named {name!r} is attached (attached: {sorted(known)}); pass name=")


# --- NNX --------------------------------------------------------------------------------------------
def _replaced(sites: list, base: dict[str, Any]) -> set[str]:
    """Base leaves of modules the adapter trains whole (`TrainCopy`: modules_to_save, LayerNorm
    tuning): the adapter holds their copy, so the originals (a fresh head, say) do not identify the base."""
    prefixes = [path + "/" for path, _, methods in sites if any(isinstance(m, TrainCopy) for m in methods)]
    return {p for p in base if any(p.startswith(prefix) for prefix in prefixes)}


def nnx_parts(model: nnx.Module, name: str) -> AdapterParts:
    """Adapter ``name`` of an NNX model (see `AdapterParts`)."""
    from peft_jax import nnx as peft_nnx  # noqa: PLC0415 (peft_jax.nnx imports peft_jax.io)

    sites, trained, rewritten = [], {}, set()
    for path, layer in peft_nnx.adapted_layers(model):
        slots = dict(layer.slots())
        if name not in slots:
            continue
        methods = tuple(slots[name].methods)
        sites.append((path, layer.site.kind, methods))
        for m in methods:
            for leaf in m.trains_base:
                trained[f"{path}/{name}/{TRAINED_BASE}/{leaf}"] = getattr(layer.base_layer, leaf)[...]
            if rewrites_base(m):
                rewritten.add(f"{path}/{peft_nnx._kernel_name(layer.base_layer)}")
    if not sites:
        raise _missing(name, peft_nnx.adapter_names(model))
    state = {**_numpy(peft_nnx.adapter_state(model, name)), **_numpy(trained)}
    trained_paths = {k.replace(f"/{name}/{TRAINED_BASE}/", "/") for k in trained}
    everything = nnx_base(model)
    skip = trained_paths | rewritten | _replaced(sites, everything)
    base = {p: v for p, v in everything.items() if p not in skip}
    return AdapterParts(name, _architecture(model), tuple(sites), state, base, tuple(sorted(skip)))


def nnx_base(model: nnx.Module) -> dict[str, Any]:
    """Frozen base params of an NNX model by the user's paths (adapter wrappers removed)."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    out = {}
    for path, leaf in tree_items(state):
        parts = [p for p in path.split("/") if p != "base_layer"]
        out["/".join(parts)] = leaf
    return out


def write_nnx(model: nnx.Module, name: str, state: dict[str, Any]) -> None:
    """Writes a canonical state (adapter params and trained base leaves) into adapter ``name``."""
    from peft_jax import nnx as peft_nnx  # noqa: PLC0415

    marker = f"/{name}/{TRAINED_BASE}/"
    own = {k: v for k, v in state.items() if marker not in k}
    peft_nnx.load_adapter_state(model, own)
    layers = dict(peft_nnx.adapted_layers(model))
    for key, value in state.items():
        if marker in key:
            path, leaf = key.split(marker)
            var = getattr(layers[path].base_layer, leaf)
            var[...] = np.asarray(value).astype(var[...].dtype).reshape(var[...].shape)


def expected_shapes(plan: Any, base: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The canonical keys and shapes an adapter built from ``plan`` (an `AdapterPlan`) holds,
    computed without building it; trained-in-place leaves take their shapes from ``base``."""
    out: dict[str, tuple[int, ...]] = {}
    for s in plan.sites:
        for m in s.methods:
            shapes = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, np.float32), m.param_shapes(s.site),
                                  is_leaf=lambda x: isinstance(x, tuple))
            for key, leaf in tree_items(shapes):
                out[f"{s.path}/{plan.name}/{key}"] = tuple(leaf.shape)
            for leaf in m.trains_base:
                out[f"{s.path}/{plan.name}/{TRAINED_BASE}/{leaf}"] = tuple(np.shape(base[f"{s.path}/{leaf}"]))
    for m in plan.methods:
        sites = plan.sites_of(m)

        def shared(m=m, sites=sites):
            key = jax.random.key(0)
            return {**m.init_shared(key, sites, jax.numpy.float32),
                    **m.init_shared_params(key, sites, jax.numpy.float32)}

        for key, leaf in tree_items(jax.eval_shape(shared)):
            out[f"{plan.name}/shared/{key}"] = tuple(leaf.shape)
    return out


def check_state(state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    """Raises `CheckpointError` naming the first tensor that is missing, extra or misshapen."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise errors.CheckpointError(f"the saved adapter lacks tensor {missing[0]!r} (and {len(missing) - 1} "
                                     "more) that its config needs; the file is incomplete")
    if extra:
        raise errors.CheckpointError(f"the saved tensor {extra[0]!r} has no place in the adapter its "
                                     "config builds on this model")
    for key in sorted(expected):
        if tuple(np.shape(state[key])) != expected[key]:
            raise errors.CheckpointError(
                f"the saved tensor {key!r} has shape {list(np.shape(state[key]))}, but on this model the "
                f"adapter needs {list(expected[key])}; load it onto the base it was saved from")


def _architecture(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --- Linen ------------------------------------------------------------------------------------------
def linen_parts(handle: Any, variables: dict, name: str) -> AdapterParts:
    """Adapter ``name`` of a planned Linen handle and its variables (see `AdapterParts`)."""
    from flax.core import meta  # noqa: PLC0415

    plans = {a.name: a for a in handle._require_plans()}
    if name not in plans:
        raise _missing(name, set(plans))
    params = meta.unbox(variables["params"])
    sites, trained, rewritten = [], {}, set()
    for s in plans[name].sites:
        sites.append((s.path, s.site.kind, tuple(s.methods)))
        for m in s.methods:
            for leaf in m.trains_base:
                trained[f"{s.path}/{name}/{TRAINED_BASE}/{leaf}"] = _get(params, f"{s.path}/{leaf}")
            if rewrites_base(m):
                rewritten.update(f"{s.path}/{k}" for k, _ in tree_items(_get(params, s.path)) if k != "bias")
    state = {**_numpy(handle.adapter_state(variables, name)), **_numpy(trained)}
    trained_paths = {k.replace(f"/{name}/{TRAINED_BASE}/", "/") for k in trained}
    everything = dict(tree_items(params))
    skip = trained_paths | rewritten | _replaced(sites, everything)
    base = {p: v for p, v in everything.items() if p not in skip}
    return AdapterParts(name, _architecture(handle.module), tuple(sites), state, base, tuple(sorted(skip)))


def linen_base(variables: dict) -> dict[str, Any]:
    """The ``params`` collection of Linen variables, flat (the base: adapters live elsewhere)."""
    from flax.core import meta  # noqa: PLC0415

    return dict(tree_items(meta.unbox(variables["params"])))


def write_linen(handle: Any, variables: dict, name: str, state: dict[str, Any]) -> dict:
    """``variables`` with a canonical state written into adapter ``name``."""
    from flax.core import meta  # noqa: PLC0415

    from peft_jax.linen import _nested_set  # noqa: PLC0415

    marker = f"/{name}/{TRAINED_BASE}/"
    out = handle.load_adapter_state(variables, {k: v for k, v in state.items() if marker not in k})
    params = meta.unbox(out["params"])
    for key, value in state.items():
        if marker in key:
            path, leaf = key.split(marker)
            old = _get(params, f"{path}/{leaf}")
            params = _nested_set(params, f"{path}/{leaf}",
                                 jax.numpy.asarray(value, old.dtype).reshape(old.shape))
    return {**out, "params": params}


def _get(tree: dict, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree
