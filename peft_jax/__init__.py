"""peft_jax: parameter-efficient fine-tuning for any Flax model (NNX or Linen).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft_jax
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> model = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(2))
    >>> graphdef, trainable, frozen = peft_jax.nnx.split(model)
    >>> print(peft_jax.nnx.summary(model))
    trainable params: 32 || all params: 122 || trainable%: 26.2295
"""

from peft_jax import arithmetic, errors, hooks, linen, modules, nnx, prompts
from peft_jax.core import (
    ParamSummary,
    Rules,
    combine,
    count_params,
    explain,
    partition,
    select,
    summarize,
    tree_paths,
)
from peft_jax.io import from_dict, load_adapter, save_adapter, to_dict
from peft_jax.methods import (
    IA3,
    OFT,
    AdaLora,
    AdaptionPrompt,
    Beft,
    Bottleneck,
    Dora,
    Gaussian,
    IA3Config,
    KaimingUniform,
    LnTuning,
    LoHa,
    LoKr,
    Lora,
    LoraConfig,
    ModulesToSave,
    OLoRA,
    PiSSA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    TrainableTokens,
    TrainBias,
    Vera,
    adapters,
    at_taps,
    compose,
    llama_adapter,
    loraplus,
    mam,
    p_tuning,
    place,
    prefix_tuning,
    prompt_tuning,
    unipelt,
)
from peft_jax.sites.composition import Average, Parallel, Stack, replicate
from peft_jax.sites.drop import adapter_drop, lowest_layers
from peft_jax.train import make_train_step

__version__ = "0.1.0"

__all__ = [
    "adapter_drop", "arithmetic", "lowest_layers", "from_dict", "load_adapter", "save_adapter", "to_dict",
    "AdaLora", "AdaptionPrompt", "Bottleneck", "PTuning", "PrefixTuning", "PromptTuning", "adapters", "at_taps",
    "Average", "Parallel", "Stack", "replicate", "hooks", "modules", "llama_adapter", "mam", "p_tuning",
    "prefix_tuning", "prompt_tuning", "prompts", "unipelt",
    "Beft", "Dora", "Gaussian", "IA3", "IA3Config", "KaimingUniform", "LnTuning", "LoHa", "LoKr",
    "Lora", "LoraConfig", "ModulesToSave", "OFT", "OLoRA", "ParamSummary", "PiSSA", "Rules",
    "TrainBias", "TrainableTokens", "Vera", "combine", "compose", "count_params", "errors",
    "explain", "linen", "loraplus", "make_train_step", "nnx", "partition", "place", "select",
    "summarize", "tree_paths",
]
