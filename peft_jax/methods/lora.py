"""LoRA: low-rank adaptation, ``y = x W + scale * (x A) B`` (Hu et al., 2021, arXiv:2106.09685).

rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) only changes ``scale`` to ``alpha / sqrt(rank)``;
see `peft_jax.methods.LoraConfig`. The training path never forms ``W + scale * A @ B``: gradients
flow through two thin matmuls and the frozen ``W`` gets no weight-gradient matmul.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import TargetSettings
    >>> from peft_jax.methods.initializers import KaimingUniform
    >>> op, w = dense_op(4, 3), jnp.ones((4, 3))
    >>> s = TargetSettings(rank=2, alpha=4.0, scale=2.0, dropout=0.0)
    >>> params, _ = LORA.init(jax.random.key(0), op, w, s, KaimingUniform())
    >>> x = jnp.ones((5, 4))
    >>> float(abs(LORA.delta(params, op, x, w, x @ w, None, s, None)).max())  # B starts at zero
    0.0
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peft_jax.methods.base import Params, TargetSettings
from peft_jax.ops import EmbedOp, LinearOp


def _input_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def low_rank(a: jax.Array, b: jax.Array, op: LinearOp, x: jax.Array, scale: float,
             out_dtype, dropout: float = 0.0, dropout_key: jax.Array | None = None) -> jax.Array:
    """``scale * op(x, A) @ B`` in ``out_dtype``: the thin two-matmul path."""
    if op.takes_dropout:
        x = _input_dropout(x.astype(out_dtype), dropout, dropout_key)
    h = op.project_in(x, a.astype(out_dtype))
    return op.project_out(h * jnp.asarray(scale, out_dtype), b.astype(out_dtype))


@dataclasses.dataclass(frozen=True)
class Lora:
    """The LoRA math; one instance, `LORA`, serves every layer and both front-ends."""

    name: str = "lora"

    def init(self, key, op: LinearOp, kernel, settings: TargetSettings, initializer):
        a, b, residual = initializer(key, op, kernel, settings.rank, settings.scale)
        return {"lora_a": a, "lora_b": b}, residual

    def delta(self, params: Params, op: LinearOp, x, kernel, base_out, bias,
              settings: TargetSettings, dropout_key=None):
        return low_rank(params["lora_a"], params["lora_b"], op, x, settings.scale, base_out.dtype,
                        settings.dropout, dropout_key)

    def attend_delta(self, params: Params, op: EmbedOp, query, kernel, settings: TargetSettings):
        a, b = params["lora_a"].astype(query.dtype), params["lora_b"].astype(query.dtype)
        return op.attend_low_rank(query, a, b) * jnp.asarray(settings.scale, query.dtype)

    def merge(self, params: Params, op: LinearOp, kernel, settings: TargetSettings):
        update = settings.scale * op.factors_to_kernel(params["lora_a"], params["lora_b"])
        return (kernel + update.astype(kernel.dtype)), None

    def unmerge(self, params: Params, op: LinearOp, merged, record, settings: TargetSettings):
        update = settings.scale * op.factors_to_kernel(params["lora_a"], params["lora_b"])
        return merged - update.astype(merged.dtype)


LORA = Lora()
