"""BEFT: bias-efficient fine-tuning, a new trainable output bias on chosen layers (Huang et al., 2025,
"BEFT: Bias-Efficient Fine-Tuning of Language Models in Low-Data Regimes", arXiv:2509.15974).

The paper finds that fine-tuning only the bias of the value projections works well with little
data; HF PEFT's ``BEFT`` adds a fresh bias ``b`` (``beft_bias``, shaped like the output features,
zero at init) to each targeted layer, whether or not the layer has a bias of its own::

    y = call(x) + b

Cost: ``fan_out`` parameters per layer and one add per call. Merging adds ``b`` into the layer's own
bias, so (as in HF PEFT, which raises on ``merge``) it needs a layer that has one: merging into a
bias-free layer raises `NotMergeableError`. (HF PEFT also warns when BEFT is attached to a bias-free
layer; here the error comes only on merge.) On an Einsum layer ``b`` is laid out like the kernel's
output axes and broadcast onto the output by their einsum letters. A tied output head
(`Method.attend`) is not supported.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import Context, LinearSite
    >>> site = LinearSite(path="v", op=dense_op(4, 3), layer="Linear", has_bias=True)
    >>> base = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
    >>> params, _ = Beft().init(jax.random.key(0), site, base, {})
    >>> params = {"beft_bias": params["beft_bias"] + 1.0}
    >>> y = Beft().apply(params, {}, site, lambda x: x @ base["kernel"] + base["bias"],
    ...                  jnp.ones((1, 4)), base, Context())
    >>> y.tolist()
    [[5.0, 5.0, 5.0]]
    >>> Beft().merge(params, {}, site, base)[0]["bias"].tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import LinearSite, Mergeable, Method, Params
from peft_jax.ops import EinsumOp, LinearOp
from peft_jax.ops.einsum import _ELLIPSIS


def add_output(op: LinearOp, y: jax.Array, b: jax.Array) -> jax.Array:
    """``y + b`` with ``b: op.out_shape`` broadcast onto the output features of ``y``."""
    if not isinstance(op, EinsumOp):
        return y + b  # output features are the trailing axes
    letters = [c for c in op.out if c in op.out_letters]
    b = jnp.transpose(b, [op.out_letters.index(c) for c in letters])
    shape: list[int] = []
    for c in op.out:
        if c == _ELLIPSIS:
            shape += [1] * (y.ndim - (len(op.out) - 1))
        else:
            shape.append(b.shape[letters.index(c)] if c in op.out_letters else 1)
    return y + b.reshape(shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Beft(Method, Mergeable):
    """BEFT on a linear site: a zero-initialised trainable output bias ``beft_bias``."""

    name: ClassVar[str] = "beft"
    grouped_conv: ClassVar[bool] = True

    def init(self, key, site: LinearSite, base: Params, shared: Params):
        return {"beft_bias": jnp.zeros(site.op.out_shape, base["kernel"].dtype)}, {}

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        out = call(x)
        return add_output(site.op, out, params["beft_bias"].astype(out.dtype))

    def attend(self, params, shared, site: LinearSite, query, out, base):
        return out  # a tied head reads the table, which BEFT leaves as it is

    def _bias_delta(self, params, site: LinearSite, base) -> jax.Array:
        if "bias" not in base:
            raise errors.NotMergeableError(
                f"BEFT on {site.path!r} ({site.layer}) cannot merge: the layer has no bias to add "
                "beft_bias into; keep BEFT unmerged there, or target layers built with a bias")
        b, bias = params["beft_bias"], base["bias"]
        if b.size != bias.size:
            raise errors.NotMergeableError(
                f"BEFT on {site.path!r} cannot merge: the layer's bias has shape {tuple(bias.shape)} "
                f"but beft_bias has shape {tuple(b.shape)}")
        return b.reshape(bias.shape).astype(bias.dtype)

    def merge(self, params, shared, site: LinearSite, base):
        delta = self._bias_delta(params, site, base)
        return {"bias": base["bias"] + delta}, None

    def unmerge(self, params, shared, site: LinearSite, base, record):
        delta = self._bias_delta(params, site, base)
        return {"bias": base["bias"] - delta}
