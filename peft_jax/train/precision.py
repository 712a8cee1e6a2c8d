"""Mixed precision: frozen base stored in bf16, adapters and optimizer state in fp32.

Two pieces. `cast_floating` changes how a pytree is *stored* (cast the frozen base once, before
training, to halve its memory). `Precision` is the *compute* policy of a step: inside the loss the
float leaves of ``trainable``, ``frozen`` and the batch are cast to ``compute_dtype`` and the loss
comes back in ``output_dtype``. The trainable params stay fp32 outside the loss, so their gradients
(the transpose of the cast), the optimizer moments and the update are fp32.

A model whose layers carry their own ``dtype`` (``nnx.Linear(dtype=jnp.float32)``, the reference
``Decoder(dtype=...)``) computes in that dtype whatever the params are stored in; build it with
``dtype=jnp.bfloat16`` to compute in bf16, or keep ``dtype=jnp.float32`` to store in bf16 and
compute in fp32.

Example:
    >>> import jax.numpy as jnp
    >>> frozen = cast_floating({"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}, jnp.bfloat16)
    >>> frozen["w"].dtype, frozen["step"].dtype
    (dtype(bfloat16), dtype('int32'))
    >>> policy = Precision(compute_dtype=jnp.bfloat16)
    >>> loss = policy.wrap(lambda t, f, b: jnp.sum(t["a"] * f["w"]))
    >>> loss({"a": jnp.ones((2, 2))}, frozen, {}).dtype
    dtype('float32')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["Precision", "cast_floating"]


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts every floating-point leaf of ``tree`` to ``dtype``; other leaves are kept as they are.

    Integer, boolean and PRNG-key leaves (step counters, RNG streams in an NNX state) are untouched.

    Args:
        tree: any pytree of arrays (an ``nnx.State``, a dict of params, a batch).
        dtype: the target float dtype, e.g. ``jnp.bfloat16``.

    Returns:
        A pytree of the same structure.

    Example:
        >>> cast_floating({"a": jnp.ones(2), "i": jnp.arange(2)}, jnp.bfloat16)["a"].dtype
        dtype(bfloat16)
    """

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """The compute policy of a step's loss.

    Attributes:
        compute_dtype: float leaves of trainable, frozen (and the batch) are cast to this dtype
            inside the loss. ``jnp.float32`` with a bf16-stored base computes in fp32.
        output_dtype: dtype of the returned loss and of float aux values.
        cast_batch: also cast the batch's float leaves (inputs, targets) to ``compute_dtype``.

    Example:
        >>> Precision(compute_dtype=jnp.bfloat16).compute_dtype
        <class 'jax.numpy.bfloat16'>
    """

    compute_dtype: Any = jnp.bfloat16
    output_dtype: Any = jnp.float32
    cast_batch: bool = True

    def wrap(self, loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
        """Returns ``loss_fn`` computing under this policy (same signature)."""

        def loss(trainable, frozen, batch):
            trainable = cast_floating(trainable, self.compute_dtype)
            frozen = cast_floating(frozen, self.compute_dtype)
            if self.cast_batch:
                batch = cast_floating(batch, self.compute_dtype)
            out = loss_fn(trainable, frozen, batch)
            if has_aux:
                value, aux = out
                return value.astype(self.output_dtype), cast_floating(aux, self.output_dtype)
            return out.astype(self.output_dtype)

        return loss
