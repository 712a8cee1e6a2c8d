"""The chunked LM loss equals the full-logits loss (value and gradient) and never builds the full
[batch, seq, vocab] logits; the held-out evaluation matches a direct computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax.models.decoder import Decoder, DecoderConfig
from peft_jax.train.lm_loss import make_lm_eval, make_lm_loss
from peft_jax.train.losses import causal_lm_loss
from peft_jax.train.parts import split_model

VOCAB, B, T = 97, 3, 21
CONFIG = DecoderConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=8)


def _model(tie=True):
    model = Decoder(dataclasses.replace(CONFIG, tie_embeddings=tie), rngs=nnx.Rngs(0))
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q_proj", "v_proj"], rank=2),
                        rngs=nnx.Rngs(1))
    trainable = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(trainable))))
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), trainable))
    return model


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    attention = np.ones((B, T), np.int32)
    attention[1, 15:] = 0  # a padded row
    loss_mask = (rng.random((B, T)) < 0.7).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def _reference(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"] * batch["attention_mask"])


@pytest.mark.parametrize("chunk,tie", [(4, True), (7, False), (64, True)])
def test_chunked_loss_and_gradient_equal_the_full_logits(chunk, tie):
    model, batch = _model(tie), _batch()
    parts = split_model(model)

    def ours(trainable):
        return make_lm_loss(chunk=chunk)(parts.merge(trainable, parts.frozen), batch)[0]

    def ref(trainable):
        return _reference(parts.merge(trainable, parts.frozen), batch)

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(parts.trainable) for f in (ours, ref))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    assert float(jnp.abs(jnp.concatenate([g.ravel() for g in jax.tree.leaves(ga)])).max()) > 0


def _shapes(jaxpr):
    """Every intermediate's shape, inside scan / checkpoint bodies too."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                yield from _shapes(getattr(inner, "jaxpr", inner))


def test_the_gradient_never_builds_the_full_logits():
    model, batch = _model(), _batch()
    parts = split_model(model)

    def loss(trainable):
        return make_lm_loss(chunk=4)(parts.merge(trainable, parts.frozen), batch)[0]

    shapes = set(_shapes(jax.make_jaxpr(jax.grad(loss))(parts.trainable).jaxpr))
    vocab_shapes = {s for s in shapes if s and s[-1] == VOCAB and len(s) >= 3}
    assert vocab_shapes and all(s[-2] == 4 for s in vocab_shapes), vocab_shapes  # chunks only
    full = set(_shapes(jax.make_jaxpr(jax.grad(
        lambda t: _reference(parts.merge(t, parts.frozen), batch)))(parts.trainable).jaxpr))
    assert (B, T, VOCAB) in full  # the check can fail: the plain loss does build them


def test_held_out_perplexity_matches_a_direct_computation():
    model, batch = _model(), _batch(3)
    parts = split_model(model)
    result = make_lm_eval(parts, parts.frozen, batch, batch_size=2, bucket=8, chunk=5)(parts.trainable)
    want = float(_reference(model, batch))
    np.testing.assert_allclose(result["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(want), rtol=1e-5)
    assert result["tokens"] == int((batch["loss_mask"] * batch["attention_mask"])[:, 1:].sum())
