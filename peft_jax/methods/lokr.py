"""LoKr: low-rank Kronecker product adaptation (Yeh et al., 2023, LyCORIS, arXiv:2309.14859;
KronA, Edalati et al., 2022, arXiv:2212.10650).

The feature sizes are factored as HF PEFT's ``factorization`` does, ``fan_in = in_m * in_n`` and
``fan_out = out_l * out_k`` (two divisors near the square root, or ``decompose_factor`` and the
cofactor), and the update is a Kronecker product::

    dW = kron(w1, w2) * alpha / r        w1: (in_m, out_l),  w2: (in_n, out_k)
    y  = call(x) + op(x, dW)

``w2`` is stored full when ``r >= max(out_k, in_n) / 2`` and as ``w2_b @ w2_a`` otherwise; ``w1`` is
full unless ``decompose_both`` and ``r < max(out_l, in_m) / 2`` (exactly HF's rules). Layout: each
2-D factor is HF's tensor of the same name transposed (our kernels are ``(in, out)``), since
``kron(A, B).T == kron(A.T, B.T)``: ``lokr_w1: (in_m, out_l)``, ``lokr_w1_b: (in_m, r)``,
``lokr_w1_a: (r, out_l)``, ``lokr_w2: (in_n, out_k)`` ... Inits as HF: ``init_weights=True`` zeroes
``w1`` (or ``w1_a``), ``"lycoris"`` zeroes ``w2`` (or ``w2_b``) instead, ``False`` zeroes nothing;
the rest is Kaiming-uniform (bound ``1/sqrt(torch fan-in)``).

Cost: on a Dense layer (a 2-D kernel) the training path never forms ``dW``: ``x`` is reshaped to
``(..., in_m, in_n)`` and contracted with ``w2`` then ``w1``, ``2 N (fan_in out_k + in_m fan_out)``
flops for ``N`` rows instead of ``2 N fan_in fan_out``, with only ``(..., in_m, out_k)`` as an
extra activation. Other ops (DenseGeneral with several axes, Einsum, Embed, Conv) materialise
``dW`` (``fan_in x fan_out``) and apply it with the layer's own op (``op.apply_kernel``).

A convolution is factored as HF does it: only the input *channels* split (``in_m * in_n``); the
window stays with ``w2``, ``lokr_w2: (*window, in_n, out_k)`` (HF: ``(out_k, in_n, *window)``) or
``lokr_w2_b: (*window, in_n, r)``, so parameter counts match HF's Conv layers (HF's
``use_effective_conv2d`` CP form is not implemented).

Training regularisers, as HF does them (only when ``ctx.key`` is set): ``module_dropout`` skips the
whole update with that probability; ``rank_dropout`` zeroes each output feature of ``dW`` with that
probability, divided by the kept share only with ``rank_dropout_scale`` (HF's default: not).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import AddsToKernel, Context, LinearSite
    >>> site = LinearSite(path="q", op=dense_op(64, 48), layer="Linear", has_bias=False)
    >>> lokr = LoKr(rank=2, alpha=4.0)
    >>> lokr.factors(site)  # ((in_m, in_n), (out_l, out_k))
    ((8, 8), (6, 8))
    >>> base = {"kernel": jnp.ones((64, 48))}
    >>> params, _ = lokr.init(jax.random.key(0), site, base, {})
    >>> sorted((k, v.shape) for k, v in params.items())
    [('lokr_w1', (8, 6)), ('lokr_w2_a', (2, 8)), ('lokr_w2_b', (8, 2))]
    >>> x = jnp.ones((3, 64))
    >>> y = lokr.apply(params, {}, site, lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.array_equal(y, x @ base["kernel"]))  # lokr_w1 starts at zero
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
from peft_jax.methods.lora import check_positive_int
from peft_jax.methods.lycoris import Lycoris, add_update, as_compute, kaiming_uniform, module_keep, rank_mask
from peft_jax.ops import ContractionOp, ConvOp, LinearOp


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """HF PEFT's (LyCORIS's) ``factorization``: ``(m, n)`` with ``m * n == dimension``.

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)`` as is; otherwise the
    divisor pair nearest the square root with ``m <= factor`` (``factor=-1``: no bound), ``m <= n``.

    Example:
        >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
        ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def _window(op: LinearOp) -> tuple[tuple[int, ...], int]:
    """``(window, in_dim)``: the kernel's window axes (conv only) and the factored input size."""
    if isinstance(op, ConvOp):
        return tuple(op.in_shape[:-1]), op.in_shape[-1]
    return (), op.fan_in


