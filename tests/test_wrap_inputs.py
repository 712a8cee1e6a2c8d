"""A model written to HF's inputs_embeds= / attention_mask= convention takes prompts unedited."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import peft_jax


class HfStyleNet(nnx.Module):
    """Attention over the whole (masked) sequence, so prompts change every output."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.q, self.k, self.v = (nnx.Linear(8, 8, rngs=rngs) for _ in range(3))
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        scores = self.q(h) @ self.k(h).swapaxes(1, 2) / jnp.sqrt(8.0)
        scores = jnp.where(attention_mask[:, None, :], scores, -1e9)
        return {"logits": self.head(jax.nn.softmax(scores) @ self.v(h)), "pooled": h.mean(1)}


def test_prompt_tuning_through_inputs_embeds():
    net = HfStyleNet(nnx.Rngs(0))
    ids, mask = jnp.array([[1, 2, 3, 0]]), jnp.array([[1, 1, 1, 0]])
    base = net(ids, attention_mask=mask.astype(bool))
    model = peft_jax.hooks.WithInputTap(net, embed_path="embed", features=8, vocab_size=20)
    peft_jax.nnx.attach(model, peft_jax.compose(peft_jax.prompt_tuning(4, prompt_init="vocab"),
                                                peft_jax.LoraConfig(targets=["q"], rank=2)),
                        rngs=nnx.Rngs(1))
    out = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
    assert out["logits"].shape == (1, 4, 3)  # virtual positions stripped
    assert out["pooled"].shape == (1, 8)  # outputs without a sequence axis pass through
    assert float(jnp.max(jnp.abs(out["logits"] - base["logits"]))) > 1e-3
    with peft_jax.nnx.disabled(model):
        np.testing.assert_allclose(model(ids, mask)["logits"], base["logits"], atol=1e-6)
    assert sorted(p for p, _ in peft_jax.nnx.adapted_layers(model)) == ["input_tap", "model/q"]
