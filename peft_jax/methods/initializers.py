"""How LoRA factors start: typed values, passed as ``LoraConfig(init=...)``.

Each initializer returns ``(A, B, residual_kernel)``; ``residual_kernel`` is ``None`` unless the
initializer moves part of the base weight into the adapter (PiSSA, OLoRA), in which case
``residual + scale * A @ B`` equals the original kernel, so the adapted model starts where the
base model was.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> a, b, res = KaimingUniform()(jax.random.key(0), dense_op(4, 3), jnp.ones((4, 3)), 2, 1.0)
    >>> a.shape, b.shape, res is None, float(abs(b).max())
    ((4, 2), (2, 3), True, 0.0)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from peft_jax.ops import LinearOp

Factors = tuple[jax.Array, jax.Array, "jax.Array | None"]


@dataclasses.dataclass(frozen=True)
class KaimingUniform:
    """HF PEFT's default: ``A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``B = 0`` (Hu et al., 2021)."""

    def __call__(self, key, op: LinearOp, kernel, rank: int, scale: float) -> Factors:
        bound = 1.0 / math.sqrt(op.fan_in)
        a = jax.random.uniform(key, op.a_shape(rank), kernel.dtype, -bound, bound)
        return a, jnp.zeros(op.b_shape(rank), kernel.dtype), None


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """``A ~ N(0, std^2)`` with ``std = 1/rank`` by default (HF PEFT ``init_lora_weights="gaussian"``), ``B = 0``."""

    std: float | None = None

    def __call__(self, key, op: LinearOp, kernel, rank: int, scale: float) -> Factors:
        std = self.std if self.std is not None else 1.0 / rank
        a = std * jax.random.normal(key, op.a_shape(rank), kernel.dtype)
        return a, jnp.zeros(op.b_shape(rank), kernel.dtype), None


def _split(op: LinearOp, kernel, a2, b2, scale: float) -> Factors:
    residual = op.kernel_to_matrix(kernel) - scale * (a2 @ b2)
    a = a2.reshape(op.a_shape(a2.shape[1])).astype(kernel.dtype)
    b = b2.reshape(op.b_shape(b2.shape[0])).astype(kernel.dtype)
    return a, b, op.matrix_to_kernel(residual).astype(kernel.dtype)


@dataclasses.dataclass(frozen=True)
class PiSSA:
    """Principal singular values and vectors (Meng et al., 2024, arXiv:2404.02948).

    ``W = U S V^T``; ``A = U_r sqrt(S_r / scale)``, ``B = sqrt(S_r / scale) V_r^T``; the base keeps the
    residual ``W - scale * A @ B``.
    """

    def __call__(self, key, op: LinearOp, kernel, rank: int, scale: float) -> Factors:
        w = op.kernel_to_matrix(kernel).astype(jnp.float32)
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s[:rank] / scale)
        return _split(op, kernel, u[:, :rank] * root, root[:, None] * vt[:rank], scale)


@dataclasses.dataclass(frozen=True)
class OLoRA:
    """Orthonormal init from a QR decomposition (Büyükakyüz, 2024, arXiv:2406.01775).

    As HF PEFT does it: with the ``(out, in)`` weight ``W^T = Q R``, ``A = R_r^T`` and ``B = Q_r^T``;
    the base keeps ``W - scale * A @ B``.
    """

    def __call__(self, key, op: LinearOp, kernel, rank: int, scale: float) -> Factors:
        w = op.kernel_to_matrix(kernel).astype(jnp.float32)
        q, r = jnp.linalg.qr(w.T)  # w.T: (fan_out, fan_in) -> q: (fan_out, k), r: (k, fan_in)
        return _split(op, kernel, r[:rank].T, q[:, :rank].T, scale)
