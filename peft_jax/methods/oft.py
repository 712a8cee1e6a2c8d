"""OFT: orthogonal fine-tuning (Qiu et al., 2023, arXiv:2306.07280), in HF PEFT's current form
(block-diagonal Cayley rotations with an optional Neumann series, Qiu et al., 2025, OFTv2,
arXiv:2506.19847).

The frozen layer's *input features* are rotated by a block-diagonal ``R`` of ``n`` blocks of size
``b`` (``n * b == fan_in``; set exactly one of ``r = n`` or ``oft_block_size = b``)::

    y = call(x R),     R = diag(R_1, ..., R_n),     x: (..., fan_in) split into (..., n, b)

Each block comes from a skew-symmetric ``Q_i`` built from ``b (b - 1) / 2`` trainable numbers
(``oft_r: (n, b(b-1)/2)``, the strict upper triangle row by row; one shared row with
``block_share``). As HF: the exact Cayley map is ``R = (I - Q)(I + Q)^-1``; the default Neumann form
(``use_cayley_neumann``, ``k = num_cayley_neumann_terms``) is
``R = I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1)``, which truncates ``(I + Q)(I - Q)^-1`` (the exact
map's inverse, i.e. ``Q -> -Q``); it is only approximately orthogonal. ``oft_r`` starts at zero
(``R = I``; ``init_weights=False``: ``N(0, 0.1^2)``).

COFT (``coft=True``) keeps each ``||Q_i||_F <= eps / sqrt(rows of oft_r)``: the projection runs in
the forward pass with a straight-through gradient. HF also writes the projected value back into
its parameter each step; a pure function cannot, so the stored ``oft_r`` may drift outside the
ball while the rotation used never does (outputs match HF, training trajectories may not).

``module_dropout`` (training only) replaces ``int(p * n)`` random blocks by the identity, HF's
``MultiplicativeDropoutLayer`` (no effect with ``block_share``). Note that HF PEFT 0.21 builds that
layer but its forward never calls it, so there ``module_dropout`` is a no-op.

Cost: forming ``R`` is ``O(k n b^3)``; rotating costs ``2 N fan_in b`` flops for ``N`` rows plus the
frozen layer (no extra weight gradient for it). Merging folds ``R`` into the kernel's input side,
``W' = R W``; unmerging solves ``R W = W'`` block by block (exact for the Neumann form too).

Only layers whose input features are the trailing contracted axes of ``x`` (Dense, DenseGeneral
over trailing axes); Conv, Embed and Einsum sites raise `UnsupportedLayerError`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import Context, LinearSite
    >>> site = LinearSite(path="q", op=dense_op(8, 3), layer="Linear", has_bias=False)
    >>> oft = OFT(oft_block_size=4)
    >>> base = {"kernel": jnp.ones((8, 3))}
    >>> params, _ = oft.init(jax.random.key(0), site, base, {})
    >>> params["oft_r"].shape  # 2 blocks of 4 x 4, 6 numbers each
    (2, 6)
    >>> x = jnp.ones((5, 8))
    >>> y = oft.apply(params, {}, site, lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.allclose(y, x @ base["kernel"]))  # R starts at the identity
    True
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import errors
from peft_jax.methods.base import Context, LinearSite, Mergeable, Method, Params
from peft_jax.methods.lora import check_positive, check_positive_int, check_rate
from peft_jax.ops import ContractionOp


def _nonneg_int(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidConfigError(f"{where} must be an integer >= 0, got {value!r}")


def skew(vec: jax.Array, block_size: int) -> jax.Array:
    """``(rows, b(b-1)/2) -> (rows, b, b)``: the strict upper triangle from ``vec`` (row-major),
    minus its transpose."""
    rows, cols = np.triu_indices(block_size, 1)
    q = jnp.zeros((vec.shape[0], block_size, block_size), vec.dtype).at[:, rows, cols].set(vec)
    return q - jnp.swapaxes(q, -1, -2)


def cayley(q: jax.Array, neumann: bool, terms: int) -> jax.Array:
    """HF's ``_cayley_batch`` of skew-symmetric ``q: (rows, b, b)``."""
    eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
    if not neumann:  # R (I + Q) = I - Q
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2),
                                             jnp.swapaxes(eye - q, -1, -2)), -1, -2)
    r = eye
    two = jnp.asarray(2.0, q.dtype)
    if terms > 1:
        r = r + two * q
        if terms > 2:
            power = q @ q
            r = r + two * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + two * power
            r = r + power @ q
    return r


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFT(Method, Mergeable):
    """OFT on a Dense / DenseGeneral site (HF PEFT ``OFTConfig``; same field names and defaults).

    Args:
        r: number of blocks ``n`` (``0``: derive it from ``oft_block_size``).
        oft_block_size: block size ``b`` (``0``: derive it from ``r``). Exactly one is non-zero.
        module_dropout: training-time share of blocks replaced by the identity.
        coft: constrain each ``Q_i`` to a Frobenius ball of radius ``eps / sqrt(rows)``.
        eps: the COFT radius.
        block_share: one rotation block shared by all ``n`` blocks.
        use_cayley_neumann: the truncated Neumann series instead of the exact Cayley map.
        num_cayley_neumann_terms: terms of that series.
        init_weights: ``True``: ``oft_r = 0`` (identity); ``False``: ``N(0, 0.1^2)``.
    """

    name: ClassVar[str] = "oft"
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True

    def __post_init__(self) -> None:
        _nonneg_int(self.r, "OFT r")
        _nonneg_int(self.oft_block_size, "OFT oft_block_size")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise errors.InvalidConfigError(
                f"OFT needs exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) "
                "to be non-zero, since r * oft_block_size == in_features; e.g. OFT(r=4, "
                "oft_block_size=0) or OFT(oft_block_size=32)")
        check_rate(self.module_dropout, "OFT module_dropout")
        check_positive(self.eps, "OFT eps")
        check_positive_int(self.num_cayley_neumann_terms, "OFT num_cayley_neumann_terms")
        if not isinstance(self.init_weights, bool):
            raise errors.InvalidConfigError(
                f"OFT init_weights must be True or False, got {self.init_weights!r}")

    @property
    def needs_rng(self) -> bool:
        return self.module_dropout > 0

    # -- geometry ---------------------------------------------------------------------------------
    def blocks(self, site: LinearSite) -> tuple[int, int]:
        """``(n, b)``: the number of rotation blocks and their size on ``site``."""
        fan_in = site.op.fan_in
        if self.r:
            return self.r, fan_in // self.r
        return fan_in // self.oft_block_size, self.oft_block_size

    def check(self, site) -> None:
        super().check(site)
        op = site.op
        n_axes = len(op.in_shape)
        if not isinstance(op, ContractionOp) or (
                all(a < 0 for a in op.axis) and tuple(op.axis) != tuple(range(-n_axes, 0))):
            raise errors.UnsupportedLayerError(
                f"OFT cannot be attached to {site.path!r} ({site.layer}): it rotates the input "
                "features, which must be the trailing contracted axes of a Dense / DenseGeneral "
                "layer (not a Conv, Embed or Einsum); narrow its targets")
        fan_in = op.fan_in
        if self.r:
            if fan_in % self.r:
                raise errors.InvalidConfigError(
                    f"OFT r={self.r} does not divide the {fan_in} input features of {site.path!r} "
                    f"({site.layer}); pick r dividing {fan_in}")
        elif fan_in % self.oft_block_size:
            raise errors.InvalidConfigError(
                f"OFT oft_block_size={self.oft_block_size} does not divide the {fan_in} input "
                f"features of {site.path!r} ({site.layer}); pick a block size dividing {fan_in}")
        if self.blocks(site)[1] < 2:
            raise errors.InvalidConfigError(
                f"OFT on {site.path!r} ({site.layer}) would use 1 x 1 blocks, which have nothing to "
                "train; use fewer blocks (smaller r) or a larger oft_block_size")

    # -- state ------------------------------------------------------------------------------------
    def init(self, key, site: LinearSite, base: Params, shared: Params):
        n, b = self.blocks(site)
        shape = (1 if self.block_share else n, b * (b - 1) // 2)
        dtype = base["kernel"].dtype
        if self.init_weights:
            return {"oft_r": jnp.zeros(shape, dtype)}, {}
        return {"oft_r": 0.1 * jax.random.normal(key, shape, dtype)}, {}

    # -- math -------------------------------------------------------------------------------------
    def project(self, vec: jax.Array, block_size: int) -> jax.Array:
        """COFT's projection (HF ``_project_batch``): each ``Q_i`` scaled into the Frobenius ball of
        radius ``eps / sqrt(rows)``."""
        eps = float(self.eps / np.sqrt(vec.shape[0]))
        norm = jnp.linalg.norm(skew(vec, block_size), axis=(1, 2))[:, None]
        safe = jnp.where(norm > eps, norm, jnp.ones_like(norm))
        return jnp.where(norm <= eps, vec, vec * (jnp.asarray(eps, vec.dtype) / safe))

    def rotation_blocks(self, params: Params, site: LinearSite, ctx: Context = Context()) -> jax.Array:
        """``(n, b, b)``: the blocks of ``R`` (module dropout applied when ``ctx.key`` is set)."""
        n, b = self.blocks(site)
        vec = params["oft_r"]
        if self.coft:  # straight-through: forward uses the projection, gradient passes as identity
            vec = vec + jax.lax.stop_gradient(self.project(vec, b) - vec)
        rot = cayley(skew(vec, b), self.use_cayley_neumann, self.num_cayley_neumann_terms)
        if rot.shape[0] == 1 and n > 1:
            rot = jnp.broadcast_to(rot, (n, b, b))
        elif ctx.key is not None and self.module_dropout > 0:
            drop = int(self.module_dropout * n)
            mask = jax.random.permutation(ctx.key, jnp.arange(n) < drop)[:, None, None]
            rot = jnp.where(mask, jnp.eye(b, dtype=rot.dtype), rot)
        return rot

    def rotate(self, x: jax.Array, rot: jax.Array, n_axes: int) -> jax.Array:
        """``x R`` over the trailing ``n_axes`` axes of ``x``."""
        n, b, _ = rot.shape
        lead = x.shape[:x.ndim - n_axes]
        xs = x.astype(rot.dtype).reshape(*lead, n, b)
        return jnp.einsum("...rk,rkc->...rc", xs, rot).reshape(x.shape).astype(x.dtype)

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx: Context):
        op = site.op
        n_axes = len(op.in_shape)
        axes = tuple(a % x.ndim for a in op.axis)
        if axes != tuple(range(x.ndim - n_axes, x.ndim)):
            raise errors.UnsupportedLayerError(
                f"OFT on {site.path!r} ({site.layer}): the layer contracts input axes {op.axis} of "
                f"a rank-{x.ndim} input, not its trailing axes; OFT needs the features last")
        return call(self.rotate(x, self.rotation_blocks(params, site, ctx), n_axes))

    def _blocks_of(self, site: LinearSite, kernel: jax.Array):
        n, b = self.blocks(site)
        dtype = jnp.float64 if kernel.dtype == jnp.float64 else jnp.float32
        return site.op.kernel_to_matrix(kernel).astype(dtype).reshape(n, b, -1), dtype

    def merge(self, params, shared, site: LinearSite, base):
        kernel = base["kernel"]
        w, dtype = self._blocks_of(site, kernel)
        rot = self.rotation_blocks(params, site).astype(dtype)
        merged = jnp.einsum("rkc,rco->rko", rot, w).reshape(site.op.fan_in, site.op.fan_out)
        return {"kernel": site.op.matrix_to_kernel(merged).astype(kernel.dtype)}, None

    def unmerge(self, params, shared, site: LinearSite, base, record):
        kernel = base["kernel"]
        w, dtype = self._blocks_of(site, kernel)
        rot = self.rotation_blocks(params, site).astype(dtype)
        orig = jnp.linalg.solve(rot, w).reshape(site.op.fan_in, site.op.fan_out)
        return {"kernel": site.op.matrix_to_kernel(orig).astype(kernel.dtype)}
