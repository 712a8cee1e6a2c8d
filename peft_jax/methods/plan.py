"""Choosing and checking the layers an adapter goes on, shared by both front-ends.

Everything here runs before any compile: a selector that matches nothing, a layer type no method
supports, and a rank the layer cannot hold all fail here with a typed error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from peft_jax import errors
from peft_jax.core.select import select
from peft_jax.methods.base import TargetSettings
from peft_jax.ops import LinearOp


@dataclasses.dataclass(frozen=True)
class Target:
    """One layer to adapt: its module path, how it computes, and its settings."""

    path: str
    op: LinearOp
    settings: TargetSettings


def plan_targets(config, modules: Sequence[tuple[str, Any]],
                 op_of: Callable[[Any], LinearOp | None]) -> list[Target]:
    """Matches ``config.targets`` against module paths and builds a checked `Target` for each.

    Args:
        config: a `LoraConfig` (anything with ``targets`` and ``settings_for``).
        modules: ``(path, module)`` for every module of the model.
        op_of: the front-end's translation of a module into a `LinearOp` (``None``: unsupported).
    """
    by_path = dict(modules)
    targets = []
    for path in select(list(by_path), config.targets, what="LoRA targets"):
        module = by_path[path]
        try:
            op = op_of(module)
        except errors.UnsupportedLayerError as e:
            raise errors.UnsupportedLayerError(f"layer {path!r} ({type(module).__name__}): {e}") from None
        if op is None:
            raise errors.UnsupportedLayerError(
                f"layer {path!r} matched the targets but its type {type(module).__module__}."
                f"{type(module).__name__} cannot be adapted; supported: Dense/Linear, "
                "DenseGeneral/LinearGeneral, Einsum, Conv and Embed. Narrow `targets` to those layers.")
        settings = config.settings_for(path)
        if settings.rank > op.max_rank:
            raise errors.InvalidConfigError(
                f"rank {settings.rank} is larger than layer {path!r} allows: its kernel is a "
                f"{op.fan_in} x {op.fan_out} map, so the rank can be at most {op.max_rank}. "
                "Lower `rank` or override it for this layer with `rank_pattern`.")
        targets.append(Target(path=path, op=op, settings=settings))
    return targets
