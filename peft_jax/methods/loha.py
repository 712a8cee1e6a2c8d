"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo et al., 2022, FedPara, arXiv:2108.06098;
as packaged by LyCORIS, Yeh et al., 2023, arXiv:2309.14859).

The update is the element-wise product of two rank-``r`` matrices, so its rank can reach ``r**2``
with the parameters of two rank-``r`` LoRAs::

    dW = ((w1_b @ w1_a) * (w2_b @ w2_a)) * alpha / r          # (fan_in, fan_out)
    y  = call(x) + op(x, dW)

Layout: every factor is HF PEFT's tensor of the same name *transposed*, because our kernels are
``(in, out)`` where torch's are ``(out, in)``: ``hada_w1_b: (fan_in, r)``, ``hada_w1_a: (r, fan_out)``
(HF: ``hada_w1_b: (r, in)``, ``hada_w1_a: (out, r)``), likewise ``hada_w2_*``. Init as HF
(``init_weights=True``): ``w1_a, w1_b, w2_a`` Kaiming-uniform (bound ``1/sqrt(torch fan-in)``),
``w2_b = 0`` so ``dW`` starts at zero; ``init_weights=False`` makes ``w2_b`` Kaiming-uniform too.

Training regularisers, as HF does them (only when ``ctx.key`` is set): ``module_dropout`` skips the
whole update with that probability; ``rank_dropout`` zeroes each *output feature* of ``dW`` with
that probability and divides the kept ones by the kept fraction (HF's ``drop /= drop.mean()``).

Cost: a Hadamard product has no thin path. Each call forms ``dW`` (two ``fan_in x r x fan_out``
matmuls, ``4 r fan_in fan_out`` flops, and a ``fan_in x fan_out`` temporary and its gradient) and
then applies it with the layer's own op (``op.apply_kernel``), which costs as much as the frozen
layer itself (``2 N fan_in fan_out`` for ``N`` rows of a Dense). Merging removes all of that.

Every `LinearOp` works through ``kernel_to_matrix`` / ``matrix_to_kernel``. A convolution uses the
plain matrix form, ``fan_in = prod(window) * in_channels`` (in our kernel order ``(*window, in)``,
not torch's ``(in, *window)``); HF's ``use_effective_conv2d`` (CP) form is not implemented.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import AddsToKernel, Context, LinearSite
    >>> site = LinearSite(path="q", op=dense_op(6, 4), layer="Linear", has_bias=False)
    >>> loha = LoHa(rank=2, alpha=4.0)
    >>> base = {"kernel": jnp.ones((6, 4))}
    >>> params, _ = loha.init(jax.random.key(0), site, base, {})
    >>> sorted((k, v.shape) for k, v in params.items())
    [('hada_w1_a', (2, 4)), ('hada_w1_b', (6, 2)), ('hada_w2_a', (2, 4)), ('hada_w2_b', (6, 2))]
    >>> x = jnp.ones((3, 6))
    >>> y = loha.apply(params, {}, site, lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.array_equal(y, x @ base["kernel"]))  # w2_b starts at zero
    True
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import AddsToKernel, Context, LinearSite, Method, Params
from peft_jax.methods.lycoris import Lycoris, add_update, as_compute, kaiming_uniform, module_keep, rank_mask
from peft_jax.ops import LinearOp


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHa(Lycoris, Method, AddsToKernel):
    """LoHa on a linear site (HF PEFT ``LoHaConfig``).

    Args:
        rank: ``r`` of each of the two low-rank products (HF ``r``).
        alpha: ``scale = alpha / rank``.
        rank_dropout: training-time dropout of ``dW``'s output features (rescaled by the kept share).
        module_dropout: training-time probability of skipping the whole update.
        init_weights: ``True``: ``hada_w2_b = 0`` (starts at the base model); ``False``: all random.
    """

    name: ClassVar[str] = "loha"
    grouped_conv: ClassVar[bool] = True
    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.check_common("LoHa")
        if not isinstance(self.init_weights, bool):
            raise errors.InvalidConfigError(
                f"LoHa init_weights must be True or False, got {self.init_weights!r}")

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        op, r, dtype = site.op, self.rank, base["kernel"].dtype
        k = jax.random.split(key, 4)
        params = {
            "hada_w1_a": kaiming_uniform(k[0], (r, op.fan_out), dtype),
            "hada_w1_b": kaiming_uniform(k[1], (op.fan_in, r), dtype),
            "hada_w2_a": kaiming_uniform(k[2], (r, op.fan_out), dtype),
            "hada_w2_b": (jnp.zeros((op.fan_in, r), dtype) if self.init_weights
                          else kaiming_uniform(k[3], (op.fan_in, r), dtype)),
        }
        return params, {}

    def delta_matrix(self, params: Params) -> jax.Array:
        """``dW`` as a ``(fan_in, fan_out)`` matrix (HF's ``get_delta_weight``, transposed)."""
        w1 = params["hada_w1_b"] @ params["hada_w1_a"]
        w2 = params["hada_w2_b"] @ params["hada_w2_a"]
        return (w1 * w2) * jnp.asarray(self.scale, w1.dtype)

    def kernel_delta(self, params: Params, shared: Params, op: LinearOp) -> jax.Array:
        """``dW`` laid out like the kernel."""
        return op.matrix_to_kernel(self.delta_matrix(params))

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx: Context):
        out = call(x)
        op = site.op
        dw = self.delta_matrix(params).astype(out.dtype)
        mask = rank_mask(self.rank_dropout, op.fan_out, ctx, True, out.dtype)
        if mask is not None:
            dw = dw * mask[None, :]
        delta = op.apply_kernel(as_compute(x, out.dtype), op.matrix_to_kernel(dw))
        return add_update(out, delta, module_keep(self.module_dropout, ctx))

