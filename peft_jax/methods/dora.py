"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

``W' = m * (W + s A B) / ||W + s A B||`` (norms per output feature over the input axes), built by
composition on `Lora`: ``y = g * (x W) + g * s (x A) B + bias`` with ``g = m / ||W + s A B||``. As
in the paper (Sec. 4.3) and HF PEFT, the norm is treated as a constant in the backward pass. The
training path gets the norm from ``||W||^2 + 2 s <W, A B> + s^2 ||A B||^2`` per column, which needs
only ``A^T W`` and ``A^T A`` (``r x out`` and ``r x r``), never the ``in x out`` matrix ``W + s A B``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> op = dense_op(6, 5)
    >>> w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(6, 5), (6, 2), (2, 5)]))
    >>> bool(jnp.allclose(column_norm(op, w, a, b, 0.5), exact_column_norm(op, w, a, b, 0.5), atol=1e-5))
    True
    >>> Dora(lora=Lora(rank=4)).lora.rank
    4
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import LinearSite, Mergeable, Method, Params
from peft_jax.methods.lora import Lora
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dora(Method, Mergeable):
    """DoRA on a linear site: ``lora``'s factors plus a trainable ``magnitude`` (``op.out_shape``)."""

    name: ClassVar[str] = "dora"
    lora: Lora = Lora()

    def __post_init__(self) -> None:
        if self.lora.lora_bias:
            raise errors.InvalidConfigError("DoRA does not support lora_bias (nor does HF PEFT)")

    @property
    def needs_rng(self) -> bool:
        return self.lora.needs_rng

    def check(self, site) -> None:
        super().check(site)
        self.lora.check(site)

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        params, updates = self.lora.init(key, site, base, shared)
        kernel = updates.get("kernel", base["kernel"])
        magnitude = exact_column_norm(site.op, kernel, params["lora_a"], params["lora_b"], self.lora.scale)
        return {**params, "magnitude": magnitude.astype(base["kernel"].dtype)}, updates

    def _gain(self, params: Params, op: LinearOp, kernel):
        norm = column_norm(op, kernel, params["lora_a"], params["lora_b"], self.lora.scale)
        return params["magnitude"].astype(jnp.float32) / jax.lax.stop_gradient(norm)

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        out = call(x)
        dtype = out.dtype
        op = site.op
        gain = self._gain(params, op, base["kernel"]).astype(dtype)
        lora = self.lora.delta(params, op, x, dtype, ctx)
        bias = base.get("bias")
        plain = out if bias is None else out - bias.astype(dtype)
        return out + op.scale_output(plain, gain - 1) + op.scale_output(lora, gain)

    def attend(self, params, shared, site: LinearSite, query, out, base):
        # Tied heads read the whole table anyway; DoRA's per-feature gain needs the merged rows here.
        merged, _ = self.merge(params, shared, site, base)
        return out + query @ (merged["kernel"] - base["kernel"]).astype(query.dtype).T

    def merge(self, params, shared, site: LinearSite, base):
        op, kernel, scale = site.op, base["kernel"], self.lora.scale
        norm = exact_column_norm(op, kernel, params["lora_a"], params["lora_b"], scale)
        gain = (params["magnitude"].astype(jnp.float32) / norm).reshape(op.fan_out)
        full = op.kernel_to_matrix(kernel).astype(jnp.float32) + op.kernel_to_matrix(
            self.lora.kernel_delta(params, shared, op)).astype(jnp.float32)
        return {"kernel": op.matrix_to_kernel(full * gain).astype(kernel.dtype)}, norm

    def unmerge(self, params, shared, site: LinearSite, base, record):
        op, merged = site.op, base["kernel"]
        gain = (params["magnitude"].astype(jnp.float32) / record).reshape(op.fan_out)
        full = op.kernel_to_matrix(merged).astype(jnp.float32) / gain
        update = self.lora.kernel_delta(params, shared, op)
        return {"kernel": (op.matrix_to_kernel(full) - update).astype(merged.dtype)}
