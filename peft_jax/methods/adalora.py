"""AdaLoRA: LoRA in SVD form whose rank moves to the layers that need it (Zhang et al. 2023,
"Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv:2303.10512).

Each adapted layer gets ``y = x W + scale * ((x A) * E) B`` with ``A: (*in, r)`` (HF's
``lora_A``, transposed), the singular values ``E: (r,)`` (HF's ``lora_E``) and ``B: (r, *out)``;
``r = init_r`` and ``scale = alpha / (init_r + 1e-5)``, HF PEFT's ``scaling / ranknum``. ``E``
starts at zero, ``A`` and ``B`` at ``N(0, 0.02)``. Training prunes rank by zeroing entries of
``E``: the allocator that does it is an optimizer transform,
`peft_jax.train.rank_allocation.allocate_ranks`, and a train step refuses AdaLoRA params
without it. The orthogonality penalty (`AdaLora.regularizer`) is added to the loss by
`peft_jax.nnx.make_loss` (Linen: ``peft.regularizer(variables)``).

The schedule's fields live here too (a method is its config); HF PEFT's names, with
``deltaT`` as ``delta_t``. `AdaLora.fold` turns a trained AdaLoRA into plain `Lora` with the
rank each layer kept (rows of zero ``E`` sliced away, scale folded into ``A``): mergeable and
exportable like any LoRA, with identical outputs.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import Context, LinearSite
    >>> site = LinearSite(path="q", op=dense_op(6, 4), layer="Linear", has_bias=False)
    >>> method = AdaLora(init_r=4, target_r=2, total_step=100)
    >>> params, _ = method.init(jax.random.key(0), site, {"kernel": jnp.ones((6, 4))}, {})
    >>> sorted((k, v.shape) for k, v in params.items())
    [('lora_a', (6, 4)), ('lora_b', (4, 4)), ('lora_e', (4,))]
    >>> x = jnp.ones((3, 6))
    >>> y = method.apply(params, {}, site, lambda x: x @ jnp.ones((6, 4)), x, {}, Context())
    >>> bool(jnp.array_equal(y, x @ jnp.ones((6, 4))))  # E starts at zero
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import errors
from peft_jax.methods.base import AddsToKernel, LinearSite, Method, Params
from peft_jax.methods.lora import (
    Lora,
    check_positive,
    check_positive_int,
    check_rate,
    input_dropout,
    warn_rank_above,
)
from peft_jax.ops import LinearOp

#: The names of AdaLoRA's params at a site; the allocator finds its factors by them.
FACTORS = ("lora_a", "lora_e", "lora_b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLora(Method, AddsToKernel):
    """AdaLoRA on a linear site, with HF PEFT's ``AdaLoraConfig`` fields.

    Args:
        init_r: the rank every layer starts with.
        target_r: the average rank per layer at the end (budget ``target_r * layers``).
        alpha: ``scale = alpha / (init_r + 1e-5)``.
        dropout: input dropout on the adapter path while training.
        tinit: steps of warm-up before any pruning (budget ``init_r * layers``).
        tfinal: final steps at the target budget, ranks frozen.
        delta_t: prune every ``delta_t`` steps in between (HF's ``deltaT``).
        beta1: EMA factor of the sensitivity ``|p * grad|``.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: weight of the orthogonality penalty on ``A`` and ``B``.
        total_step: the number of training steps (required).
        use_dora: kept for HF's field; AdaLoRA has no DoRA form, so ``True`` is an error.
    """

    name: ClassVar[str] = "adalora"
    regularizer_reduction: ClassVar[str] = "mean"
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.init_r, "init_r")
        check_positive_int(self.target_r, "target_r")
        check_positive(self.alpha, "alpha")
        check_rate(self.dropout, "dropout")
        check_positive_int(self.delta_t, "delta_t")
        check_positive(self.orth_reg_weight, "orth_reg_weight")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise errors.InvalidConfigError(f"{field} must be in [0, 1), got {value!r}")
        for field in ("tinit", "tfinal"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise errors.InvalidConfigError(f"{field} must be an integer >= 0, got {value!r}")
        if self.use_dora:
            raise errors.InvalidConfigError(
                "AdaLoRA cannot be combined with DoRA (nor in HF PEFT): its SVD-form update has no "
                "magnitude vector; use AdaLora without use_dora, or peft_jax.Dora for DoRA")
        if self.total_step is None:
            raise errors.InvalidConfigError(
                "AdaLora needs total_step, the number of training steps its budget schedule spans, "
                "e.g. AdaLora(init_r=12, target_r=8, total_step=1000)")
        check_positive_int(self.total_step, "total_step")
        if self.target_r > self.init_r:
            raise errors.InvalidConfigError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only removes "
                "rank; raise init_r or lower target_r")
        if self.tinit >= self.total_step - self.tfinal:
            raise errors.InvalidConfigError(
                f"tinit={self.tinit} + tfinal={self.tfinal} must be smaller than total_step="
                f"{self.total_step} (as HF PEFT requires): no steps would be left to prune in; "
                "lower tinit or tfinal, or train longer")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_r + 1e-5)

    @property
    def needs_rng(self) -> bool:
        return self.dropout > 0

    def check(self, site) -> None:
        super().check(site)
        warn_rank_above(site, self.init_r, "AdaLoRA")

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        dtype = base["kernel"].dtype
        ka, kb = jax.random.split(key)
        op = site.op
        return {
            "lora_a": 0.02 * jax.random.normal(ka, op.a_shape(self.init_r), dtype),
            "lora_e": jnp.zeros((self.init_r,), dtype),
            "lora_b": 0.02 * jax.random.normal(kb, op.b_shape(self.init_r), dtype),
        }, {}

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        out = call(x)
        dt = out.dtype
        op = site.op
        if op.takes_dropout:
            x = input_dropout(x.astype(dt), self.dropout, ctx.key)
        h = op.project_in(x, params["lora_a"].astype(dt))
        h = h * (params["lora_e"].astype(dt) * jnp.asarray(self.scale, dt))
        return out + op.project_out(h, params["lora_b"].astype(dt))

    def kernel_delta(self, params: Params, shared: Params, op: LinearOp) -> jax.Array:
        a = params["lora_a"] * params["lora_e"]
        return self.scale * op.factors_to_kernel(a, params["lora_b"])

    def regularizer(self, params, shared, site: LinearSite) -> jax.Array:
        """``orth_reg_weight * (|A^T A - I|_F + |B B^T - I|_F) / 2``; the front-ends average it
        over sites (``regularizer_reduction = "mean"``), which is HF PEFT's mean over all
        ``A`` and ``B`` matrices (the Frobenius norm, not its square)."""
        r = self.init_r
        a = params["lora_a"].reshape(-1, r).astype(jnp.float32)
        b = params["lora_b"].reshape(r, -1).astype(jnp.float32)
        eye = jnp.eye(r, dtype=jnp.float32)
        norm = lambda m: jnp.sqrt(jnp.sum(jnp.square(m)))  # noqa: E731
        return self.orth_reg_weight * (norm(a.T @ a - eye) + norm(b @ b.T - eye)) / 2

    def fold(self, shared: Params, sites: list[Any], params: dict[str, Params]):
        """Plain `Lora` per site with the rank it kept (the entries of ``E`` that are not
        zero), sliced, ``scale * E`` folded into ``A`` and ``alpha = rank`` (scale 1). A layer
        that kept no rank gets a rank-1 LoRA of zeros (LoRA has no rank 0)."""
        methods, out = {}, {}
        for site in sites:
            p = params[site.path]
            keep = np.flatnonzero(np.asarray(p["lora_e"]) != 0)
            a = p["lora_a"] * (p["lora_e"] * self.scale)
            if keep.size:
                a, b = a[..., keep], p["lora_b"][keep]
            else:
                keep = np.zeros(1, int)
                a, b = jnp.zeros_like(a[..., :1]), jnp.zeros_like(p["lora_b"][:1])
            rank = int(keep.size)
            methods[site.path] = Lora(rank=rank, alpha=float(rank), dropout=self.dropout)
            out[site.path] = {"lora_a": a, "lora_b": b}
        return methods, out


def as_lora_config(ranks: Mapping[str, int], *, dropout: float = 0.0) -> Any:
    """The `LoraConfig` of a folded AdaLoRA: ``ranks`` maps each adapted layer's path to the
    rank it kept; every layer gets ``alpha = rank`` (scale 1, as `AdaLora.fold` leaves it).
    Attach it to a fresh base and load the folded adapter's state to get the same model, or
    save it like any LoRA (HF PEFT's ``rank_pattern`` / ``alpha_pattern``).

    Example:
        >>> cfg = as_lora_config({"layers/0/q": 3, "layers/1/q": 5})
        >>> cfg.placements()[0].method_for("layers/1/q").rank
        5
    """
    import re

    from peft_jax.methods.config import LoraConfig

    if not ranks:
        raise errors.InvalidConfigError("as_lora_config needs the rank of at least one layer")
    exact = {re.escape(path): int(r) for path, r in ranks.items()}
    return LoraConfig(targets="|".join(exact), rank=max(exact.values()), alpha=float(max(exact.values())),
                      dropout=dropout, rank_pattern=exact,
                      alpha_pattern={k: float(v) for k, v in exact.items()})


def ranks_kept(params: Params) -> int:
    """The rank a site's AdaLoRA params still use: the entries of ``E`` that are not zero.

    Example:
        >>> ranks_kept({"lora_e": jnp.array([0.0, 0.3, 0.0, -1.0])})
        2
    """
    return int(np.count_nonzero(np.asarray(params["lora_e"])))
