"""HF PEFT's adapter files (``adapter_config.json`` + ``adapter_model.safetensors``), both ways.

Methods so far: the LoRA family (LoRA, rsLoRA, DoRA, per-module rank / alpha, LoRA on
embeddings, ``lora_bias``, ``modules_to_save``: `lora`), AdaLoRA (`adalora`), IA3, LoHa, LoKr
and OFT (`per_module`) and the prompt family (prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter: `virtual_tokens`);
other methods raise a typed error.
A key map turns our "/" module paths into HF's dotted names and back: any object with
``to_hf(path)`` and ``to_ours(name)``; `DECODER` and `ENCODER` are the reference models'
maps, `KeyMap(prefix=..., bare=...)` builds others.

Example:
    >>> km = KeyMap(prefix="transformer.")
    >>> km.to_hf("h/0/attn/c_attn"), km.to_ours("transformer.h.0.attn.c_attn")
    ('transformer.h.0.attn.c_attn', 'h/0/attn/c_attn')
"""

from peft_jax.io.hf_peft.files import HF_CONFIG, HF_WEIGHTS, export_hf_peft, import_hf_peft, read_hf_peft
from peft_jax.io.hf_peft.keys import DECODER, ENCODER, KeyMap, for_architecture
from peft_jax.io.hf_peft.oneshot import load_hf_peft, save_hf_peft

__all__ = ["DECODER", "ENCODER", "HF_CONFIG", "HF_WEIGHTS", "KeyMap", "export_hf_peft", "for_architecture",
           "import_hf_peft", "load_hf_peft", "read_hf_peft", "save_hf_peft"]