def _is_dense(op: LinearOp) -> bool:
    return (isinstance(op, ContractionOp) and len(op.in_shape) == 1 and len(op.out_shape) == 1
            and tuple(op.axis) == (-1,))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKr(Lycoris, Method, AddsToKernel):
    """LoKr on a linear site (HF PEFT ``LoKrConfig``).

    Args:
        rank: ``r`` of the factors stored as low-rank products.
        alpha: ``scale = alpha / rank``.
        decompose_both: also store ``w1`` as a low-rank product when ``r`` is small enough.
        decompose_factor: ``-1``: factor sizes near their square root; ``f > 0``: split every factored
            size as ``(f, size // f)`` (must divide it; HF silently falls back to a smaller divisor).
        rank_dropout: training-time dropout of ``dW``'s output features.
        rank_dropout_scale: divide the kept features by the kept share (HF's default: ``False``).
        module_dropout: training-time probability of skipping the whole update.
        init_weights: ``True`` (zero ``w1``), ``"lycoris"`` (zero ``w2``) or ``False`` (all random).
    """

    name: ClassVar[str] = "lokr"
    grouped_conv: ClassVar[bool] = True
    rank: int = 8
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False
    module_dropout: float = 0.0
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        self.check_common("LoKr")
        if self.decompose_factor != -1:
            check_positive_int(self.decompose_factor, "LoKr decompose_factor (or -1)")
        init = self.init_weights
        if not isinstance(init, (bool, str)) or init not in (True, False, "lycoris"):
            raise errors.InvalidConfigError(
                f"LoKr init_weights must be True, False or 'lycoris', got {self.init_weights!r}")

    # -- geometry ---------------------------------------------------------------------------------
    def factors(self, site: LinearSite) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((in_m, in_n), (out_l, out_k))`` for the site (HF's ``shape``, transposed)."""
        _, in_dim = _window(site.op)
        return (factorization(in_dim, self.decompose_factor),
                factorization(site.op.fan_out, self.decompose_factor))

    def _full(self, site: LinearSite) -> tuple[bool, bool]:
        (in_m, in_n), (out_l, out_k) = self.factors(site)
        use_w1 = not (self.decompose_both and self.rank < max(out_l, in_m) / 2)
        use_w2 = not (self.rank < max(out_k, in_n) / 2)
        return use_w1, use_w2

    def check(self, site) -> None:
        super().check(site)
        f = self.decompose_factor
        if f > 0:
            _, in_dim = _window(site.op)
            what = "input channels" if isinstance(site.op, ConvOp) else "input features"
            for name, size in ((what, in_dim), ("output features", site.op.fan_out)):
                if size % f:
                    raise errors.InvalidConfigError(
                        f"LoKr decompose_factor={f} does not divide the {size} {name} of "
                        f"{site.path!r} ({site.layer}); pick a factor of {size}, or -1")

    # -- state ------------------------------------------------------------------------------------
    def init(self, key, site: LinearSite, base: Params, shared: Params):
        window, _ = _window(site.op)
        (in_m, in_n), (out_l, out_k) = self.factors(site)
        use_w1, use_w2 = self._full(site)
        r, dtype, init = self.rank, base["kernel"].dtype, self.init_weights
        k = jax.random.split(key, 4)
        zero_w1, zero_w2 = init is True, init == "lycoris"

        def rand(i, shape, zero=False):
            return jnp.zeros(shape, dtype) if zero else kaiming_uniform(k[i], shape, dtype)

        params = {}
        if use_w1:
            params["lokr_w1"] = rand(0, (in_m, out_l), zero_w1)
        else:  # HF: w1_a (out_l, r) zeroed by the default init, w1_b (r, in_m)
            params["lokr_w1_a"] = rand(0, (r, out_l), zero_w1)
            params["lokr_w1_b"] = rand(1, (in_m, r))
        if use_w2:
            params["lokr_w2"] = rand(2, (*window, in_n, out_k), zero_w2)
        else:  # HF: w2_a (out_k, r), w2_b (r, in_n * window) zeroed by the "lycoris" init
            params["lokr_w2_a"] = rand(2, (r, out_k))
            params["lokr_w2_b"] = rand(3, (*window, in_n, r), zero_w2)
        return params, {}

    # -- math -------------------------------------------------------------------------------------
    def _w1_w2(self, params: Params) -> tuple[jax.Array, jax.Array]:
        w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_b"] @ params["lokr_w1_a"]
        if "lokr_w2" in params:
            w2 = params["lokr_w2"]
        else:
            b = params["lokr_w2_b"]
            w2 = jnp.tensordot(b, params["lokr_w2_a"], axes=1)
        return w1 * jnp.asarray(self.scale, w1.dtype), w2

    def delta_matrix(self, params: Params, op: LinearOp) -> jax.Array:
        """``scale * kron(w1, w2)`` as a ``(fan_in, fan_out)`` matrix (conv: window rows first)."""
        w1, w2 = self._w1_w2(params)
        window, _ = _window(op)
        w2 = w2.reshape(math.prod(window), *w2.shape[-2:])  # (W, in_n, out_k)
        dw = jnp.einsum("ac,wbd->wabcd", w1, w2)
        return dw.reshape(op.fan_in, op.fan_out)

    def kernel_delta(self, params: Params, shared: Params, op: LinearOp) -> jax.Array:
        """``dW`` laid out like the kernel (merge, and the path of non-Dense ops)."""
        return op.matrix_to_kernel(self.delta_matrix(params, op))

    def kron_apply(self, params: Params, x: jax.Array, dtype: Any) -> jax.Array:
        """``x @ dW`` on a Dense layer without forming ``dW``: ``(..., in_m, in_n)`` through ``w2``
        then ``w1``; ``dW[a*in_n + b, c*out_k + d] = w1[a, c] * w2[b, d]`` as ``torch.kron``."""
        w1, w2 = self._w1_w2(params)
        w1, w2 = w1.astype(dtype), w2.astype(dtype)
        (in_m, out_l), (in_n, out_k) = w1.shape, w2.shape
        xs = x.astype(dtype).reshape(*x.shape[:-1], in_m, in_n)
        t = jnp.einsum("...ab,bd->...ad", xs, w2)
        y = jnp.einsum("...ad,ac->...cd", t, w1)
        return y.reshape(*x.shape[:-1], out_l * out_k)

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx: Context):
        out = call(x)
        op = site.op
        mask = rank_mask(self.rank_dropout, op.fan_out, ctx, self.rank_dropout_scale, out.dtype)
        if _is_dense(op):
            delta = self.kron_apply(params, x, out.dtype)
            if mask is not None:
                delta = delta * mask
        else:
            dw = self.delta_matrix(params, op).astype(out.dtype)
            if mask is not None:
                dw = dw * mask[None, :]
            delta = op.apply_kernel(as_compute(x, out.dtype), op.matrix_to_kernel(dw))
        return add_update(out, delta, module_keep(self.module_dropout, ctx))

