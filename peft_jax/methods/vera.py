"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

One pair of frozen random projections is shared by every adapted layer of an adapter:
``vera_A: (r, max_in)`` and ``vera_B: (max_out, r)``, sized by the largest ``fan_in`` / ``fan_out``
among the adapter's sites and sliced per layer (``A_l = vera_A[:, :fan_in]``,
``B_l = vera_B[:fan_out, :]``). Each layer trains only two vectors::

    y = call(x) + lambda_b * (((dropout(x) A_l^T) * lambda_d) B_l^T)

``vera_lambda_d: (r,)`` starts at ``d_initial`` and ``vera_lambda_b`` (the output features) at zero,
so the adapted model starts as the base. There is no ``alpha`` scaling (as in HF PEFT).

Cost: ``r + fan_out`` trainable parameters per layer (vs. ``r * (fan_in + fan_out)`` for LoRA), plus
one shared ``r * (max_in + max_out)`` frozen pair. The forward pass is LoRA's thin path (two rank-``r``
matmuls through `LinearOp.project_in` / `project_out`, so every layer kind works); the
``(fan_in, fan_out)`` delta is formed only by `Vera.merge`.

The projections are kaiming-uniform as in HF PEFT (``U(-sqrt(6 / fan), sqrt(6 / fan))`` with
``fan = max_in`` for ``vera_A`` and ``r`` for ``vera_B``) but drawn from
``jax.random.key(projection_prng_key)``, not torch's generator: the same key gives the same
projections here, not HF's (import HF's ``vera_A`` / ``vera_B`` to reproduce an HF adapter).
``save_projection`` says whether checkpoints store them (as HF PEFT's flag).

Shared projections with a larger rank or larger dimensions than needed are sliced (HF PEFT allows
that when adapters share them); smaller ones raise `InvalidConfigError` (`Vera.check_shared`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import AddsToKernel, Context, LinearSite
    >>> sites = [LinearSite(path=p, op=dense_op(4, n), layer="Linear", has_bias=False)
    ...          for p, n in (("q", 3), ("v", 6))]
    >>> vera = Vera(rank=2)
    >>> shared = vera.init_shared(jax.random.key(0), sites, jnp.float32)
    >>> shared["vera_A"].shape, shared["vera_B"].shape
    ((2, 4), (6, 2))
    >>> base = {"kernel": jnp.ones((4, 3))}
    >>> params, _ = vera.init(jax.random.key(1), sites[0], base, shared)
    >>> {k: v.shape for k, v in params.items()}
    {'vera_lambda_b': (3,), 'vera_lambda_d': (2,)}
    >>> x = jnp.ones((5, 4))
    >>> y = vera.apply(params, shared, sites[0], lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.array_equal(y, x @ base["kernel"]))  # lambda_b starts at zero
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import AddsToKernel, Context, LinearSite, Method, Params
from peft_jax.methods.lora import check_positive_int, check_rate, input_dropout
from peft_jax.ops import LinearOp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Vera(Method, AddsToKernel):
    """VeRA on a linear site.

    Args:
        rank: ``r``, the rows of the shared ``vera_A`` (HF's default 256).
        projection_prng_key: seed of the shared projections (``jax.random.key``).
        d_initial: initial value of every ``vera_lambda_d`` entry.
        dropout: input dropout on the adapter path while training.
        save_projection: whether checkpoints store the shared projections.
    """

    name: ClassVar[str] = "vera"
    rank: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    save_projection: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_rate(self.dropout, "dropout")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise errors.InvalidConfigError(
                f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if (isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float))
                or not math.isfinite(self.d_initial)):
            raise errors.InvalidConfigError(f"d_initial must be a finite number, got {self.d_initial!r}")
        if not isinstance(self.save_projection, bool):
            raise errors.InvalidConfigError(
                f"save_projection must be True or False, got {self.save_projection!r}")

    @property
    def needs_rng(self) -> bool:
        return self.dropout > 0

    # -- state ------------------------------------------------------------------------------------
    def init_shared(self, key, sites: list, dtype: Any) -> Params:
        """``vera_A: (r, max_in)`` and ``vera_B: (max_out, r)`` for all ``sites``; ``key`` is unused
        (the projections come from ``projection_prng_key``, so they can be rebuilt from the config)."""
        ops = [s.op for s in sites if getattr(s, "op", None) is not None]
        if not ops:
            raise errors.InvalidConfigError(
                "VeRA found no linear layers among its targets to size its shared projections; "
                "check the targets")
        max_in = max(op.fan_in for op in ops)
        max_out = max(op.fan_out for op in ops)
        key_a, key_b = jax.random.split(jax.random.key(self.projection_prng_key))
        return {"vera_A": _kaiming_uniform(key_a, (self.rank, max_in), max_in, dtype),
                "vera_B": _kaiming_uniform(key_b, (max_out, self.rank), self.rank, dtype)}

    def check_shared(self, shared: Params, site: LinearSite) -> None:
        """Raises `InvalidConfigError` if ``shared``'s projections are too small for ``site``."""
        a, b = shared["vera_A"], shared["vera_B"]
        op = site.op
        for what, have, need in (("vera_A rows (its rank)", a.shape[0], self.rank),
                                 ("vera_B columns (its rank)", b.shape[1], self.rank),
                                 ("vera_A columns", a.shape[1], op.fan_in),
                                 ("vera_B rows", b.shape[0], op.fan_out)):
            if have < need:
                raise errors.InvalidConfigError(
                    f"VeRA on {site.path!r}: the shared projections have {have} {what} but "
                    f"{need} are needed (rank={self.rank}, fan_in={op.fan_in}, fan_out={op.fan_out}); "
                    "a VeRA rank or layer larger than its shared projections allow — rebuild the "
                    "projections for this adapter or lower its rank")

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        if shared:
            self.check_shared(shared, site)
        dtype = base["kernel"].dtype
        return {"vera_lambda_b": jnp.zeros(site.op.out_shape, dtype),
                "vera_lambda_d": jnp.full((self.rank,), self.d_initial, dtype)}, {}

    def factors(self, shared: Params, op: LinearOp, dtype) -> tuple[jax.Array, jax.Array]:
        """This layer's slices ``(A: op.a_shape(r), B: op.b_shape(r))`` of the shared projections."""
        a = shared["vera_A"][:self.rank, :op.fan_in].T.reshape(op.a_shape(self.rank))
        b = shared["vera_B"][:op.fan_out, :self.rank].T.reshape(op.b_shape(self.rank))
        return a.astype(dtype), b.astype(dtype)

    # -- running ----------------------------------------------------------------------------------
    def delta(self, params: Params, shared: Params, op: LinearOp, x, out_dtype, ctx: Context):
        """``lambda_b * ((x A^T * lambda_d) B^T)``: what VeRA adds to the layer output."""
        a, b = self.factors(shared, op, out_dtype)
        if op.takes_dropout:
            x = input_dropout(x.astype(out_dtype), self.dropout, ctx.key)
        h = op.project_in(x, a) * params["vera_lambda_d"].astype(out_dtype)
        return op.scale_output(op.project_out(h, b), params["vera_lambda_b"].astype(out_dtype))

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        self.check_shared(shared, site)
        out = call(x)
        return out + self.delta(params, shared, site.op, x, out.dtype, ctx)

    def attend(self, params, shared, site: LinearSite, query, out, base):
        if not hasattr(site.op, "attend_low_rank"):
            return super().attend(params, shared, site, query, out, base)
        a, b = self._scaled_factors(params, shared, site.op, query.dtype)
        return out + site.op.attend_low_rank(query, a, b)

    # -- merging ----------------------------------------------------------------------------------
    def _scaled_factors(self, params, shared, op: LinearOp, dtype):
        a, b = self.factors(shared, op, dtype)
        a = a * params["vera_lambda_d"].astype(dtype)
        b = (b.reshape(self.rank, op.fan_out)
             * params["vera_lambda_b"].astype(dtype).reshape(1, op.fan_out)).reshape(b.shape)
        return a, b

    def kernel_delta(self, params: Params, shared: Params, op: LinearOp) -> jax.Array:
        """The ``(A diag(lambda_d)) (B diag(lambda_b))`` update laid out like the kernel (merge only)."""
        a, b = self._scaled_factors(params, shared, op, jnp.float32)
        return op.factors_to_kernel(a, b)

    def merge(self, params, shared, site: LinearSite, base):
        self.check_shared(shared, site)
        return super().merge(params, shared, site, base)


def _kaiming_uniform(key, shape, fan: int, dtype) -> jax.Array:
    """torch's ``kaiming_uniform_(a=0)``: ``U(-b, b)`` with ``b = sqrt(3) * sqrt(2) / sqrt(fan)``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
