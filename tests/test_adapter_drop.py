"""AdapterDrop: adapters left out of (training) or switched off in (inference) the lowest layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax import linen as peft_linen
from peft_jax import nnx as peft_nnx
from peft_jax.hooks import Roles
from peft_jax.models.encoder import ROLES, Encoder, EncoderConfig
from peft_jax.sites.drop import adapter_drop, layer_index, lowest_layers

LAYERS = 4
IDS = jnp.array([[2, 7, 9, 4, 1], [3, 3, 8, 0, 0]])
MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def encoder(seed=0):
    cfg = EncoderConfig(vocab_size=12, hidden_size=8, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Encoder(cfg, rngs=nnx.Rngs(seed))


def randomize_adapters(model, seed=1):
    state = peft_nnx.adapter_state(model)
    keys = jax.random.split(jax.random.key(seed), len(state))
    peft_nnx.load_adapter_state(model, {k: 0.3 * jax.random.normal(key, v.shape, v.dtype)
                                        for key, (k, v) in zip(keys, sorted(state.items()))})


def hidden(model):
    return model(IDS, MASK).last_hidden_state


def test_training_config_leaves_the_lowest_layers_without_params():
    model = encoder()
    peft_nnx.attach(model, adapter_drop(peft_jax.adapters("double_seq_bn", roles=ROLES), 2, roles=ROLES),
                    rngs=nnx.Rngs(1))
    indices = sorted({layer_index(path, ROLES) for path, _ in peft_nnx.adapted_layers(model)})
    assert indices == [2, 3]
    assert len(list(peft_nnx.adapted_layers(model))) == 4  # attention + FFN in each kept layer
    assert all(layer_index(k, ROLES) >= 2 for k in peft_nnx.adapter_state(model))


def test_dropping_at_inference_equals_training_without_them():
    full = encoder()
    peft_nnx.attach(full, peft_jax.adapters("seq_bn", roles=ROLES), rngs=nnx.Rngs(1))
    randomize_adapters(full)
    with_all = hidden(full)
    peft_nnx.drop_adapters(full, 2, ROLES)
    dropped = hidden(full)

    upper = encoder()
    peft_nnx.attach(upper, adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), 2, roles=ROLES),
                    rngs=nnx.Rngs(1))
    peft_nnx.load_adapter_state(upper, {k: v for k, v in peft_nnx.adapter_state(full).items()
                                        if layer_index(k, ROLES) >= 2})
    np.testing.assert_allclose(dropped, hidden(upper), atol=1e-6)
    assert float(jnp.max(jnp.abs(dropped - with_all))) > 1e-3

    peft_nnx.drop_adapters(full, LAYERS, ROLES)
    with peft_nnx.disabled(full):
        base = hidden(full)
    np.testing.assert_allclose(hidden(full), base, atol=1e-6)
    peft_nnx.drop_adapters(full, 0, ROLES)
    np.testing.assert_allclose(hidden(full), with_all, atol=1e-6)


def test_dropped_layers_get_no_gradient_work():
    """With adapters only above layer 2 the compiled step does no backward pass below it: its
    FLOPs are lower than with adapters in every layer."""
    def step_flops(config):
        model = encoder()
        peft_nnx.attach(model, config, rngs=nnx.Rngs(1))
        graphdef, trainable, frozen = peft_nnx.split(model)

        def loss(t, f):
            return jnp.sum(nnx.merge(graphdef, t, f)(IDS, MASK).last_hidden_state ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile()
        return compiled.cost_analysis()["flops"]

    adapters = peft_jax.adapters("seq_bn", roles=ROLES)
    assert step_flops(adapter_drop(adapters, 2, roles=ROLES)) < 0.9 * step_flops(adapters)


class Blocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = x + nn.Dense(x.shape[-1], name=f"block_{i}")(jnp.tanh(x))
        return x


def test_linen_skip_matches_the_dropped_config():
    roles = Roles(layers=r"block_\d+")
    x = jax.random.normal(jax.random.key(0), (2, 6))
    variables = Blocks().init(jax.random.key(1), x)
    lora = peft_jax.LoraConfig(targets=r"block_\d+", rank=2)
    peft = peft_linen.attach(Blocks(), lora).plan(variables, x)
    adapted = peft.init(jax.random.key(2), variables, x)
    state = peft.adapter_state(adapted)
    keys = jax.random.split(jax.random.key(3), len(state))
    adapted = peft.load_adapter_state(adapted, {k: 0.5 * jax.random.normal(key, v.shape) for key, (k, v)
                                                in zip(keys, sorted(state.items()))})
    skipped = peft.apply(adapted, x, skip=lowest_layers(1, roles))

    upper = peft_linen.attach(Blocks(), adapter_drop(lora, 1, roles=roles)).plan(variables, x)
    upper_vars = upper.init(jax.random.key(2), variables, x)
    upper_vars = upper.load_adapter_state(upper_vars, {k: v for k, v in peft.adapter_state(adapted).items()
                                                       if not k.startswith("block_0/")})
    assert sorted(upper.adapter_state(upper_vars)) == sorted(k for k in state if not k.startswith("block_0/"))
    np.testing.assert_allclose(skipped, upper.apply(upper_vars, x), atol=1e-6)
    assert float(jnp.max(jnp.abs(skipped - peft.apply(adapted, x)))) > 1e-3


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_bad_layer_count(n):
    with pytest.raises(errors.InvalidConfigError, match="dropped layers"):
        adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), n, roles=ROLES)


def test_roles_without_layers():
    with pytest.raises(errors.InvalidConfigError, match="layers"):
        adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), 2, roles=Roles(ffn="mlp"))


def test_dropping_every_layer_at_training_is_an_error():
    model = encoder()
    with pytest.raises(errors.PeftError):
        peft_nnx.attach(model, adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), LAYERS, roles=ROLES),
                        rngs=nnx.Rngs(1))
