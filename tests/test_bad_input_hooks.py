"""Bad input for the module and input families: typed errors before any compile, nothing changed."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import peft_jax
from frontends import HARNESSES, MAX_POSITIONS, TAP_ROLES, batch, compile_log
from peft_jax import errors
from peft_jax.methods import Bottleneck, Phm
from peft_jax.models.encoder import Encoder, EncoderConfig


@contextlib.contextmanager
def no_compile():
    with compile_log() as seen:
        yield
    assert seen == [], f"{len(seen)} compile(s) before the error"


def _attach_fails(front, config, error, match, taps=False):
    harness = HARNESSES[front](taps=taps)
    with no_compile(), pytest.raises(error, match=match):
        harness.attach(config)
    if front == "nnx":  # nothing was changed
        assert list(peft_jax.nnx.adapted_layers(harness.model)) == []


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_prompt_tuning_without_an_input_tap(front):
    _attach_fails(front, peft_jax.prompt_tuning(4), errors.MissingHookError, "InputTap")


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_prefix_tuning_without_an_attention_tap(front):
    _attach_fails(front, peft_jax.prefix_tuning(4), errors.MissingHookError, "AttentionTap")


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_prompt_longer_than_the_model_positions(front):
    _attach_fails(front, peft_jax.prompt_tuning(MAX_POSITIONS), errors.SequenceTooLongError,
                  str(MAX_POSITIONS), taps=True)


def test_prompt_plus_inputs_overflow_at_trace_time():
    harness = HARNESSES["nnx"](taps=True)
    harness.attach(peft_jax.prompt_tuning(MAX_POSITIONS - 2))
    ids = batch()["ids"]  # 5 tokens + 30 virtual > 32 positions
    with no_compile(), pytest.raises(errors.SequenceTooLongError, match="32"):
        harness.forward(ids, jit=True)


def test_prompt_overflow_on_the_reference_encoder():
    cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=12)
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    peft_jax.nnx.attach(model, peft_jax.prompt_tuning(8), rngs=nnx.Rngs(1))
    model(jnp.ones((1, 4), jnp.int32))  # 8 + 4 = 12 positions fit
    ids = jnp.ones((1, 5), jnp.int32)
    with no_compile(), pytest.raises(errors.SequenceTooLongError):
        jax.jit(lambda ids: model(ids))(ids)


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_phm_dim_that_does_not_divide_the_sizes(front):
    config = peft_jax.adapters("compacter++", roles=TAP_ROLES, reduction_factor=2, phm=Phm(phm_dim=3))
    _attach_fails(front, config, errors.InvalidConfigError, "phm_dim", taps=True)


def test_adapters_need_their_roles():
    with pytest.raises(errors.InvalidConfigError, match="roles=Roles"):
        peft_jax.adapters("double_seq_bn", roles=peft_jax.hooks.Roles(ffn="ffn_residual"))


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_adapter_on_a_module_of_unknown_width(front):
    # A LayerNorm is not a linear layer: the adapter cannot tell its output width.
    _attach_fails(front, peft_jax.place(["norm1"], Bottleneck()), errors.InvalidConfigError,
                  "features=", taps=True)


def test_unknown_preset():
    with pytest.raises(errors.UnknownNameError, match="pfeiffer"):
        peft_jax.adapters("pfeifer", roles=TAP_ROLES)


def test_input_tap_naming_a_missing_embedding_changes_nothing():
    class Net(nnx.Module):
        def __init__(self):
            self.embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
            self.input_tap = peft_jax.hooks.InputTap(features=4, vocab_size=10, embed_path="nope")

    model = Net()
    with pytest.raises(errors.MissingHookError, match="nope"):
        peft_jax.nnx.attach(model, peft_jax.prompt_tuning(2), rngs=nnx.Rngs(1))
    assert list(peft_jax.nnx.adapted_layers(model)) == []
