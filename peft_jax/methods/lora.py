"""LoRA: low-rank adaptation, ``y = x W + scale * (x A) B`` (Hu et al., 2021, arXiv:2106.09685).

rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) only changes ``scale`` to ``alpha / sqrt(rank)``.
The training path never forms ``W + scale * A @ B``: gradients flow through two thin matmuls and
the frozen ``W`` gets no weight-gradient matmul. ``lora_bias=True`` gives ``B`` a trainable bias,
as HF PEFT's ``lora_bias``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods import Context, LinearSite
    >>> site = LinearSite(path="q", op=dense_op(4, 3), layer="Linear", has_bias=False)
    >>> lora = Lora(rank=2, alpha=4.0)
    >>> base = {"kernel": jnp.ones((4, 3))}
    >>> params, _ = lora.init(jax.random.key(0), site, base, {})
    >>> x = jnp.ones((5, 4))
    >>> y = lora.apply(params, {}, site, lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.array_equal(y, x @ base["kernel"]))  # B starts at zero
    True
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import AddsToKernel, Context, LinearSite, Method, Params
from peft_jax.methods.initializers import KaimingUniform
from peft_jax.ops import LinearOp


def check_positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise errors.InvalidConfigError(f"{where} must be a positive integer, got {value!r}")


def check_positive(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise errors.InvalidConfigError(f"{where} must be a number > 0, got {value!r}")


def check_rate(value: Any, where: str) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise errors.InvalidConfigError(f"{where} must be in [0, 1), got {value!r}")


def input_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of ``x`` (identity without a key or at rate 0)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def low_rank(a: jax.Array, b: jax.Array, op: LinearOp, x: jax.Array, scale: float,
             out_dtype, dropout: float = 0.0, dropout_key: jax.Array | None = None) -> jax.Array:
    """``scale * op(x, A) @ B`` in ``out_dtype``: the thin two-matmul path."""
    if op.takes_dropout:
        x = input_dropout(x.astype(out_dtype), dropout, dropout_key)
    h = op.project_in(x, a.astype(out_dtype))
    return op.project_out(h * jnp.asarray(scale, out_dtype), b.astype(out_dtype))


def warn_rank_above(site: LinearSite, rank: int, what: str) -> None:
    """Warns when a rank exceeds ``min(fan_in, fan_out)`` (allowed, as in HF PEFT); planning
    gathers these into one warning per attach."""
    if rank > site.op.max_rank:
        warnings.warn(f"{what} rank {rank} on {site.path!r} is larger than min(fan_in, fan_out) = "
                      f"{site.op.max_rank}; the extra rank adds parameters but no expressiveness",
                      UserWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lora(Method, AddsToKernel):
    """LoRA on a linear site.

    Args:
        rank: ``r`` of ``A: (*in, r)`` and ``B: (r, *out)``.
        alpha: ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: input dropout on the low-rank path while training.
        use_rslora: rank-stabilised scaling.
        init_weights: how ``A`` and ``B`` start (`KaimingUniform`, `Gaussian`, `PiSSA`, `OLoRA`).
        lora_bias: a trainable bias on ``B`` (zero at init).
    """

    name: ClassVar[str] = "lora"
    grouped_conv: ClassVar[bool] = True
    batched_kernels: ClassVar[bool] = True
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: Any = KaimingUniform()
    lora_bias: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_positive(self.alpha, "alpha")
        check_rate(self.dropout, "dropout")
        if not callable(self.init_weights):
            raise errors.InvalidConfigError(
                f"init must be an initializer value such as peft_jax.PiSSA(), got {self.init_weights!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def needs_rng(self) -> bool:
        return self.dropout > 0

    def check(self, site) -> None:
        super().check(site)
        groups = getattr(site.op, "groups", 1)
        if getattr(site.op, "batched", False) and type(self.init_weights).__name__ in ("PiSSA", "OLoRA"):
            raise errors.InvalidConfigError(
                f"{type(self.init_weights).__name__} init on the stacked kernel {site.path!r} is not "
                "supported; use the default init there")
        if groups > 1:
            if self.rank % groups:
                raise errors.InvalidConfigError(
                    f"LoRA rank {self.rank} on the grouped convolution {site.path!r} "
                    f"(feature_group_count={groups}) must be a multiple of the group count (as in HF "
                    "PEFT); choose another rank or leave the layer out")
            if type(self.init_weights).__name__ in ("PiSSA", "OLoRA"):
                raise errors.InvalidConfigError(
                    f"{type(self.init_weights).__name__} init needs the kernel as one matrix, which the "
                    f"grouped convolution {site.path!r} is not; use the default init there")
        warn_rank_above(site, self.rank, "LoRA")

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        a, b, residual = self.init_weights(key, site.op, base["kernel"], self.rank, self.scale)
        params = {"lora_a": a, "lora_b": b}
        if self.lora_bias:
            params["lora_bias"] = jnp.zeros(site.op.out_shape, base["kernel"].dtype)
        return params, ({} if residual is None else {"kernel": residual})

    def delta(self, params: Params, op: LinearOp, x, out_dtype, ctx: Context) -> jax.Array:
        """``scale * ((x A) B + bias)``: what LoRA adds to the layer output."""
        y = low_rank(params["lora_a"], params["lora_b"], op, x, self.scale, out_dtype,
                     self.dropout, ctx.key)
        if "lora_bias" in params:
            y = y + jnp.asarray(self.scale, out_dtype) * params["lora_bias"].astype(out_dtype)
        return y

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        out = call(x)
        return out + self.delta(params, site.op, x, out.dtype, ctx)

    def attend(self, params, shared, site: LinearSite, query, out, base):
        a, b = params["lora_a"].astype(query.dtype), params["lora_b"].astype(query.dtype)
        return out + site.op.attend_low_rank(query, a, b) * jnp.asarray(self.scale, query.dtype)

    def kernel_delta(self, params: Params, shared: Params, op: LinearOp) -> jax.Array:
        """``scale * A @ B`` laid out like the kernel (merge only)."""
        return self.scale * op.factors_to_kernel(params["lora_a"], params["lora_b"])

    def merge(self, params, shared, site: LinearSite, base):
        if getattr(site.op, "groups", 1) > 1:
            raise errors.NotMergeableError(
                f"LoRA on the grouped convolution {site.path!r} cannot merge (nor in HF PEFT): its "
                "update is a full conv followed by a grouped 1x1 conv, not a grouped kernel")
        new, _ = super().merge(params, shared, site, base)
        if "lora_bias" in params:
            if "bias" not in base:
                raise errors.NotMergeableError(
                    f"LoRA with lora_bias on {site.path!r} cannot merge: the layer has no bias")
            new["bias"] = base["bias"] + (self.scale * params["lora_bias"]).astype(base["bias"].dtype)
        return new, None

    def unmerge(self, params, shared, site: LinearSite, base, record):
        new = super().unmerge(params, shared, site, base, record)
        if "lora_bias" in params:
            new["bias"] = base["bias"] - (self.scale * params["lora_bias"]).astype(base["bias"].dtype)
        return new
