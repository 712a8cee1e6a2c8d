"""PEFT methods: one file each, pure math, no framework code.

A method is its config (a frozen keyword-only dataclass, see `Method`); `METHODS` maps the
name each one is saved under to its class, and only ``io/`` reads it.
"""

from peft_jax.methods.adalora import AdaLora
from peft_jax.methods.adaption_prompt import AdaptionPrompt
from peft_jax.methods.base import (
    Context,
    LinearSite,
    Mergeable,
    Method,
    ModuleSite,
    Site,
    is_mergeable,
)
from peft_jax.methods.beft import Beft
from peft_jax.methods.bottleneck import Bottleneck, double_seq_bn, par_bn, scaled_par_bn, seq_bn
from peft_jax.methods.config import (
    Composed,
    IA3Config,
    LoraConfig,
    Placement,
    at_taps,
    compose,
    place,
)
from peft_jax.methods.dora import Dora, column_norm, exact_column_norm
from peft_jax.methods.gated_lora import GatedLora
from peft_jax.methods.ia3 import IA3
from peft_jax.methods.initializers import Gaussian, KaimingUniform, OLoRA, PiSSA
from peft_jax.methods.loha import LoHa
from peft_jax.methods.lokr import LoKr
from peft_jax.methods.lora import Lora
from peft_jax.methods.loraplus import lora_b_labels, loraplus
from peft_jax.methods.oft import OFT
from peft_jax.methods.p_tuning import PTuning
from peft_jax.methods.phm import Phm, compacter, compacter_pp
from peft_jax.methods.prefix import PrefixPositions, PrefixTuning, fold
from peft_jax.methods.prompt import PromptTuning
from peft_jax.methods.raw_params import RawParamLora, target_parameters
from peft_jax.methods.recipes import (
    adapters,
    llama_adapter,
    mam,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    unipelt,
)
from peft_jax.methods.selection import LnTuning, ModulesToSave, TrainBias, TrainCopy
from peft_jax.methods.trainable_tokens import TrainableTokens
from peft_jax.methods.vera import Vera

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Lora, Dora, IA3, Vera, LoHa, LoKr, OFT, Beft, TrainBias, LnTuning,
                              ModulesToSave, TrainableTokens, RawParamLora, Bottleneck, PromptTuning,
                              PTuning, PrefixTuning, PrefixPositions, AdaptionPrompt, GatedLora, AdaLora)
}

__all__ = [
    "AdaLora", "AdaptionPrompt", "Bottleneck", "GatedLora", "PTuning", "Phm", "PrefixPositions",
    "PrefixTuning",
    "PromptTuning", "unipelt",
    "adapters", "at_taps", "compacter", "compacter_pp", "double_seq_bn", "fold", "llama_adapter", "mam",
    "p_tuning", "par_bn", "prefix_tuning", "prompt_tuning", "scaled_par_bn", "seq_bn",
    "Beft", "Composed", "Context", "Dora", "Gaussian", "IA3", "IA3Config", "KaimingUniform",
    "LinearSite", "LnTuning", "LoHa", "LoKr", "Lora", "LoraConfig", "METHODS", "Mergeable",
    "Method", "ModuleSite", "ModulesToSave", "OFT", "OLoRA", "PiSSA", "Placement", "RawParamLora", "Site",
    "TrainBias", "TrainCopy", "TrainableTokens", "Vera", "column_norm", "compose",
    "exact_column_norm", "is_mergeable", "lora_b_labels", "loraplus", "place", "target_parameters",
]
