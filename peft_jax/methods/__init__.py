"""PEFT methods: one file each, pure math, no framework code.

The method table maps a method's name to its math; front-ends look methods up here and nowhere
else, so adding a method is one file plus one line below.
"""

from peft_jax.methods.base import TargetSettings, WeightMethod
from peft_jax.methods.config import LoraConfig
from peft_jax.methods.dora import DORA, Dora, column_norm, exact_column_norm
from peft_jax.methods.initializers import OLoRA, Gaussian, KaimingUniform, PiSSA
from peft_jax.methods.lora import LORA, Lora
from peft_jax.methods.merging import merge_kernel, unmerge_kernel
from peft_jax.methods.loraplus import lora_b_labels, loraplus
from peft_jax.methods.plan import Target, plan_targets

WEIGHT_METHODS: dict[str, WeightMethod] = {
    LORA.name: LORA,
    DORA.name: DORA,
}

__all__ = [
    "DORA", "Dora", "Gaussian", "KaimingUniform", "LORA", "Lora", "LoraConfig", "OLoRA", "PiSSA",
    "Target", "TargetSettings", "WEIGHT_METHODS", "WeightMethod", "column_norm",
    "exact_column_norm", "lora_b_labels", "loraplus", "merge_kernel", "plan_targets",
    "unmerge_kernel",
]
