"""An NNX model cut into the pieces a jitted step needs: graph, trainable, frozen, static data.

`peft_jax.nnx.split` gives ``(graphdef, trainable, frozen)``. A user module may keep plain Python
data marked as pytree data (``nnx.data``), and a non-array leaf cannot enter ``jax.jit``.
`split_model` therefore puts only variables in ``frozen`` and keeps any such data aside; it is
closed over, which is safe because it holds no arrays (a closed-over array would be baked into the
program as a constant).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> _ = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0"], rank=2,
    ...                         modules_to_save=["1"]), rngs=nnx.Rngs(2))
    >>> parts = split_model(model)
    >>> parts.merge(parts.trainable, parts.frozen)(jnp.ones((1, 4))).shape
    (1, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from peft_jax import errors
from peft_jax import nnx as peft_nnx

__all__ = ["ModelParts", "split_model"]


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """``graphdef``, ``trainable`` (every ``nnx.LoRAParam``), ``frozen`` (all other variables) and
    ``static`` (non-array leaves, closed over)."""

    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    static: nnx.State

    def merge(self, trainable: Any, frozen: Any) -> nnx.Module:
        """Rebuilds the model from (possibly traced) ``trainable`` and ``frozen``."""
        return nnx.merge(self.graphdef, trainable, frozen, self.static)

    def loss(self, model_loss: Callable[[nnx.Module, Any], Any]) -> Callable[..., Any]:
        """``model_loss(model, batch)`` as ``loss(trainable, frozen, batch)`` for
        `peft_jax.train.make_train_step`.

        Adapters with dropout draw fresh masks each step from ``batch["dropout_rng"]`` (added
        by `peft_jax.train.fit`; `peft_jax.nnx.seed_adapter_dropout`), since RNG state that
        travels in ``frozen`` cannot advance inside the step. Methods' loss terms (AdaLoRA's
        orthogonality) are added (`peft_jax.nnx.with_regularizer`).
        """

        def loss(trainable, frozen, batch):
            model = self.merge(trainable, frozen)
            peft_nnx.seed_adapter_dropout(model, batch)
            return peft_nnx.with_regularizer(model, model_loss(model, batch))

        return loss


def split_model(model: nnx.Module) -> ModelParts:
    """Splits ``model`` into `ModelParts`.

    Raises:
        InvalidConfigError: the model keeps an array outside any ``nnx.Variable`` (it would be
            baked into the compiled step); wrap it in ``nnx.Param`` or ``nnx.Variable``.
    """
    graphdef, trainable, frozen, static = nnx.split(model, nnx.LoRAParam, nnx.Variable, ...)
    arrays = [leaf for leaf in jax.tree.leaves(static) if hasattr(leaf, "shape")]
    if arrays:
        raise errors.InvalidConfigError(
            f"the model holds {len(arrays)} array(s) outside nnx.Variable; wrap them in "
            "nnx.Param (trainable base weight) or nnx.Variable (a buffer) so they can be passed "
            "to the compiled step")
    return ModelParts(graphdef, trainable, frozen, static)
