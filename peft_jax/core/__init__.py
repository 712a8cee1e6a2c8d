"""Pure pytree machinery: paths, selectors, partition/combine, parameter counts (JAX only).

Example:
    >>> import numpy as np
    >>> from peft_jax import core
    >>> params = {"attn": {"q_proj": {"kernel": np.zeros((4, 4))}}, "norm": {"scale": np.ones(4)}}
    >>> trainable, frozen = core.partition(params, ["q_proj/kernel"])
    >>> print(core.summarize(trainable, frozen))
    trainable params: 16 || all params: 20 || trainable%: 80.0000
"""

from peft_jax.core.count import ParamSummary, count_params, summarize
from peft_jax.core.partition import combine, is_trainable_mask, partition
from peft_jax.core.paths import map_with_path, path_to_str, tree_items, tree_paths
from peft_jax.core.select import (
    Explanation,
    Rules,
    Selector,
    compile_selector,
    explain,
    is_selector,
    nearest_paths,
    select,
)

__all__ = [
    "Explanation",
    "ParamSummary",
    "Rules",
    "Selector",
    "combine",
    "compile_selector",
    "count_params",
    "explain",
    "is_selector",
    "is_trainable_mask",
    "map_with_path",
    "nearest_paths",
    "partition",
    "path_to_str",
    "select",
    "summarize",
    "tree_items",
    "tree_paths",
]
