"""`weighted_lora` and `to_lora` on an NNX model: read named adapters, attach the result.

``add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "ab", combination_type="svd")`` is HF
PEFT's ``model.add_weighted_adapter``; ``convert_to_lora(model, "dora", rank=8)`` attaches a LoRA
approximation of any mergeable adapter. The new adapter is attached *inactive*, as HF PEFT adds
it without switching to it: run it with ``peft_jax.nnx.set_active(model, new_name)``.

Example:
    >>> from flax import nnx
    >>> import peft_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> for n in ("a", "b"):
    ...     _ = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1), name=n)
    >>> _ = add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    >>> dict(model.layers[0].slots())["ab"].methods[0].rank
    4
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from flax import nnx

from peft_jax import errors
from peft_jax import nnx as peft_nnx
from peft_jax.arithmetic.state import as_config
from peft_jax.arithmetic.to_lora import ConversionReport, to_lora
from peft_jax.arithmetic.weighted import weighted_lora
from peft_jax.methods.base import Method

__all__ = ["ModelAdapter", "add_weighted_adapter", "attach_adapter", "convert_to_lora", "read_adapter"]


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """One named adapter of a model as values: what `weighted_lora` / `to_lora` take."""

    name: str
    sites: dict[str, tuple[Method, ...]]
    state: dict[str, jax.Array]
    ops: dict[str, Any]
    base: dict[str, dict[str, jax.Array]]


def read_adapter(model: nnx.Module, name: str) -> ModelAdapter:
    """Adapter ``name`` of ``model``: its methods, state, layer ops and base arrays per site."""
    known = peft_nnx.adapter_names(model)
    if name not in known:
        raise errors.AdapterNameError(f"no adapter named {name!r} is attached (attached: {sorted(known)})")
    sites, ops, base = {}, {}, {}
    for path, layer in peft_nnx.adapted_layers(model):
        slots = dict(layer.slots())
        if name not in slots:
            continue
        if layer.merge_record is not None:
            raise errors.StateError(f"{path!r} holds merged adapters, so its kernel is not the base; "
                                    "call peft_jax.nnx.unmerge(model) first")
        sites[path] = tuple(slots[name].methods)
        ops[path] = getattr(layer.site, "op", None)
        base[path] = layer._base()
    return ModelAdapter(name, sites, peft_nnx.adapter_state(model, name), ops, base)


def attach_adapter(model: nnx.Module, sites: Mapping[str, Any], state: Mapping[str, jax.Array], name: str, *,
                   active: bool = False) -> nnx.Module:
    """Attaches ``sites`` as adapter ``name`` and loads ``state`` into it (inactive by default)."""
    peft_nnx.attach(model, as_config(sites), rngs=nnx.Rngs(0), name=name)
    peft_nnx.load_adapter_state(model, dict(state))
    for _, layer in peft_nnx.adapted_layers(model):
        slots = dict(layer.slots())
        if name in slots:
            slots[name].active = active
    return model


def _free(model: nnx.Module, name: str) -> None:
    if name in peft_nnx.adapter_names(model):
        raise errors.AdapterNameError(f"an adapter named {name!r} is already attached; choose another new name")


def add_weighted_adapter(model: nnx.Module, adapters: list[str], weights: list[float], new_name: str,
                         combination_type: str = "svd", **options: Any) -> nnx.Module:
    """Attaches ``new_name``, the weighted combination of the named LoRA adapters (HF PEFT's
    ``add_weighted_adapter``); ``options`` are `weighted_lora`'s (``svd_rank``, ``svd_clamp``,
    ``density``, ``majority_sign_method``, ``key``, ``masks``). Returns ``model``."""
    _free(model, new_name)
    read = [read_adapter(model, n) for n in adapters]
    ops = {p: op for r in read for p, op in r.ops.items()}
    sites, state = weighted_lora([(r.sites, r.state, r.name) for r in read], weights, combination_type,
                                 name=new_name, ops=ops, **options)
    return attach_adapter(model, sites, state, new_name)


def convert_to_lora(model: nnx.Module, name: str, rank: int | Mapping[str, int], *,
                    new_name: str | None = None) -> ConversionReport:
    """Attaches ``new_name`` (default ``"<name>_lora"``), adapter ``name`` converted to a LoRA of
    ``rank`` by `to_lora`; returns the per-layer report."""
    new_name = new_name or f"{name}_lora"
    _free(model, new_name)
    src = read_adapter(model, name)
    sites, state, report = to_lora(src.sites, src.state, rank, base=src.base, ops=src.ops, name=new_name)
    attach_adapter(model, sites, state, new_name)
    return report
