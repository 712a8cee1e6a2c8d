"""One device, pmap over 8 and jit over a 2x4 mesh train the same LoRA decoder to the same params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import peft_jax
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.train import causal_lm_loss, make_train_step
from peft_jax.train.pmap import make_pmap_train_step, replicate, shard_batch, unreplicate
from peft_jax.train.sharding import make_mesh, make_sharded_train_step

STEPS, BATCH, SEQ = 3, 8, 8
CONFIG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=TARGETS, rank=4, alpha=8.0),
                        rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = peft_jax.nnx.split(model)
    # LoRA B starts at zero; a non-zero start makes every factor's gradient non-trivial.
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                             trainable)
    loss = peft_jax.nnx.make_loss(
        graphdef, lambda m, b: causal_lm_loss(m(b["input_ids"]), b["input_ids"]))
    return loss, trainable, frozen


def _batches():
    keys = jax.random.split(jax.random.key(3), STEPS)
    return [{"input_ids": jax.random.randint(k, (BATCH, SEQ), 0, CONFIG.vocab_size)} for k in keys]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


# AdamW divides by sqrt(v): near-zero gradient entries turn summation-order noise into update
# noise of about lr * relative error, so the usual LoRA learning rate keeps the check meaningful.
TX = optax.adamw(1e-3)


@pytest.fixture(scope="module")
def single():
    loss, trainable, frozen = _setup()
    step = make_train_step(loss, TX, clip_norm=1.0)
    opt_state = step.init(trainable)
    losses = []
    for b in _batches():
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, b)
        losses.append(float(metrics["loss"]))
    return trainable, losses


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _moved(trainable):
    _, start, _ = _setup()
    return _max_diff(trainable, start)


def test_pmap_over_8_matches_one_device(single):
    assert jax.local_device_count() == 8
    loss, trainable, frozen = _setup()
    step = make_pmap_train_step(loss, TX, clip_norm=1.0)
    t, s, f = replicate(trainable), replicate(step.init(trainable)), replicate(frozen)
    losses = []
    for b in _batches():
        t, s, metrics = step(t, s, f, shard_batch(b))
        losses.append(float(unreplicate(metrics)["loss"]))
    diff = _max_diff(unreplicate(t), single[0])
    print(f"pmap vs one device: max abs diff {diff:.3g} (params moved {_moved(single[0]):.3g})")
    assert diff <= 1e-5
    np.testing.assert_allclose(losses, single[1], rtol=1e-5)
    assert _moved(single[0]) > 2e-3  # the comparison is not between untouched params


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data2_fsdp4", "data2_fsdp2_tensor2"])
def test_mesh_2x4_matches_one_device(single, shape):
    mesh = make_mesh(shape)
    loss, trainable, frozen = _setup()
    step = make_sharded_train_step(loss, TX, mesh, trainable, frozen, clip_norm=1.0)
    trainable, frozen = step.place(trainable, frozen)
    q = "layers/0/self_attn/q_proj"
    specs = {p: x.sharding.spec for p, x in peft_jax.core.tree_items(frozen)}
    tspecs = {p: x.sharding.spec for p, x in peft_jax.core.tree_items(trainable)}
    assert specs[f"{q}/base_layer/kernel"] == P("fsdp", "tensor")
    assert tspecs[f"{q}/default/lora_a"] == P("fsdp")
    assert tspecs[f"{q}/default/lora_b"] == P(None, "tensor")
    opt_state = step.init(trainable)
    mu = [x for p, x in peft_jax.core.tree_items(opt_state) if p.endswith(f"mu/{q}/default/lora_a")]
    assert mu and mu[0].sharding.spec == P("fsdp")
    losses = []
    for b in _batches():
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, b)
        losses.append(float(metrics["loss"]))
    diff = _max_diff(trainable, single[0])
    print(f"mesh {shape} vs one device: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    np.testing.assert_allclose(losses, single[1], rtol=1e-5)
