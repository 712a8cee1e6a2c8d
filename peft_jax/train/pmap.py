"""A ``jax.pmap`` data-parallel step, for research code built around pmap.

Params, optimizer state and the frozen base are replicated (a leading device axis); each device
takes ``B / n`` rows of the batch, computes the gradient of the *trainable* leaves on them, and a
``lax.pmean`` all-reduces those gradients (nothing else is reduced: frozen leaves have none). The
mean of equal-sized per-device mean losses is the full-batch mean, so the update equals the
single-device one. Prefer `peft_jax.train.sharding` (``jit`` over a mesh) for new code.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> loss = lambda t, f, b: jnp.mean((b["x"] @ (f["w"] + t["d"]) - b["y"]) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> trainable, frozen = {"d": jnp.zeros((3, 1))}, {"w": jnp.ones((3, 1))}
    >>> step = make_pmap_train_step(loss, tx)
    >>> t, s, f = replicate(trainable), replicate(step.init(trainable)), replicate(frozen)
    >>> batch = shard_batch({"x": jnp.ones((8, 3)), "y": jnp.zeros((8, 1))})
    >>> t, s, metrics = step(t, s, f, batch)
    >>> float(unreplicate(metrics)["loss"]), unreplicate(t)["d"].shape
    (9.0, (3, 1))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax import errors
from peft_jax.core import tree_items
from peft_jax.train.step import init_opt_state, make_step_fn, step_options

__all__ = ["make_pmap_train_step", "replicate", "shard_batch", "unreplicate"]


def _devices(devices: Sequence[Any] | None) -> list[Any]:
    return list(jax.local_devices() if devices is None else devices)


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
    """One copy of every leaf per device: a leading axis of size ``len(devices)``, placed.

    Example:
        >>> replicate({"w": jnp.ones(3)})["w"].shape
        (8, 3)
    """
    devices = _devices(devices)
    return jax.tree.map(lambda x: _put_replicated(x, devices), tree)


def _put_replicated(x: Any, devices: list[Any]) -> jax.Array:
    # pmap's own outputs carry this sharding: a 1-d mesh over the devices, split on axis 0.
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    stacked = jnp.broadcast_to(jnp.asarray(x)[None], (len(devices),) + np.shape(x))
    return jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices")))


def unreplicate(tree: Any) -> Any:
    """The first device's copy of every leaf (undoes `replicate`).

    Example:
        >>> unreplicate(replicate({"w": jnp.ones(3)}))["w"].shape
        (3,)
    """
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
    """Reshapes leading dims ``[B, ...] -> [n, B // n, ...]``; 0-d leaves (keys) are broadcast.

    Raises:
        BatchError: a leading dim that ``n`` does not divide (the message names both sizes).

    Example:
        >>> shard_batch({"x": jnp.ones((16, 3))})["x"].shape
        (8, 2, 3)
    """
    n = num_devices or jax.local_device_count()
    for path, x in tree_items(batch):
        if np.ndim(x) and np.shape(x)[0] % n:
            raise errors.BatchError(
                f"batch leaf {path!r} has leading dim {np.shape(x)[0]}, which does not divide "
                f"over {n} devices; use a batch size that is a multiple of {n}")

    def split(x):
        x = jnp.asarray(x)
        if not x.ndim:
            return jnp.broadcast_to(x, (n,))
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, batch)


def make_pmap_train_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                         axis_name: str = "batch", devices: Sequence[Any] | None = None,
                         has_aux: bool = False, donate: bool = True,
                         **options: Any) -> Callable[..., Any]:
    """The step of `peft_jax.train.make_train_step` under ``jax.pmap`` with a gradient ``pmean``.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch) -> loss`` (or ``(loss, aux)``).
        optimizer: an optax transformation.
        axis_name: the pmap axis name (use it in the loss for your own collectives).
        devices: the devices (default: every local device).
        has_aux, donate, **options: as for `peft_jax.train.make_train_step`. With a dropout key,
            each device folds its index into the step's key, so devices draw different masks.

    Returns:
        ``step(trainable, opt_state, frozen, batch)`` on replicated params and a `shard_batch`-ed
        batch, returning replicated ``(trainable, opt_state, metrics)``; ``step.init(trainable)``
        builds the (unreplicated) optimizer state.
    """
    opts = step_options(**options)
    fn = make_step_fn(loss_fn, optimizer, has_aux=has_aux, options=opts, axis_name=axis_name)
    step = jax.pmap(fn, axis_name=axis_name, devices=devices,
                    donate_argnums=(0, 1) if donate else ())
    step.init = functools.partial(init_opt_state, optimizer, options=opts)
    step.options = opts
    return step
