"""The HF PEFT peer for `bench_step.py`: the same reference config as a transformers Llama, LoRA r8
on the same seven linears (alpha 16), AdamW, fp32, eager torch on the CPU.

Needs the `interop` extra (torch==2.13.0 CPU build, transformers, peft); imported only with
``--peer hf-peft``.
"""

from __future__ import annotations

import os

from peft_jax.models.decoder_config import DecoderConfig

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HfPeftStep:
    """``run()`` does one optimizer step of HF PEFT LoRA on a fixed random batch."""

    def __init__(self, config: DecoderConfig, *, batch: int, seq: int, rank: int, seed: int = 0):
        import peft
        import torch
        import transformers

        torch.manual_seed(seed)
        torch.set_num_threads(os.cpu_count() or 1)
        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=config.tie_embeddings, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(hf_config)
        lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_LINEARS,
                               lora_dropout=0.0, task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(model, lora)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.ids = torch.randint(0, config.vocab_size, (batch, seq))
        self._torch = torch

    def run(self) -> float:
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())
