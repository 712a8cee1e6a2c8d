"""PEFT methods: one file each, pure math, no framework code.

A method is its config (a frozen keyword-only dataclass, see `Method`); `METHODS` maps the
name each one is saved under to its class, and only ``io/`` reads it.
"""

from peft_jax.methods.base import (
    Context,
    LinearSite,
    Mergeable,
    Method,
    ModuleSite,
    Site,
    is_mergeable,
)
from peft_jax.methods.config import Composed, LoraConfig, Placement, compose, place
from peft_jax.methods.dora import Dora, column_norm, exact_column_norm
from peft_jax.methods.initializers import Gaussian, KaimingUniform, OLoRA, PiSSA
from peft_jax.methods.lora import Lora
from peft_jax.methods.loraplus import lora_b_labels, loraplus
from peft_jax.methods.selection import LnTuning, ModulesToSave, TrainBias, TrainCopy

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Lora, Dora, TrainBias, LnTuning, ModulesToSave)
}

__all__ = [
    "Composed", "Context", "Dora", "Gaussian", "KaimingUniform", "LinearSite", "LnTuning",
    "Lora", "LoraConfig", "METHODS", "Mergeable", "Method", "ModuleSite", "ModulesToSave",
    "OLoRA", "PiSSA", "Placement", "Site", "TrainBias", "TrainCopy", "column_norm", "compose",
    "exact_column_norm", "is_mergeable", "lora_b_labels", "loraplus", "place",
]
