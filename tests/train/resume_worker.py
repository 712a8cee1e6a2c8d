"""Subprocess for the kill tests: `python resume_worker.py train DIR STEPS` trains a tiny LoRA
decoder, checkpointing every step and resuming from DIR; `... bigsave DIR` writes large
checkpoints in a loop (so a kill lands inside a write)."""

from __future__ import annotations

import sys

import jax
import numpy as np
import optax
from flax import nnx

import peft_jax
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.train import causal_lm_loss, make_train_step
from peft_jax.train.checkpoint import Checkpointer

CONFIG = DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=8)
LORA = peft_jax.LoraConfig(targets=["q_proj", "v_proj", "up_proj"], rank=2, dropout=0.1)


def batches(position: int):
    """An endless deterministic batch stream; ``position`` is how many were consumed."""
    while True:
        key = jax.random.fold_in(jax.random.key(7), position)
        yield position + 1, {"input_ids": jax.random.randint(key, (4, 8), 0, CONFIG.vocab_size)}
        position += 1


def build():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    peft_jax.nnx.attach(model, LORA, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = peft_jax.nnx.split(model)
    loss = peft_jax.nnx.make_loss(graphdef, lambda m, b: causal_lm_loss(m(b["input_ids"]), b["input_ids"]))
    step = make_train_step(loss, optax.adam(1e-2), dropout_key=jax.random.key(3))
    return step, trainable, frozen


def train(directory: str, total: int, kill_after: int | None = None):
    """Trains to ``total`` steps, resuming from ``directory``; returns the final trainable params."""
    step, trainable, frozen = build()
    opt_state = step.init(trainable)
    ckpt = Checkpointer(directory, fingerprint={"lora": repr(LORA)}, keep=2)
    done, position = 0, 0
    if ckpt.latest_step() is not None:
        done, state, extra = ckpt.restore({"trainable": trainable, "opt_state": opt_state})
        trainable, opt_state, position = state["trainable"], state["opt_state"], extra["position"]
    stream = batches(position)
    while done < total:
        position, batch = next(stream)
        trainable, opt_state, _ = step(trainable, opt_state, frozen, batch)
        done += 1
        ckpt.save(done, {"trainable": trainable, "opt_state": opt_state}, extra={"position": position})
        if kill_after is not None and done == kill_after:
            return None
    return trainable


def bigsave(directory: str):
    ckpt = Checkpointer(directory, fingerprint={"big": True}, keep=2)
    for step in range(1, 10_000):
        ckpt.save(step, {"w": np.full((64, 1024, 256), step, np.float32)})
        print(step, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        final = train(sys.argv[2], int(sys.argv[3]))
        np.save(sys.argv[4], np.concatenate([np.ravel(x) for x in jax.tree.leaves(final)]))
    else:
        bigsave(sys.argv[2])
