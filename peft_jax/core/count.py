"""Count parameters, and print the line HF PEFT users know.

Example:
    >>> import numpy as np
    >>> print(summarize({"lora_a": np.zeros((4, 2))}, {"kernel": np.zeros((4, 4))}))
    trainable params: 8 || all params: 24 || trainable%: 33.3333
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

__all__ = ["count_params", "ParamSummary", "summarize"]


def _size(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    if shape is None:  # a boxed array (e.g. an NNX Variable kept whole as a leaf)
        shape = getattr(getattr(leaf, "value", None), "shape", None)
    return math.prod(shape) if shape is not None else 0


def count_params(tree: Any) -> int:
    """Sums the sizes of the array leaves of a pytree.

    Leaves may be JAX or NumPy arrays, ``jax.ShapeDtypeStruct`` (so abstract trees from
    ``jax.eval_shape`` count without allocating), or objects holding an array in ``.value``
    (NNX ``Variable``). ``None`` placeholders and leaves without a shape count zero.

    Args:
        tree: any pytree.

    Returns:
        The number of scalars.

    Example:
        >>> import jax, numpy as np
        >>> count_params({"w": np.zeros((3, 4)), "b": jax.ShapeDtypeStruct((4,), np.float32)})
        16
    """
    return sum(_size(leaf) for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape")))


@dataclasses.dataclass(frozen=True)
class ParamSummary:
    """Trainable and total parameter counts; ``str()`` gives the HF PEFT summary line.

    Attributes:
        trainable: number of trainable scalars.
        total: number of all scalars (trainable + frozen).
        percent: ``100 * trainable / total`` (0 for an empty model).
        by_method: trainable scalars per ``(adapter name, method name)``, where known.
    """

    trainable: int
    total: int
    by_method: dict = dataclasses.field(default_factory=dict, compare=False)
    percent: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        percent = 100 * self.trainable / self.total if self.total else 0.0
        object.__setattr__(self, "percent", percent)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def summarize(trainable: Any, frozen: Any) -> ParamSummary:
    """Counts the two halves of :func:`peft_jax.core.partition`.

    Args:
        trainable: the trainable pytree (``None`` where a leaf is frozen).
        frozen: the frozen pytree (``None`` where a leaf trains).

    Returns:
        A :class:`ParamSummary`.

    Example:
        >>> import numpy as np
        >>> summarize({"a": np.zeros(630_784)}, {"w": np.zeros(25_000_000 - 630_784)}).percent
        2.523136
    """
    n_trainable = count_params(trainable)
    return ParamSummary(trainable=n_trainable, total=n_trainable + count_params(frozen))
