"""AutoPrompt (`peft_jax.prompts.autoprompt`): the search, its determinism, its outputs, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax
from frontends import VOCAB, NnxTapNet, compile_log
from peft_jax import errors
from peft_jax.hooks import WithInputTap
from peft_jax.models.decoder import Decoder, DecoderConfig
from peft_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification
from peft_jax.prompts import AutoPromptConfig, search

TARGET = (11, 3)  # the trigger the toy objective rewards


class Echo(nnx.Module):
    """Returns the first two input embeddings (the trigger's, once one is attached)."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)

    def __call__(self, *, inputs_embeds, attention_mask):
        return inputs_embeds[:, :2].reshape(inputs_embeds.shape[0], -1)  # rank 2: not stripped


def _echo() -> WithInputTap:
    model = WithInputTap(Echo(nnx.Rngs(0)), embed_path="embed", features=8, vocab_size=VOCAB)
    table = model.model.embed.embedding[...]
    model.model.embed.embedding[...] = table / jnp.linalg.norm(table, axis=-1, keepdims=True)
    return model


def _echo_loss(model, batch):
    """``-(e_0 . E[11] + e_1 . E[3])``: lowest (-2) exactly at the trigger ``TARGET`` (unit rows)."""
    table = model.model.embed.embedding[...]
    want = jnp.concatenate([table[TARGET[0]], table[TARGET[1]]])
    return -jnp.mean(model(batch["input_ids"]) @ want)


IDS = {"input_ids": np.array([[1, 2, 4], [5, 6, 7], [8, 9, 10], [12, 13, 14]])}


def _tap_net_loss(model, batch):
    return jnp.mean((model(batch["input_ids"]) - 1.0) ** 2)


def test_the_gradient_finds_the_known_trigger():
    model = _echo()
    config = AutoPromptConfig(num_tokens=2, candidates_per_step=1, steps=8, batch_size=4, seed=0)
    found = search(model, _echo_loss, IDS, config, init_ids=(0, 0))
    assert found.token_ids == TARGET  # one candidate per step: HotFlip's top-1 is the right token
    assert found.history[-1] == pytest.approx(-2.0, abs=1e-5)
    start = float(_echo_loss(_attached(model, peft_jax.prompt_tuning(2, prompt_init="text", token_ids=(0, 0))), IDS))
    assert found.history[0] < start
    assert all(b <= a for a, b in zip(found.history, found.history[1:]))  # one batch: never worse
    assert found.accepted == 2


def _attached(model, config):
    copy = nnx.clone(model)
    peft_jax.nnx.attach(copy, config, rngs=nnx.Rngs(9))
    return copy


def test_the_model_is_left_as_it_was():
    model = NnxTapNet(nnx.Rngs(0))
    before = model(IDS["input_ids"])
    search(model, _tap_net_loss, IDS, AutoPromptConfig(num_tokens=3, steps=2, batch_size=2))
    assert peft_jax.nnx.adapter_names(model) == set()
    assert type(model.input_tap).__name__ == "InputTap"
    np.testing.assert_array_equal(model(IDS["input_ids"]), before)


def test_same_seed_same_result_on_a_tap_model():
    model = NnxTapNet(nnx.Rngs(0))
    config = AutoPromptConfig(num_tokens=3, candidates_per_step=4, steps=6, batch_size=2, seed=3)
    a, b = (search(model, _tap_net_loss, IDS, config) for _ in range(2))
    assert a == b
    assert len(a.token_ids) == 3 and len(a.history) == 6


def test_a_model_with_adapters_keeps_them_and_only_the_prompt_is_searched():
    model = NnxTapNet(nnx.Rngs(0))
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q"], rank=2), rngs=nnx.Rngs(1), name="autoprompt")
    lora = peft_jax.nnx.adapter_state(model)
    found = search(model, _tap_net_loss, IDS, AutoPromptConfig(num_tokens=2, steps=3, batch_size=4))
    assert len(found.token_ids) == 2 and peft_jax.nnx.adapter_names(model) == {"autoprompt"}
    for key, value in peft_jax.nnx.adapter_state(model).items():
        np.testing.assert_array_equal(value, lora[key])


class Words:
    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_tokens_are_readable_with_a_tokenizer():
    config = AutoPromptConfig(num_tokens=2, candidates_per_step=1, steps=8, batch_size=4)
    found = search(_echo(), _echo_loss, IDS, config, init_ids=(0, 0), tokenizer=Words())
    assert found.tokens == ("w11", "w3") and found.text == "w11 w3"
    assert search(_echo(), _echo_loss, IDS, config).tokens is None


def test_candidates_come_from_the_allowed_vocabulary():
    allowed = (2, 5, 7, 11)
    config = AutoPromptConfig(num_tokens=2, candidates_per_step=2, steps=8, batch_size=4, candidate_ids=allowed,
                              exclude_ids=(11,))
    found = search(_echo(), _echo_loss, IDS, config)
    assert set(found.token_ids) <= {2, 5, 7}


def test_found_ids_initialize_prompt_tuning_with_their_embedding_rows():
    model = _echo()
    config = AutoPromptConfig(num_tokens=2, candidates_per_step=1, steps=8, batch_size=4)
    found = search(model, _echo_loss, IDS, config, init_ids=(0, 0))
    for placement in (found.prompt_tuning(),
                      peft_jax.prompt_tuning(2, prompt_init="text", token_ids=found.token_ids)):
        tuned = _attached(model, placement)
        (prompt,) = peft_jax.nnx.adapter_state(tuned).values()
        np.testing.assert_array_equal(prompt, model.model.embed.embedding[...][np.array(found.token_ids)])
        assert float(_echo_loss(tuned, IDS)) == pytest.approx(found.history[-1], abs=1e-6)


def _decoder(dtype=jnp.float32):
    cfg = DecoderConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4, remat=None)
    return Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)


