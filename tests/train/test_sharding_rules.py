"""Mesh construction, sharding rules for the reference models, and bad input to the mesh/pmap steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import peft_jax
from peft_jax import errors
from peft_jax.core import tree_items
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification
from peft_jax.train.pmap import make_pmap_train_step, replicate, shard_batch, unreplicate
from peft_jax.train.sharding import ENCODER_RULES, make_mesh, make_sharded_train_step, param_specs


def test_make_mesh_axes_and_fill():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 8
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh({"fsdp": -1, "tensor": 2}).shape) == {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("shape, match", [
    ({"data": 4, "tensor": 4}, r"needs 16 devices but 8 are available"),
    ({"data": 3}, r"needs 3 devices but 8"),
    ({"data": 3, "fsdp": -1}, r"multiple of 3"),
    ({"model": 2}, r"unknown mesh axes \['model'\]"),
    ({"data": 0}, r">= 1"),
])
def test_mesh_that_does_not_fit_is_a_mesh_error(shape, match):
    with pytest.raises(errors.MeshError, match=match):
        make_mesh(shape)


def _lora_decoder():
    config = DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=2, head_dim=8)
    model = Decoder(config, rngs=nnx.Rngs(0))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=targets, rank=2), rngs=nnx.Rngs(1))
    return peft_jax.nnx.split(model)


def test_decoder_rules_fsdp_and_tensor_parallel_with_adapters_following_their_base():
    _, trainable, frozen = _lora_decoder()
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    fs, ts = param_specs(mesh, frozen, trainable)
    fs, ts = dict(tree_items(fs, is_leaf=lambda x: isinstance(x, P))), \
        dict(tree_items(ts, is_leaf=lambda x: isinstance(x, P)))
    for col in ["self_attn/q_proj", "self_attn/k_proj", "mlp/gate_proj", "mlp/up_proj"]:
        assert fs[f"layers/0/{col}/base_layer/kernel"] == P("fsdp", "tensor")
        assert ts[f"layers/0/{col}/default/lora_a"] == P("fsdp")
        assert ts[f"layers/0/{col}/default/lora_b"] == P(None, "tensor")
    for row in ["self_attn/o_proj", "mlp/down_proj"]:
        assert fs[f"layers/0/{row}/base_layer/kernel"] == P("tensor", "fsdp")
        assert ts[f"layers/0/{row}/default/lora_a"] == P("tensor")
        assert ts[f"layers/0/{row}/default/lora_b"] == P(None, "fsdp")
    assert fs["embed_tokens/embedding"] == P("tensor", "fsdp")
    assert fs["lm_head/kernel"] == P("fsdp", "tensor")
    assert fs["norm/scale"] == P()
    # tiny leaves replicate on request
    _, ts_small = param_specs(mesh, frozen, trainable, replicate_below=10_000)
    assert all(s == P() for _, s in tree_items(ts_small, is_leaf=lambda x: isinstance(x, P)))


def test_dimension_an_axis_does_not_divide_stays_whole():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    fs, _ = param_specs(mesh, {"q_proj": {"kernel": jnp.ones((6, 6))}})
    assert fs["q_proj"]["kernel"] == P("fsdp")


def test_encoder_rules():
    cfg = EncoderConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    state = nnx.state(EncoderForSequenceClassification(cfg, num_labels=3, rngs=nnx.Rngs(0)))
    fs, _ = param_specs(make_mesh({"fsdp": 2, "tensor": 4}), state, rules=ENCODER_RULES)
    fs = dict(tree_items(fs, is_leaf=lambda x: isinstance(x, P)))
    layer = "bert/encoder/layer/0"
    assert fs[f"{layer}/attention/self/query/kernel"] == P("fsdp", "tensor")
    assert fs[f"{layer}/attention/self/query/bias"] == P("tensor")
    assert fs[f"{layer}/attention/output/dense/kernel"] == P("tensor", "fsdp")
    assert fs[f"{layer}/intermediate/dense/kernel"] == P("fsdp", "tensor")
    assert fs[f"{layer}/output/dense/kernel"] == P("tensor", "fsdp")
    assert fs["bert/embeddings/word_embeddings/embedding"] == P("tensor", "fsdp")
    assert fs["classifier/kernel"] == P()


def _toy():
    def loss(t, f, b):
        return jnp.mean((b["x"] @ (f["w"] + t["d"])) ** 2)
    return loss, {"d": jnp.zeros((4, 2))}, {"w": jnp.ones((4, 2))}


def test_mesh_batch_that_does_not_divide_is_a_batch_error_before_compiling():
    loss, trainable, frozen = _toy()
    step = make_sharded_train_step(loss, optax.sgd(0.1), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                                   trainable, frozen)
    with pytest.raises(errors.BatchError, match=r"leading dim 6.*data=2 x fsdp=2 = 4 ways.*multiple of 4"):
        step(trainable, step.init(trainable), frozen, {"x": jnp.ones((6, 4))})
    assert not step._jitted  # nothing was traced or compiled
    with pytest.raises(errors.BatchError):
        step.lower(trainable, step.init(trainable), frozen, {"x": jnp.ones((6, 4))})


def test_mesh_rule_naming_a_missing_axis_is_a_mesh_error():
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(errors.MeshError, match="make_mesh"):
        param_specs(mesh, {"q_proj": {"kernel": jnp.ones((8, 8))}})


def test_pmap_batch_that_does_not_divide_is_a_batch_error():
    with pytest.raises(errors.BatchError, match=r"leading dim 12.*8 devices"):
        shard_batch({"x": jnp.ones((12, 4))})


def test_pmap_reduces_only_trainable_gradients_and_replicates_round_trip():
    loss, trainable, frozen = _toy()
    step = make_pmap_train_step(loss, optax.sgd(0.1))
    t, f = replicate(trainable), replicate(frozen)
    assert t["d"].shape == (8, 4, 2)
    hlo = step.lower(t, replicate(step.init(trainable)), f,
                     shard_batch({"x": jnp.ones((8, 4))})).as_text()
    # one all-reduce for the one trainable leaf's gradient, one for the loss; none for frozen "w"
    assert hlo.count('"stablehlo.all_reduce"') == 2
    t, _, m = step(t, replicate(step.init(trainable)), f, shard_batch({"x": jnp.ones((8, 4))}))
    assert jnp.allclose(unreplicate(t)["d"], t["d"][7])  # every device applied the same update


def test_options_compose_with_mesh_and_pmap():
    """accumulate + clip + lr schedule give the single-device numbers on a mesh and under pmap."""

    def loss(t, f, b):
        return jnp.mean((jnp.tanh(b["x"] @ (f["w"] + t["a"] @ t["b"])) - b["y"]) ** 2)

    k = jax.random.split(jax.random.key(0), 5)
    trainable = {"a": jax.random.normal(k[0], (8, 2)), "b": jax.random.normal(k[1], (2, 8))}
    frozen = {"w": jax.random.normal(k[2], (8, 8))}
    batch = {"x": jax.random.normal(k[3], (16, 8)), "y": jax.random.normal(k[4], (16, 8))}
    sched = optax.linear_schedule(0.1, 0.01, 4)
    opts = dict(accumulate=2, clip_norm=0.5, lr_schedule=sched)

    def run(step, t, f, b, put=lambda x: x, get=lambda x: x):
        t = jax.tree.map(jnp.copy, t)  # the steps donate their params
        s = put(step.init(t))
        t = put(t)
        for _ in range(2):
            t, s, m = step(t, s, f, b)
        return get(t), float(get(m)["lr"])

    from peft_jax.train import make_train_step
    single = run(make_train_step(loss, optax.sgd(sched), **opts), trainable, frozen, batch)
    mesh_step = make_sharded_train_step(loss, optax.sgd(sched), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                                        trainable, frozen, **opts)
    t, f = mesh_step.place(trainable, frozen)
    meshed = run(mesh_step, t, f, batch)
    pmapped = run(make_pmap_train_step(loss, optax.sgd(sched), **opts), trainable, replicate(frozen),
                  shard_batch(batch), put=replicate, get=unreplicate)
    for other in (meshed, pmapped):
        assert other[1] == pytest.approx(single[1])
        for x, y in zip(jax.tree.leaves(other[0]), jax.tree.leaves(single[0])):
            assert float(jnp.max(jnp.abs(x - y))) <= 1e-5
