"""Selection methods: train parts of the model that already exist, on the module site.

* `TrainBias` (BitFit, Ben Zaken et al., 2021, arXiv:2106.10199): the selected layers' existing
  biases train in place. HF PEFT's ``bias="all"`` / ``"lora_only"`` are this method.
* `LnTuning` (Zhao et al., 2023, arXiv:2312.11420; HF ``LN_TUNING``): a trained copy of each
  selected module (usually a LayerNorm / RMSNorm) runs instead of it; merging swaps the copy in.
* `ModulesToSave` (HF ``modules_to_save``): the same for any module, e.g. a classifier head.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import ModuleSite
    >>> site = ModuleSite(path="norm", layer="LayerNorm", param_shapes={"scale": (4,), "bias": (4,)})
    >>> params, _ = LnTuning().init(None, site, {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, {})
    >>> sorted(params), TrainBias().trains_base
    (['bias', 'scale'], ('bias',))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import Mergeable, Method


def has_bias(site) -> bool:
    """Whether the site's layer has a ``bias`` leaf of its own."""
    return site.has_bias if site.kind == "linear" else "bias" in site.param_shapes


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainBias(Method, Mergeable):
    """The layer's existing ``bias`` trains in place (no new params; adapters never disable it).

    Merging is a no-op: the trained bias already is the base's.
    """

    name: ClassVar[str] = "bias"
    sites: ClassVar[tuple[str, ...]] = ("linear", "module")
    trains_base: ClassVar[tuple[str, ...]] = ("bias",)

    def check(self, site) -> None:
        super().check(site)
        if not has_bias(site):
            raise errors.UnsupportedLayerError(
                f"TrainBias on {site.path!r} ({site.layer}): the layer has no bias to train; "
                "narrow the targets, or add a new bias with Beft()")

    def init(self, key, site, base, shared):
        return {}, {}

    def apply(self, params, shared, site, call, x, base, ctx):
        return call(x)

    def merge(self, params, shared, site, base):
        return {}, None

    def unmerge(self, params, shared, site, base, record):
        return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainCopy(Method, Mergeable):
    """A trained copy of the module's params replaces them while the adapter is active."""

    name: ClassVar[str] = "train_copy"
    sites: ClassVar[tuple[str, ...]] = ("module",)

    def check(self, site) -> None:
        super().check(site)
        if not site.param_shapes:
            raise errors.UnsupportedLayerError(
                f"{type(self).__name__} on {site.path!r} ({site.layer}): the module has no params of "
                "its own to train")

    def init(self, key, site, base, shared):
        return jax.tree.map(lambda x: jnp.array(x, copy=True), base), {}

    def apply(self, params, shared, site, call, x, base, ctx):
        return call(x, params=params)

    def merge(self, params, shared, site, base):
        return jax.tree.map(lambda x: jnp.array(x, copy=True), params), base

    def unmerge(self, params, shared, site, base, record):
        return record


@dataclasses.dataclass(frozen=True, kw_only=True)
class LnTuning(TrainCopy):
    """LayerNorm / RMSNorm tuning: a trained copy of each selected norm (HF ``LN_TUNING``)."""

    name: ClassVar[str] = "ln_tuning"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModulesToSave(TrainCopy):
    """A module trained fully as a copy (HF ``modules_to_save``), e.g. a classifier head."""

    name: ClassVar[str] = "modules_to_save"
