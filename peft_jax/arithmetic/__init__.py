"""Adapter arithmetic: weighted combinations of LoRA adapters and conversion of any mergeable
adapter to LoRA.

* `weighted_lora` / `add_weighted_adapter`: HF PEFT's ``add_weighted_adapter`` (``cat``,
  ``linear``, ``svd``, TIES, DARE and magnitude pruning, on the factors or on the full updates).
* `to_lora` / `convert_to_lora`: DoRA, LoHa, LoKr, OFT, IA3, VeRA, ... as a LoRA of a chosen rank
  by truncated SVD of the kernel update, with a per-layer error report.
* `rules`: the merge rules on plain tensors (task arithmetic, magnitude prune, TIES, DARE).

Adapters are exchanged as values, ``(sites, state)``: see `peft_jax.arithmetic.state`.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.arithmetic import rules
    >>> rules.ties([jnp.array([1.0, -2.0]), jnp.array([-3.0, -1.0])], [1.0, 1.0], 1.0).tolist()
    [-3.0, -1.5]
"""

from peft_jax.arithmetic import rules
from peft_jax.arithmetic.on_model import (
    ModelAdapter,
    add_weighted_adapter,
    attach_adapter,
    convert_to_lora,
    read_adapter,
)
from peft_jax.arithmetic.state import adapter_name, as_config
from peft_jax.arithmetic.svd import svd_factors
from peft_jax.arithmetic.to_lora import ConversionReport, LayerFit, to_lora
from peft_jax.arithmetic.weighted import COMBINATION_TYPES, weighted_lora

__all__ = ["COMBINATION_TYPES", "ConversionReport", "LayerFit", "ModelAdapter", "adapter_name",
           "add_weighted_adapter", "as_config", "attach_adapter", "convert_to_lora", "read_adapter", "rules",
           "svd_factors", "to_lora", "weighted_lora"]
