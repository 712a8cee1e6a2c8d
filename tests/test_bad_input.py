"""Bad input: each mistake raises a typed error from peft_jax.errors that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import peft_jax
from frontends import ADAPTABLE, HARNESSES, batch
from peft_jax import errors


@pytest.fixture(params=sorted(HARNESSES))
def harness(request):
    return HARNESSES[request.param]()


def test_selector_matching_nothing_lists_nearest_paths(harness):
    with pytest.raises(errors.NoMatchError) as info:
        harness.attach(peft_jax.LoraConfig(targets=["q_proj", "densse"]))
    message = str(info.value)
    assert "q_proj" in message and "dense" in message  # the near real path is offered
    assert len([line for line in message.splitlines() if line.startswith("  ")]) <= 10


def test_unsupported_layer_names_path_and_type(harness):
    with pytest.raises(errors.UnsupportedLayerError) as info:
        harness.attach(peft_jax.LoraConfig(targets=["dense", "norm"]))
    assert "'norm'" in str(info.value) and "LayerNorm" in str(info.value)


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_bad_rank(rank):
    with pytest.raises(errors.InvalidConfigError, match="rank"):
        peft_jax.LoraConfig(targets=["dense"], rank=rank)


def test_rank_larger_than_a_layer_is_allowed_with_one_warning(harness):
    # As HF PEFT: a uniform config over every linear layer must work on a 3-class head.
    with pytest.warns(UserWarning, match=r"'head'.*min\(fan_in, fan_out\) = 3") as seen:
        harness.attach(peft_jax.LoraConfig(targets=["dense", "head"], rank=4))
    assert len(seen) == 1 and "'dense'" not in str(seen[0].message)
    assert harness.adapted_paths() == ["dense", "head"]


@pytest.mark.parametrize("alpha", [0, -2.0])
def test_bad_alpha(alpha):
    with pytest.raises(errors.InvalidConfigError, match="alpha"):
        peft_jax.LoraConfig(targets=["dense"], alpha=alpha)
    with pytest.raises(errors.InvalidConfigError, match="alpha_pattern"):
        peft_jax.LoraConfig(targets=["dense"], alpha_pattern={".*": alpha})


def test_bad_bias_mode_and_regex():
    with pytest.raises(errors.InvalidConfigError, match="bias"):
        peft_jax.LoraConfig(targets=["dense"], bias="some")
    with pytest.raises(errors.InvalidConfigError):
        peft_jax.LoraConfig(targets=["dense"], rank_pattern={"(": 4})


def test_second_adapter_with_a_used_name(harness):
    harness.attach(peft_jax.LoraConfig(targets=["dense"]))
    with pytest.raises(errors.AdapterNameError, match="'default'"):
        harness.attach(peft_jax.LoraConfig(targets=["conv"]))


def test_failed_attach_changes_nothing():
    harness = HARNESSES["nnx"]()
    before = nnx.state(harness.model)
    with pytest.raises(errors.UnsupportedLayerError):
        harness.attach(peft_jax.LoraConfig(targets=["dense", "head", "norm"], rank=4))
    assert harness.adapted_paths() == []
    after = nnx.state(harness.model)
    for a, b in zip(before.flat_state(), after.flat_state()):
        assert a[0] == b[0] and np.array_equal(a[1][...], b[1][...])


def test_unmerge_without_merge(harness):
    harness.attach(peft_jax.LoraConfig(targets=["dense"]))
    with pytest.raises(errors.StateError, match="merge"):
        harness.unmerge()


def test_dropout_without_key_in_batch_nnx():
    harness = HARNESSES["nnx"]()
    harness.attach(peft_jax.LoraConfig(targets=["dense"], dropout=0.1))
    trainable, frozen, loss = harness.split()
    with pytest.raises(errors.BatchError, match="dropout_rng"):
        loss(trainable, frozen, batch())


def test_exactly_the_selected_layers_train(harness):
    harness.attach(peft_jax.LoraConfig(targets=r"(dense|conv)"))
    assert harness.adapted_paths() == ["conv", "dense"]
    assert set(ADAPTABLE) > set(harness.adapted_paths())
