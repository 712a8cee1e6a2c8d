"""(IA)^3: learned rescaling vectors (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning", arXiv:2205.05638).

Each adapted layer gets one trainable vector ``l`` (HF PEFT's ``ia3_l``), initialised to ones so the
model starts exactly where the base model was:

* ``feedforward=False`` (keys, values): the *output* is rescaled, ``y = call(x) * l`` with ``l`` of
  the layer's output feature shape (``op.out_shape``; the bias is rescaled too, as in HF PEFT).
* ``feedforward=True`` (the second feed-forward matmul): the *input* is rescaled,
  ``y = call(x * l)`` with ``l`` of the input feature shape: the contracted axes of a Dense /
  DenseGeneral (any ``axis``), the input channels of a Conv (HF's ``(1, in, 1, 1)``), or the
  contracted kernel axes of an Einsum (broadcast onto the input by their einsum letters). An Embed
  takes integer ids, which cannot be rescaled, so it only takes ``feedforward=False``.

Cost: ``fan_out`` (or ``fan_in``) parameters per layer and one elementwise multiply per call; no
matmul is added. Merging folds ``l`` into the kernel (``W * l`` per output column, or per input row
for ``feedforward=True``) and, for output scaling, into the bias. `IA3.unmerge` divides by ``l``
exactly, where HF PEFT divides by ``l + 1e-8`` (so HF's unmerge is off by a relative 1e-8 and ours
is exact but undefined where an entry of ``l`` is exactly zero). A tied output head
(`Method.attend`) is not supported: ``query @ (W diag(l)).T`` needs the kernel as earlier methods
left it, which ``attend`` does not see.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import Context, LinearSite
    >>> site = LinearSite(path="v", op=dense_op(4, 3), layer="Linear", has_bias=False)
    >>> base = {"kernel": jnp.ones((4, 3))}
    >>> ia3 = IA3()
    >>> params, _ = ia3.init(jax.random.key(0), site, base, {})
    >>> params["ia3_l"].shape, IA3(feedforward=True).param_shapes(site)["ia3_l"]
    ((3,), (4,))
    >>> x = jnp.ones((2, 4))
    >>> y = ia3.apply(params, {}, site, lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.array_equal(y, x @ base["kernel"]))  # l starts at ones
    True
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import errors
from peft_jax.methods.base import LinearSite, Mergeable, Method, Params
from peft_jax.ops import ContractionOp, ConvOp, EinsumOp, LinearOp
from peft_jax.ops.einsum import _spec


def input_feature_shape(op: LinearOp) -> tuple[int, ...] | None:
    """The shape of an input-scaling vector for ``op``, or ``None`` if its input cannot be scaled."""
    if isinstance(op, (ContractionOp, EinsumOp)):
        return tuple(op.in_shape)
    if isinstance(op, ConvOp):
        return tuple(op.in_shape[-1:])  # input channels (channels-last); the window is not scaled
    return None


def scale_input(op: LinearOp, x: jax.Array, l: jax.Array) -> jax.Array:
    """``x`` with each input feature (the axes ``op`` contracts) multiplied by ``l``."""
    if isinstance(op, EinsumOp):
        return jnp.einsum(_spec(f"{op.lhs},{op.in_letters}->{op.lhs}"), x, l)
    if isinstance(op, ContractionOp):
        axes = [ax % x.ndim for ax in op.axis]  # l's axis i is contracted with x's axis axes[i]
        order = np.argsort(axes)
        shape = [1] * x.ndim
        for ax in axes:
            shape[ax] = x.shape[ax]
        return x * jnp.transpose(l, order).reshape(shape)
    return x * l  # ConvOp: channels last


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3(Method, Mergeable):
    """(IA)^3 on a linear site.

    Args:
        feedforward: scale the layer's input (HF PEFT's ``feedforward_modules``) instead of its output.
    """

    name: ClassVar[str] = "ia3"
    feedforward: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.feedforward, bool):
            raise errors.InvalidConfigError(
                f"feedforward must be True or False, got {self.feedforward!r}")

    def check(self, site) -> None:
        super().check(site)
        if self.feedforward and input_feature_shape(site.op) is None:
            raise errors.UnsupportedLayerError(
                f"IA3(feedforward=True) cannot scale the input of {site.path!r} ({site.layer}): its "
                "inputs are not features (an embedding takes integer ids); use feedforward=False "
                "there, or leave it out of the feed-forward targets")

    def _shape(self, op: LinearOp) -> tuple[int, ...]:
        return input_feature_shape(op) if self.feedforward else tuple(op.out_shape)

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        return {"ia3_l": jnp.ones(self._shape(site.op), base["kernel"].dtype)}, {}

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        l = params["ia3_l"]
        if self.feedforward:
            return call(scale_input(site.op, x, l.astype(x.dtype)))
        out = call(x)
        return site.op.scale_output(out, l.astype(out.dtype))

    # -- merging ----------------------------------------------------------------------------------
    def _kernel_factor(self, op: LinearOp, l: jax.Array) -> jax.Array:
        """``l`` broadcast against the ``(fan_in, fan_out)`` kernel matrix."""
        if self.feedforward:
            return jnp.broadcast_to(l, op.in_shape).reshape(op.fan_in, 1)
        return l.reshape(1, op.fan_out)

    def _bias_factor(self, site: LinearSite, l: jax.Array, bias: jax.Array) -> jax.Array:
        if l.size != bias.size:
            raise errors.NotMergeableError(
                f"IA3 on {site.path!r} cannot merge: the bias has shape {tuple(bias.shape)} but the "
                f"output features have shape {tuple(l.shape)}")
        return l.reshape(bias.shape)

    def merge(self, params, shared, site: LinearSite, base):
        op, kernel = site.op, base["kernel"]
        l = params["ia3_l"].astype(kernel.dtype)
        new = {"kernel": op.matrix_to_kernel(op.kernel_to_matrix(kernel) * self._kernel_factor(op, l))}
        if not self.feedforward and "bias" in base:
            bias = base["bias"]
            new["bias"] = bias * self._bias_factor(site, l.astype(bias.dtype), bias)
        return new, None

    def unmerge(self, params, shared, site: LinearSite, base, record):
        op, kernel = site.op, base["kernel"]
        l = params["ia3_l"].astype(kernel.dtype)
        new = {"kernel": op.matrix_to_kernel(op.kernel_to_matrix(kernel) / self._kernel_factor(op, l))}
        if not self.feedforward and "bias" in base:
            bias = base["bias"]
            new["bias"] = bias / self._bias_factor(site, l.astype(bias.dtype), bias)
        return new
