"""Shared by the FLOPs benchmark and its test: one compiled LM step, full fine-tuning vs LoRA."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import peft_jax
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.train import causal_lm_loss, compiled_flops, make_train_step

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lm_loss(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["input_ids"])


def step_flops(config: DecoderConfig, *, batch: int, seq: int, lora_rank: int | None) -> dict:
    """Compiles one AdamW step (full when ``lora_rank`` is None) and returns its XLA FLOPs."""
    model = Decoder(config, rngs=nnx.Rngs(0))
    if lora_rank is not None:
        cfg = peft_jax.LoraConfig(targets=LLAMA_LINEARS, rank=lora_rank, alpha=2.0 * lora_rank)
        peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(1))
        graphdef, trainable, frozen = peft_jax.nnx.split(model)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    step = make_train_step(peft_jax.nnx.make_loss(graphdef, _lm_loss), tx)
    ids = jnp.zeros((batch, seq), jnp.int32)
    flops = compiled_flops(step, trainable, tx.init(trainable), frozen, {"input_ids": ids})
    return {"flops": flops, "trainable_params": peft_jax.count_params(trainable)}


def compare(config: DecoderConfig, *, batch: int, seq: int, rank: int = 8) -> dict:
    full = step_flops(config, batch=batch, seq=seq, lora_rank=None)
    lora = step_flops(config, batch=batch, seq=seq, lora_rank=rank)
    return {
        "config": dataclasses.asdict(config) | {"batch": batch, "seq": seq, "rank": rank},
        "full_flops": full["flops"],
        "lora_flops": lora["flops"],
        "lora_over_full_flops": lora["flops"] / full["flops"],
        "full_trainable_params": full["trainable_params"],
        "lora_trainable_params": lora["trainable_params"],
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }
