"""Virtual tokens on the reference models: masks, positions, left padding, the KV cache, pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax.models.decoder import Decoder, DecoderConfig
from peft_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification, pool

CONFIGS = {
    "prompt": lambda: peft_jax.prompt_tuning(3, prompt_init="vocab"),
    "p_tuning": lambda: peft_jax.p_tuning(3, encoder_hidden_size=8),
    "prefix": lambda: peft_jax.prefix_tuning(3, projection=True),
    "llama_adapter": lambda: peft_jax.llama_adapter(2, 1),
}


def _randomize(model):
    state = peft_jax.nnx.adapter_state(model)
    keys = jax.random.split(jax.random.key(5), len(state))
    peft_jax.nnx.load_adapter_state(model, {k: 0.5 * jax.random.normal(key, v.shape)
                                            for key, (k, v) in zip(keys, sorted(state.items()))})


def _decoder(kind):
    cfg = DecoderConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4, remat=None)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    base = nnx.clone(model)
    peft_jax.nnx.attach(model, CONFIGS[kind](), rngs=nnx.Rngs(1))
    _randomize(model)
    return model, base


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_left_padding_and_cache_match_the_plain_forward(kind):
    model, base = _decoder(kind)
    ids = jnp.array([[5, 6, 7, 8]])
    full = model(ids)
    assert full.shape == (1, 4, 40)  # virtual positions are not in the outputs
    assert float(jnp.max(jnp.abs(full - base(ids)))) > 1e-3  # the method is live

    # Left padding: the padded row's real tokens give the unpadded row's logits.
    padded = model(jnp.array([[0, 0, 5, 6, 7, 8]]), attention_mask=jnp.array([[0, 0, 1, 1, 1, 1]]))
    np.testing.assert_allclose(padded[:, 2:], full, atol=1e-5)

    # Prefill two tokens, then decode one at a time: the same logits as the full forward.
    cache = model.init_cache(1, 16)
    logits, cache = model(ids[:, :2], cache=cache)
    steps = [logits]
    for t in range(2, 4):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_classifier_pools_real_tokens_only(pooling):
    cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = EncoderForSequenceClassification(cfg, num_labels=2, pooling=pooling, rngs=nnx.Rngs(0))
    peft_jax.nnx.attach(model, peft_jax.prompt_tuning(4), rngs=nnx.Rngs(1))
    ids, mask = jnp.array([[2, 7, 9, 0]]), jnp.array([[1, 1, 1, 0]])
    out = model.backbone(ids, mask)
    assert out.last_hidden_state.shape == (1, 4, 8)  # the 4 virtual tokens are stripped
    feats = out.pooler_output if pooling == "pooler" else pool(out.last_hidden_state, mask, pooling)
    np.testing.assert_allclose(model(ids, mask), model.classifier(feats), atol=1e-6)
    with peft_jax.nnx.disabled(model):
        assert float(jnp.max(jnp.abs(model(ids, mask) - model.classifier(feats)))) > 1e-4
