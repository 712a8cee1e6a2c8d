"""Layer translation both front-ends share: Flax layer settings -> `LinearOp`, layer -> site.

NNX and Linen name their layer classes and attributes differently; each front-end reads the
attributes and calls these, so the checks and messages are written once.

Example:
    >>> conv_op((3, 4, 8), kernel_size=(3,), feature_group_count=1, mask=None).in_shape
    (3, 4)
"""

from __future__ import annotations

from typing import Any, Callable

from peft_jax import errors
from peft_jax.hooks.taps import tap_site
from peft_jax.methods.base import LinearSite, ModuleSite, Site
from peft_jax.ops import ContractionOp, ConvOp, EinsumOp, LinearOp


def hashable(value: Any) -> Any:
    """Lists (as Flax stores some layer settings) as tuples, so ops stay hashable."""
    return tuple(hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def conv_op(kernel_shape: tuple[int, ...], *, kernel_size: Any, feature_group_count: int, mask: Any,
            strides: Any = 1, padding: Any = "SAME", input_dilation: Any = 1,
            kernel_dilation: Any = 1, precision: Any = None) -> ConvOp:
    """The op of a convolution with kernel ``(*window, in, out)``."""
    if mask is not None:
        raise errors.UnsupportedLayerError("masked convolutions (mask=...) cannot be adapted")
    return ConvOp(in_shape=tuple(kernel_shape[:-1]), out_shape=tuple(kernel_shape[-1:]),
                  feature_group_count=int(feature_group_count),
                  kernel_size=hashable(kernel_size), strides=hashable(strides),
                  padding=hashable(padding), input_dilation=hashable(input_dilation),
                  kernel_dilation=hashable(kernel_dilation), precision=precision)


def contraction_op(kernel_shape: tuple[int, ...], axis: Any, batch: Any) -> ContractionOp:
    """The op of a Dense / DenseGeneral / LinearGeneral over input ``axis``."""
    if batch:
        raise errors.UnsupportedLayerError("DenseGeneral / LinearGeneral with batch axes cannot be adapted")
    axis = hashable(axis) if isinstance(axis, (list, tuple)) else (axis,)
    n = len(axis)
    return ContractionOp(in_shape=tuple(kernel_shape[:n]), out_shape=tuple(kernel_shape[n:]), axis=axis)


def einsum_op(einsum_str: str | None, kernel_shape: tuple[int, ...]) -> EinsumOp:
    if einsum_str is None:
        raise errors.UnsupportedLayerError("an Einsum whose einsum_str is given at call time cannot "
                                           "be adapted; set it on the module")
    return EinsumOp.from_string(einsum_str, tuple(kernel_shape))


TAP_KINDS = ("residual", "inputs", "attention")
#: the order in which a path's possible site kinds are tried when planning.
KINDS = ("linear", *TAP_KINDS, "module")


def describe(path: str, kind: str, *, op_of: Callable[[], LinearOp | None], layer: str,
             has_bias: bool, param_shapes: Callable[[], dict], tap: Any = None) -> Site | None:
    """The site of one layer for ``kind`` (``None`` when the layer is not that kind of site).

    ``op_of`` may raise `UnsupportedLayerError` (e.g. a masked conv); the message gains the path.
    ``tap`` is the module itself when it is a `peft_jax.hooks` tap: it is then only a site of
    its own kind.
    """
    tap_kind = getattr(type(tap), "tap_kind", None)
    if tap_kind is not None or kind in TAP_KINDS:
        return tap_site(tap, path) if kind == tap_kind else None
    if kind == "linear":
        try:
            op = op_of()
        except errors.UnsupportedLayerError as e:
            raise errors.UnsupportedLayerError(f"layer {path!r} ({layer}): {e}") from None
        return None if op is None else LinearSite(path=path, op=op, layer=layer, has_bias=has_bias)
    try:
        op = op_of()
    except errors.UnsupportedLayerError:
        op = None
    return ModuleSite(path=path, layer=layer, param_shapes=param_shapes(), op=op)
