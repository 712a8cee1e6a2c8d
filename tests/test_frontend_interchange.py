"""One storage layout for both front-ends: an adapter trained through NNX loads into the Linen
version of the same architecture and gives the same outputs, and Linen adapters are sharded on a
mesh exactly as NNX ones are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import peft_jax
from frontends import ADAPTABLE, HARNESSES, batch, train
from peft_jax.core import tree_items
from peft_jax.train.sharding import make_mesh, make_sharded_train_step, param_specs

CONFIGS = {
    "lora": peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, alpha=4.0, modules_to_save=["head"]),
    "dora": peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, use_dora=True),
    "vera_ia3_ln": peft_jax.compose(peft_jax.place(["dense", "conv", "embed"], peft_jax.Vera(rank=3)),
                                    peft_jax.IA3Config(targets=["general", "einsum"]),
                                    peft_jax.place(["norm"], peft_jax.LnTuning())),
    "loha_lokr_oft_bias": peft_jax.compose(
        peft_jax.place(["dense"], peft_jax.LoHa(rank=2)), peft_jax.place(["conv"], peft_jax.LoKr(rank=2)),
        peft_jax.place(["general"], peft_jax.OFT(r=2, oft_block_size=0)),
        peft_jax.place(["einsum", "head"], peft_jax.TrainBias())),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapter_trained_in_nnx_runs_the_same_in_linen(name):
    nnx_side, linen_side = HARNESSES["nnx"](), HARNESSES["linen"]()
    # The same base weights on both sides (the two models have the same module and param names).
    base = nnx.to_pure_dict(nnx.state(nnx_side.model, nnx.Param))
    assert jax.tree.structure(base) == jax.tree.structure(linen_side.variables["params"])
    linen_side.variables = {"params": base}
    nnx_side.attach(CONFIGS[name])
    train(nnx_side, steps=3)
    nnx_side.eval()
    ids = batch(5)["ids"]
    want = nnx_side.forward(ids, jit=False)

    linen_side.attach(CONFIGS[name])
    state = peft_jax.nnx.adapter_state(nnx_side.model)
    assert set(state) == set(linen_side.peft.adapter_state(linen_side.variables))
    linen_side.variables = linen_side.peft.load_adapter_state(linen_side.variables, state)
    # Biases trained in place live in the base params: carry them over too.
    for path, module in peft_jax.nnx.adapted_layers(nnx_side.model):
        bias = getattr(module.base_layer, "bias", None)
        if isinstance(bias, peft_jax.nnx.TrainedParam):
            linen_side.variables["params"][path]["bias"] = bias[...]
    np.testing.assert_allclose(linen_side.forward(ids, jit=False), want, atol=1e-5)
    assert float(jnp.abs(want - linen_side.base_forward(ids)).max()) > 1e-4  # the adapter matters


class LinenBlock(nn.Module):
    """Decoder-style names, so the decoder's sharding rules apply (as to the NNX reference)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, use_bias=False, name="q_proj")(x)
        return nn.Dense(16, use_bias=False, name="o_proj")(jax.nn.relu(h))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(16, 32, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(32, 16, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.o_proj(jax.nn.relu(self.q_proj(x)))


def _specs(tree):
    return {p: s for p, s in tree_items(tree, is_leaf=lambda x: isinstance(x, P))}


@pytest.mark.parametrize("method", [peft_jax.Lora(rank=4), peft_jax.Vera(rank=4), peft_jax.IA3(),
                                    peft_jax.Dora(lora=peft_jax.Lora(rank=4))],
                         ids=["lora", "vera", "ia3", "dora"])
def test_linen_adapters_are_sharded_like_nnx_ones(method):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = peft_jax.place(["q_proj", "o_proj"], method)
    x = jnp.ones((8, 16))

    model = NnxBlock(nnx.Rngs(0))
    peft_jax.nnx.attach(model, config, rngs=nnx.Rngs(1))
    _, n_trainable, n_frozen = peft_jax.nnx.split(model)
    n_specs = _specs(param_specs(mesh, n_frozen, n_trainable)[1])

    module = LinenBlock()
    peft = peft_jax.linen.attach(module, config).plan(module.init(jax.random.key(0), x), x)
    variables = peft.init(jax.random.key(1), module.init(jax.random.key(0), x))
    trainable, frozen = peft.partition(variables)
    l_specs = _specs(param_specs(mesh, frozen, trainable)[1])
    # Same layout, same specs: Linen's paths are NNX's under the "adapters" collection.
    assert {p.removeprefix("adapters/"): s for p, s in l_specs.items() if s is not None} == \
        {p: s for p, s in n_specs.items() if s is not None}
    if isinstance(method, peft_jax.Lora):
        assert l_specs["adapters/q_proj/default/lora_a"] == P("fsdp")
        assert l_specs["adapters/q_proj/default/lora_b"] == P(None, "tensor")
        assert l_specs["adapters/o_proj/default/lora_a"] == P("tensor")
    assert any(s != P() for s in l_specs.values() if s is not None), "nothing was sharded"

    def loss(t, f, b):
        return jnp.mean(peft.apply(peft_jax.combine(t, f), b["x"]) ** 2)

    step = make_sharded_train_step(loss, optax.adam(1e-2), mesh, trainable, frozen)
    trainable, frozen = step.place(trainable, frozen)
    for path, leaf in tree_items(trainable):
        assert leaf.sharding.spec == l_specs[path], path
    trainable, _, metrics = step(trainable, step.init(trainable), frozen, {"x": x})
    assert np.isfinite(float(metrics["loss"]))
