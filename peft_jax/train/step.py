"""The train-step factory: differentiate and update only the trainable subtree.

``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`` is jitted with the
trainable params and optimizer state donated. ``frozen`` is an argument, never a closure, so the
base weights are inputs of the compiled program rather than baked-in constants, and the gradient is
taken with respect to ``trainable`` alone: XLA never sees a weight-gradient matmul for a frozen leaf.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> def loss(trainable, frozen, batch):
    ...     w = frozen["w"] + trainable["a"] @ trainable["b"]
    ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> trainable = {"a": jnp.ones((3, 1)), "b": jnp.zeros((1, 2))}
    >>> frozen = {"w": jnp.zeros((3, 2))}
    >>> step = make_train_step(loss, tx)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}
    >>> trainable, opt_state, metrics = step(trainable, tx.init(trainable), frozen, batch)
    >>> round(float(metrics["loss"]), 3)
    1.0
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

LossFn = Callable[[Any, Any, Any], Any]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True) -> Callable[..., Any]:
    """Builds the jitted step.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch) -> loss`` (or ``(loss, aux_dict)`` with
            ``has_aux``). For NNX models, `peft_jax.nnx.make_loss` builds it from
            ``model_loss(model, batch)``; for Linen, close over the `peft_jax.linen.Peft` object.
        optimizer: any optax transformation; its state is built by ``optimizer.init(trainable)``,
            so it holds moments for the trainable leaves only.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux entries join the metrics.
        donate: donate ``trainable`` and ``opt_state`` buffers to the step (the default).

    Returns:
        ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``, a
        ``jax.jit`` function (``step.lower(...)`` gives the compiled cost analysis).
    """
    grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=has_aux)

    def step(trainable, opt_state, frozen, batch):
        value, grads = grad_fn(trainable, frozen, batch)
        loss, aux = value if has_aux else (value, {})
        # optax mixes int step counts with floats; keep users' strict dtype promotion working.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
