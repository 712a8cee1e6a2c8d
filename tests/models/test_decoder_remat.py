"""Per-layer rematerialization of the reference decoder: same numbers, less activation memory.

Also checks the LoRA fast path the decoder's training step uses (2-D token rows, ``thin_matmul``)
against plain JAX autodiff of ``x @ W + s * (x @ A) @ B``.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import REMAT_POLICIES, DecoderConfig
from peft_jax.ops.base import thin_matmul
from peft_jax.train import causal_lm_loss, make_train_step

POLICIES = [p for p in REMAT_POLICIES if p is not None]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "llama_gqa": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8),
    "gemma_like": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                       num_kv_heads=1, head_dim=8, qk_norm=True, norm_offset=1.0, embed_scale=True,
                       sandwich_norms=True, mlp_activation="gelu_tanh", sliding_window=3,
                       layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                       rope_local_theta=10.0, final_logit_softcap=30.0, attn_logit_softcap=20.0),
}


def _model(name, *, lora, dropout=0.0, remat=None):
    model = Decoder(DecoderConfig(**CONFIGS[name]), rngs=nnx.Rngs(0), remat=remat)
    if lora:
        peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=LINEARS, rank=4, alpha=8.0, dropout=dropout),
                            rngs=nnx.Rngs(1))
        # B starts at zero: give it values so that every LoRA path carries gradient.
        for path, var in nnx.iter_graph(model):
            if isinstance(var, peft_jax.nnx.AdapterParam) and path[-1] == "lora_b":
                var[...] = jax.random.normal(jax.random.key(len(path)), var[...].shape) * 0.05
    return model


def _loss_and_grads(model, ids, rng=None):
    if any(isinstance(v, peft_jax.nnx.AdapterParam) for _, v in nnx.iter_graph(model)):
        graphdef, trainable, frozen = peft_jax.nnx.split(model)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    loss = peft_jax.nnx.make_loss(graphdef, lambda m, b: causal_lm_loss(m(b["input_ids"]), b["input_ids"]))
    batch = {"input_ids": ids} if rng is None else {"input_ids": ids, "dropout_rng": rng}
    return jax.jit(jax.value_and_grad(loss))(trainable, frozen, batch)


def _ids(name, b=2, t=12):
    return jax.random.randint(jax.random.key(7), (b, t), 1, CONFIGS[name]["vocab_size"], jnp.int32)


def _assert_close(got, want):
    # Recomputation may reassociate float sums: compare to the scale of each gradient.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-5 * float(np.abs(w).max()) + 1e-9)


def _with_remat(model, policy):
    model.config = dataclasses.replace(model.config, remat=policy)
    return model


@functools.cache
def _reference(name, lora):
    """Loss and gradients without remat, computed once per model (suite time)."""
    return _loss_and_grads(_model(name, lora=lora), _ids(name))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("policy", POLICIES)
def test_remat_gives_the_same_loss_and_gradients(name, lora, policy):
    ids = _ids(name)
    model = _model(name, lora=lora)
    loss0, grads0 = _reference(name, lora)
    loss1, grads1 = _loss_and_grads(_with_remat(model, policy), ids)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert len(jax.tree.leaves(grads0)) == len(jax.tree.leaves(grads1)) > 0
    _assert_close(grads1, grads0)


@pytest.mark.parametrize("policy", ["full", "projections"])
def test_remat_with_adapter_dropout_uses_the_same_masks(policy):
    ids, rng = _ids("llama_gqa"), jax.random.key(3)
    model = _model("llama_gqa", lora=True, dropout=0.3)
    model.train()
    loss0, grads0 = _loss_and_grads(model, ids, rng)
    loss1, grads1 = _loss_and_grads(_with_remat(model, policy), ids, rng)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    _assert_close(grads1, grads0)


def test_remat_trains_to_the_same_params_through_the_step_factory():
    ids = _ids("llama_gqa")
    results = []
    for policy in (None, "projections"):
        model = _model("llama_gqa", lora=True, remat=policy)
        graphdef, trainable, frozen = peft_jax.nnx.split(model)
        tx = optax.adamw(1e-2)
        step = make_train_step(peft_jax.nnx.make_loss(
            graphdef, lambda m, b: causal_lm_loss(m(b["input_ids"]), b["input_ids"])), tx)
        state = tx.init(trainable)
        for _ in range(3):
            trainable, state, _ = step(trainable, state, frozen, {"input_ids": ids})
        results.append(trainable)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _temp_bytes(policy, lora):
    cfg = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                        num_kv_heads=4, head_dim=16, remat=policy)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    if lora:
        peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=LINEARS, rank=4), rngs=nnx.Rngs(1))
        graphdef, trainable, frozen = peft_jax.nnx.split(model)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    step = make_train_step(peft_jax.nnx.make_loss(
        graphdef, lambda m, b: causal_lm_loss(m(b["input_ids"]), b["input_ids"])), tx)
    batch = {"input_ids": jnp.zeros((4, 128), jnp.int32)}
    compiled = step.lower(trainable, tx.init(trainable), frozen, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_remat_cuts_the_compiled_step_activation_memory(lora):
    # XLA's buffer assignment is deterministic: these are exact properties of the compiled step.
    none, projections, full = (_temp_bytes(p, lora) for p in (None, "projections", "full"))
    assert projections < 0.75 * none
    assert full < 0.5 * none
    assert full < projections


def test_remat_leaves_forward_and_cached_generation_alone():
    ids = _ids("gemma_like", t=6)
    model = _model("gemma_like", lora=True)
    plain = model(ids)
    _with_remat(model, "full")
    np.testing.assert_allclose(model(ids), plain, rtol=1e-6, atol=1e-6)
    cache = model.init_cache(2, 8)
    logits, cache = model(ids, cache=cache)
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
    step_logits, cache = model(ids[:, :1], cache=cache)
    assert step_logits.shape == (2, 1, 64) and int(cache.length) == 7


def test_unknown_remat_policy_is_a_typed_error():
    with pytest.raises(errors.InvalidConfigError, match="remat must be one of"):
        DecoderConfig(**CONFIGS["llama_gqa"], remat="everything")
    with pytest.raises(errors.InvalidConfigError, match="remat must be one of"):
        Decoder(DecoderConfig(**CONFIGS["llama_gqa"]), rngs=nnx.Rngs(0), remat="nothing")


def test_lora_fast_path_gradients_match_plain_autodiff():
    """The decoder's LoRA step (token rows, thin_matmul) against ``x W + s (x A) B`` by jax.grad."""
    model = _model("llama_gqa", lora=True)
    layer = model.layers[0].mlp.up_proj
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    w = layer.base_layer.kernel[...]
    adapter = layer.default
    a, b, s = adapter.lora_a[...], adapter.lora_b[...], adapter.methods[0].scale

    def reference(a, b, x):
        return jnp.sum(jnp.sin(x @ w + s * ((x @ a) @ b)))

    graphdef, trainable, frozen = nnx.split(layer, nnx.LoRAParam, ...)

    def adapted(trainable, x):
        out = nnx.merge(graphdef, trainable, frozen)(x.reshape(-1, 32))
        return jnp.sum(jnp.sin(out.reshape(2, 5, -1)))

    want = jax.grad(reference, argnums=(0, 1, 2))(a, b, x)
    got_params, got_x = jax.grad(adapted, argnums=(0, 1))(trainable, x)
    got_params = got_params["default"]
    for g, r in zip((got_params["lora_a"][...], got_params["lora_b"][...], got_x), want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    ga = jax.grad(lambda a: jnp.sum(jnp.sin(thin_matmul(x[0], a))))(a)
    np.testing.assert_allclose(ga, jax.grad(lambda a: jnp.sum(jnp.sin(x[0] @ a)))(a), rtol=1e-6, atol=1e-7)
