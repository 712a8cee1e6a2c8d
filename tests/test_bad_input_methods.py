"""Bad method input on both front-ends: a typed error naming the problem, before anything changes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import peft_jax
from frontends import HARNESSES
from peft_jax import errors

P = peft_jax.place

CASES = {
    "oft_on_embed": (P(["embed"], peft_jax.OFT(oft_block_size=4)), errors.UnsupportedLayerError,
                     r"OFT.*'embed'.*Embed"),
    "tokens_on_dense": (P(["dense"], peft_jax.TrainableTokens(indices=(0,))), errors.UnsupportedLayerError,
                        r"TrainableTokens.*'dense'"),
    "ia3_input_of_embed": (P(["embed"], peft_jax.IA3(feedforward=True)), errors.UnsupportedLayerError,
                           r"IA3.*'embed'"),
    "ln_tuning_on_layer_without_params": (P(["embed", "norm"], peft_jax.TrainBias()), errors.UnsupportedLayerError,
                                          r"'embed'.*no bias"),
    "lokr_factor_not_dividing": (P(["dense"], peft_jax.LoKr(rank=2, decompose_factor=3)),
                                 errors.InvalidConfigError, r"=3 does not divide the 8 input features of 'dense'"),
    "oft_block_not_dividing": (P(["dense"], peft_jax.OFT(r=0, oft_block_size=3)), errors.InvalidConfigError,
                               r"=3 does not divide the 8 input features of 'dense'"),
    "token_index_out_of_range": (P(["embed"], peft_jax.TrainableTokens(indices=(2, 99))),
                                 errors.InvalidConfigError, r"99.*16|16.*99"),
    "copy_and_linear_method_on_one_layer": (
        peft_jax.compose(peft_jax.LoraConfig(targets=["dense"]), P(["dense"], peft_jax.LnTuning())),
        errors.IncompatibleMethodsError, r"Lora and LnTuning cannot share layer 'dense'"),
    "two_loras_in_one_adapter": (
        peft_jax.compose(peft_jax.LoraConfig(targets=["dense"]), peft_jax.LoraConfig(targets=["dense", "conv"])),
        errors.IncompatibleMethodsError, r"'dense'.*lora_a"),
    "not_a_config": (peft_jax.Lora(rank=2), errors.InvalidConfigError, r"LoraConfig|place"),
}


def _snapshot(harness):
    if harness.name == "nnx":
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(harness.model))]
    return [np.asarray(x) for x in jax.tree.leaves(harness.variables)]


@pytest.mark.parametrize("front", sorted(HARNESSES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_method_input_is_typed_and_changes_nothing(case, front):
    config, error, match = CASES[case]
    harness = HARNESSES[front]()
    before = _snapshot(harness)
    with pytest.raises(error, match=match):
        harness.attach(config)
    if front == "nnx":
        assert list(peft_jax.nnx.adapted_layers(harness.model)) == []
    after = _snapshot(harness)
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_merging_a_method_that_cannot_merge_names_it(front):
    harness = HARNESSES[front]()
    harness.attach(P(["embed"], peft_jax.Beft()))  # Embed has no bias to fold beft_bias into
    with pytest.raises(errors.NotMergeableError, match="BEFT on 'embed'"):
        harness.merge()


def test_summary_counts_per_method_and_adapter():
    harness = HARNESSES["nnx"]()
    harness.attach(peft_jax.compose(peft_jax.LoraConfig(targets=["dense"], rank=2),
                                    peft_jax.IA3Config(targets=["general"]),
                                    P(["norm"], peft_jax.LnTuning())))
    harness.attach(P(["conv"], peft_jax.Beft()), name="second")
    got = peft_jax.nnx.summary(harness.model)
    assert got.by_method == {("default", "lora"): 2 * (8 + 8), ("default", "ia3"): 2 * 4,
                             ("default", "ln_tuning"): 8 + 8, ("second", "beft"): 8}
    assert got.trainable == sum(got.by_method.values())

    linen = HARNESSES["linen"]()
    linen.attach(peft_jax.compose(peft_jax.LoraConfig(targets=["dense"], rank=2),
                                  peft_jax.IA3Config(targets=["general"]),
                                  P(["norm"], peft_jax.LnTuning())))
    linen.attach(P(["conv"], peft_jax.Beft()), name="second")
    assert linen.peft.summary(linen.variables).by_method == got.by_method
