"""One training step of the reference decoder, full fine-tuning or LoRA: shared by the benchmarks
(`bench_flops.py`, `bench_step.py`, `bench_memory.py`) and `tests/test_flops.py`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import peft_jax
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.train import causal_lm_loss, compiled_flops, make_train_step

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class ReferenceStep:
    """A compiled-ready step and its inputs: ``step(trainable, opt_state, frozen, batch)``."""

    step: Any
    trainable: Any
    opt_state: Any
    frozen: Any
    batch: dict

    def run(self) -> jax.Array:
        """One step; keeps the new params / state so repeated calls keep training."""
        self.trainable, self.opt_state, metrics = self.step(self.trainable, self.opt_state,
                                                            self.frozen, self.batch)
        return metrics["loss"]


def _lm_loss(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["input_ids"])


_CONFIG_REMAT = object()


def method_configs(rank: int = 8) -> dict[str, Any]:
    """One config per weight method on the reference decoder (all seven linears; IA3 on HF PEFT's
    Llama defaults k, v, down with down as the feed-forward input).

    VeRA's compute grows with its rank (two thin matmuls with the frozen projections forward and
    two backward); ``vera`` uses rank 2 * ``rank``, ``vera_r256`` HF PEFT's default 256, which on a
    512-wide model costs more than full fine-tuning.
    """
    on = lambda method: peft_jax.place(LLAMA_LINEARS, method)  # noqa: E731
    return {
        "lora": peft_jax.LoraConfig(targets=LLAMA_LINEARS, rank=rank, alpha=2.0 * rank),
        "dora": peft_jax.LoraConfig(targets=LLAMA_LINEARS, rank=rank, alpha=2.0 * rank, use_dora=True),
        "ia3": peft_jax.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "vera": on(peft_jax.Vera(rank=2 * rank)),
        "vera_r256": on(peft_jax.Vera(rank=256)),
        "loha": on(peft_jax.LoHa(rank=rank, alpha=2.0 * rank)),
        "lokr": on(peft_jax.LoKr(rank=rank, alpha=2.0 * rank)),
        "oft": on(peft_jax.OFT(r=0, oft_block_size=32)),
        "beft": peft_jax.place(["v_proj"], peft_jax.Beft()),
        "ln_tuning": peft_jax.place(["input_layernorm", "post_attention_layernorm", "norm"], peft_jax.LnTuning()),
    }


def build(config: DecoderConfig, *, batch: int, seq: int, lora_rank: int | None = None,
          seed: int = 0, remat: str | None = _CONFIG_REMAT, peft_config: Any = None) -> ReferenceStep:
    """AdamW on every param (no ``lora_rank``, no ``peft_config``), on LoRA factors of all seven
    linears (``lora_rank``), or on what ``peft_config`` trains.

    ``remat`` overrides ``config.remat`` (the decoder's per-layer rematerialization policy).
    """
    if remat is not _CONFIG_REMAT:
        config = dataclasses.replace(config, remat=remat)
    model = Decoder(config, rngs=nnx.Rngs(seed))
    if lora_rank is not None:
        peft_config = method_configs(lora_rank)["lora"]
    if peft_config is not None:
        peft_jax.nnx.attach(model, peft_config, rngs=nnx.Rngs(seed + 1))
        graphdef, trainable, frozen = peft_jax.nnx.split(model)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    step = make_train_step(peft_jax.nnx.make_loss(graphdef, _lm_loss), tx)
    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 0, config.vocab_size, jnp.int32)
    return ReferenceStep(step, trainable, tx.init(trainable), frozen, {"input_ids": ids})


def step_flops(config: DecoderConfig, *, batch: int, seq: int, lora_rank: int | None = None,
               peft_config: Any = None) -> dict:
    """XLA's FLOPs for one compiled step, and the trainable parameter count."""
    ref = build(config, batch=batch, seq=seq, lora_rank=lora_rank, peft_config=peft_config)
    flops = compiled_flops(ref.step, ref.trainable, ref.opt_state, ref.frozen, ref.batch)
    return {"flops": flops, "trainable_params": peft_jax.count_params(ref.trainable)}


def compare(config: DecoderConfig, *, batch: int, seq: int, rank: int = 8) -> dict:
    """Full fine-tuning vs LoRA FLOPs of one step."""
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


def compare_methods(config: DecoderConfig, *, batch: int, seq: int, rank: int = 8,
                    names: list[str] | None = None) -> dict:
    """FLOPs of one step per method in `method_configs`, relative to full fine-tuning."""
    full = step_flops(config, batch=batch, seq=seq)
    out = {}
    for name, cfg in method_configs(rank).items():
        if names is not None and name not in names:
            continue
        r = step_flops(config, batch=batch, seq=seq, peft_config=cfg)
        out[name] = {"flops": r["flops"], "over_full_flops": r["flops"] / full["flops"],
                     "trainable_params": r["trainable_params"]}
    return {"full_flops": full["flops"], "full_trainable_params": full["trainable_params"], "methods": out}