def _next_token_loss(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, -1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, batch["target"][:, None], axis=-1))


DECODER_DATA = {"input_ids": np.array([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 12, 13]]),
                "attention_mask": np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]),
                "target": np.array([30, 31, 32])}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_decoder_and_real_token_equivalence(dtype):
    model = _decoder(dtype)
    config = AutoPromptConfig(num_tokens=3, candidates_per_step=5, steps=6, batch_size=3, exclude_ids=(0,))
    found = search(model, _next_token_loss, DECODER_DATA, config)
    assert 0 not in found.token_ids
    assert all(b <= a for a, b in zip(found.history, found.history[1:]))
    tuned = _attached(model, found.prompt_tuning())
    assert float(nnx.jit(_next_token_loss)(tuned, DECODER_DATA)) == pytest.approx(found.history[-1], rel=1e-5)
    # The virtual tokens compute what the same ids typed before the inputs compute.
    ids = DECODER_DATA["input_ids"][1:2]
    logits = nnx.jit(lambda m, x: m(x))
    typed = logits(model, jnp.concatenate([jnp.array([found.token_ids]), ids], axis=1))[:, 3:]
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(logits(tuned, ids).astype(jnp.float32), typed.astype(jnp.float32), atol=tol)


def test_reference_encoder_classifier():
    cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = EncoderForSequenceClassification(cfg, num_labels=2, rngs=nnx.Rngs(0))
    data = {"input_ids": np.array([[2, 7, 9, 3], [2, 4, 5, 3], [2, 8, 3, 0]]),
            "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]), "labels": np.array([1, 0, 1])}

    def loss(m, batch):
        logits = m(batch["input_ids"], batch["attention_mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    found = search(model, loss, data, AutoPromptConfig(num_tokens=2, candidates_per_step=4, steps=5, batch_size=3))
    tuned = _attached(model, peft_jax.prompt_tuning(2, prompt_init="text", token_ids=found.token_ids))
    assert float(nnx.jit(loss)(tuned, data)) == pytest.approx(found.history[-1], rel=1e-5)


def test_one_compile_for_the_whole_search():
    model = NnxTapNet(nnx.Rngs(0))
    counts = []
    for steps in (1, 1, 6):
        with compile_log() as seen:
            search(model, _tap_net_loss, IDS, AutoPromptConfig(num_tokens=3, steps=steps, batch_size=2))
        counts.append(len(seen))
    assert counts[2] == counts[1]  # more steps and candidates: no more compiles


@pytest.mark.parametrize("fields, match", [
    ({"num_tokens": 0}, "num_tokens must be a positive integer"),
    ({"num_tokens": -2}, "num_tokens must be a positive integer"),
    ({"num_tokens": 2, "candidates_per_step": 0}, "candidates_per_step"),
    ({"num_tokens": 2, "candidate_ids": ()}, "candidate vocabulary is empty"),
    ({"num_tokens": 2, "candidate_ids": (1, 2), "exclude_ids": (2, 1)}, "candidate vocabulary is empty"),
    ({"num_tokens": 2, "candidate_ids": (1, -1)}, "non-negative integer"),
    ({"num_tokens": 2, "candidate_ids": "abc"}, "sequence of token ids"),
])
def test_bad_configs(fields, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        AutoPromptConfig(**fields)


@pytest.mark.parametrize("model, config, kwargs, error, match", [
    (lambda: nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), {}, {}, errors.MissingHookError, "input_tap"),
    (_echo, {"exclude_ids": tuple(range(VOCAB))}, {}, errors.InvalidConfigError, "vocabulary is empty"),
    (_echo, {"candidate_ids": (3, 99)}, {}, errors.InvalidConfigError, r"\[99\] are outside .* 16 rows"),
    (_echo, {}, {"init_ids": (1, 2, 3)}, errors.InvalidConfigError, "init_ids has 3 ids but num_tokens is 2"),
    (_echo, {}, {"init_ids": (1, 40)}, errors.InvalidConfigError, r"init_ids \[40\] are outside"),
    (_echo, {"batch_size": 5}, {}, errors.BatchError, "the data has 4 examples"),
    (_echo, {}, {"tokenizer": object()}, errors.InvalidConfigError, "no decode"),
])
def test_bad_input_fails_before_compiling(model, config, kwargs, error, match):
    model = model()
    config = AutoPromptConfig(**{"num_tokens": 2, "batch_size": 2, **config})
    with compile_log() as seen, pytest.raises(error, match=match):
        search(model, _echo_loss, IDS, config, **kwargs)
    assert not seen


def test_bad_loss_and_data():
    config = AutoPromptConfig(num_tokens=2, batch_size=2)
    with pytest.raises(errors.InvalidConfigError, match="loss_fn must return a float scalar"):
        search(_echo(), lambda m, b: m(b["input_ids"]), IDS, config)
    with pytest.raises(errors.BatchError, match="same number of rows"):
        search(_echo(), _echo_loss, {"input_ids": IDS["input_ids"], "y": np.zeros(3)}, config)
    with pytest.raises(errors.InvalidConfigError, match="needs an AutoPromptConfig"):
        search(_echo(), _echo_loss, IDS, {"num_tokens": 2})
