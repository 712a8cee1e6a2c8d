"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

``W' = m * (W + s A B) / ||W + s A B||`` (norms per output feature over the input axes), built on
the LoRA path: ``y = g * (x W) + g * s (x A) B + bias`` with ``g = m / ||W + s A B||``. As in the
paper (Sec. 4.3) and HF PEFT, the norm is treated as a constant in the backward pass. The training
path gets the norm from ``||W||^2 + 2 s <W, A B> + s^2 ||A B||^2`` per column, which needs only
``A^T W`` and ``A^T A`` (``r x out`` and ``r x r``), never the ``in x out`` matrix ``W + s A B``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> op = dense_op(6, 5)
    >>> w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(6, 5), (6, 2), (2, 5)]))
    >>> bool(jnp.allclose(column_norm(op, w, a, b, 0.5), exact_column_norm(op, w, a, b, 0.5), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peft_jax.methods.base import Params, TargetSettings
from peft_jax.methods.lora import LORA, low_rank
from peft_jax.ops import LinearOp


def column_norm(op: LinearOp, kernel, a, b, scale: float) -> jax.Array:
    """``||W + s A B||`` per output feature, without forming ``W + s A B``. Shape ``op.out_shape``."""
    w = op.kernel_to_matrix(kernel).astype(jnp.float32)
    a2 = a.reshape(op.fan_in, -1).astype(jnp.float32)
    b2 = b.reshape(-1, op.fan_out).astype(jnp.float32)
    squared = (jnp.sum(w * w, axis=0)
               + 2.0 * scale * jnp.sum((a2.T @ w) * b2, axis=0)
               + scale * scale * jnp.sum(((a2.T @ a2) @ b2) * b2, axis=0))
    return jnp.sqrt(jnp.maximum(squared, 0.0)).reshape(op.out_shape)


def exact_column_norm(op: LinearOp, kernel, a, b, scale: float) -> jax.Array:
    """The same norm from the materialised ``W + s A B`` (merge path, and a reference for tests)."""
    full = op.kernel_to_matrix(kernel).astype(jnp.float32) + scale * (
        a.reshape(op.fan_in, -1).astype(jnp.float32) @ b.reshape(-1, op.fan_out).astype(jnp.float32))
    return jnp.linalg.norm(full, axis=0).reshape(op.out_shape)


@dataclasses.dataclass(frozen=True)
class Dora:
    """The DoRA math: LoRA's factors plus a trainable ``magnitude`` of shape ``op.out_shape``."""

    name: str = "dora"

    def init(self, key, op: LinearOp, kernel, settings: TargetSettings, initializer):
        params, residual = LORA.init(key, op, kernel, settings, initializer)
        base = kernel if residual is None else residual
        magnitude = exact_column_norm(op, base, params["lora_a"], params["lora_b"], settings.scale)
        return {**params, "magnitude": magnitude.astype(kernel.dtype)}, residual

    def _gain(self, params: Params, op: LinearOp, kernel, settings: TargetSettings):
        norm = column_norm(op, kernel, params["lora_a"], params["lora_b"], settings.scale)
        return params["magnitude"].astype(jnp.float32) / jax.lax.stop_gradient(norm)

    def delta(self, params: Params, op: LinearOp, x, kernel, base_out, bias,
              settings: TargetSettings, dropout_key=None):
        dtype = base_out.dtype
        gain = self._gain(params, op, kernel, settings).astype(dtype)
        lora = low_rank(params["lora_a"], params["lora_b"], op, x, settings.scale, dtype,
                        settings.dropout, dropout_key)
        plain = base_out if bias is None else base_out - bias.astype(dtype)
        return op.scale_output(plain, gain - 1) + op.scale_output(lora, gain)

    def attend_delta(self, params: Params, op: LinearOp, query, kernel, settings: TargetSettings):
        # Tied heads read the whole table anyway; DoRA's per-feature gain needs the merged rows here.
        merged, _ = self.merge(params, op, kernel, settings)
        return query @ (merged - kernel).astype(query.dtype).T

    def merge(self, params: Params, op: LinearOp, kernel, settings: TargetSettings):
        a, b = params["lora_a"], params["lora_b"]
        norm = exact_column_norm(op, kernel, a, b, settings.scale)
        gain = (params["magnitude"].astype(jnp.float32) / norm).reshape(op.fan_out)
        full = op.kernel_to_matrix(kernel).astype(jnp.float32) + settings.scale * (
            a.reshape(op.fan_in, -1).astype(jnp.float32) @ b.reshape(-1, op.fan_out).astype(jnp.float32))
        return op.matrix_to_kernel(full * gain).astype(kernel.dtype), norm

    def unmerge(self, params: Params, op: LinearOp, merged, record, settings: TargetSettings):
        gain = (params["magnitude"].astype(jnp.float32) / record).reshape(op.fan_out)
        full = op.kernel_to_matrix(merged).astype(jnp.float32) / gain
        update = settings.scale * op.factors_to_kernel(params["lora_a"], params["lora_b"])
        return (op.matrix_to_kernel(full) - update).astype(merged.dtype)


DORA = Dora()
