"""The contract every method keeps, on both front-ends, with and without jit.

One list of cases (every method, a few combinations) x {nnx, linen} x {jit, no jit}: initial
outputs equal the base where promised, fold() leaves outputs unchanged, merged == unmerged for
mergeable methods (a typed error for the others), unmerge restores the base bitwise when
recorded, disabled == base, frozen leaves bitwise unchanged and every trainable leaf moved after
training, and no recompilation on the second step (counted from JAX's compile events).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax
from frontends import ADAPTABLE, HARNESSES, TAP_ROLES, batch, compile_log, train
from peft_jax import errors
from peft_jax.methods import (
    IA3,
    OFT,
    Beft,
    Bottleneck,
    LnTuning,
    LoHa,
    LoKr,
    TrainableTokens,
    TrainBias,
    Vera,
)

P = peft_jax.place
LINEARS = ["dense", "general", "einsum", "conv"]  # the adaptable layers that are not the embedding
TWO_D = ["dense", "general"]  # layers whose inputs are plain trailing features

# id -> (config, the sites it must adapt, whether it merges)
CASES = {
    "lora": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, alpha=4.0), ADAPTABLE, True),
    "rslora": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=4, alpha=4.0, use_rslora=True), ADAPTABLE, True),
    "patterns": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, alpha=2.0, rank_pattern={".*dense": 3},
                                     alpha_pattern={".*conv": 8.0}), ADAPTABLE, True),
    "gaussian": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, init=peft_jax.Gaussian()), ADAPTABLE, True),
    "pissa": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, init=peft_jax.PiSSA()), ADAPTABLE, True),
    "olora": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, init=peft_jax.OLoRA()), ADAPTABLE, True),
    "dora": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, alpha=4.0, use_dora=True), ADAPTABLE, True),
    "dora_pissa": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, use_dora=True, init=peft_jax.PiSSA()),
                   ADAPTABLE, True),
    "dropout": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, dropout=0.2), ADAPTABLE, True),
    "lora_bias": (peft_jax.LoraConfig(targets=LINEARS, rank=2, lora_bias=True), LINEARS, True),
    "bias_and_head": (peft_jax.LoraConfig(targets=ADAPTABLE, rank=2, bias="lora_only", modules_to_save=["head"]),
                      ADAPTABLE + ["head"], True),
    "ia3": (peft_jax.IA3Config(targets=LINEARS, feedforward_modules=["dense", "einsum"]), LINEARS, True),
    "vera": (P(ADAPTABLE, Vera(rank=4)), ADAPTABLE, True),
    "loha": (P(LINEARS, LoHa(rank=2, alpha=4.0)), LINEARS, True),
    "lokr": (P(LINEARS, LoKr(rank=2, alpha=4.0)), LINEARS, True),
    "oft": (P(TWO_D, OFT(r=2, oft_block_size=0)), TWO_D, True),
    "beft": (P(LINEARS, Beft()), LINEARS, True),
    "bitfit": (P(LINEARS + ["norm", "head"], TrainBias()), LINEARS + ["norm", "head"], True),
    "ln_tuning": (P(["norm"], LnTuning()), ["norm"], True),
    "trainable_tokens": (P(["embed"], TrainableTokens(indices=(1, 3, 5))), ["embed"], True),
    "mixed_layers": (peft_jax.compose(peft_jax.LoraConfig(targets=["dense", "einsum"], rank=2),
                                      peft_jax.IA3Config(targets=["general"], feedforward_modules=["general"]),
                                      P(["conv"], Vera(rank=2)), P(["norm"], LnTuning())),
                     ["dense", "einsum", "general", "conv", "norm"], True),
    "same_layer": (peft_jax.compose(peft_jax.LoraConfig(targets=TWO_D, rank=2),
                                    P(TWO_D, IA3(feedforward=True)), P(TWO_D, OFT(r=2, oft_block_size=0))),
                   TWO_D, True),
    "beft_on_embed": (P(["embed", "dense"], Beft()), ["embed", "dense"], False),
}


# The tap model (a user's transformer block with the three taps): id -> (config, the sites it
# must adapt, whether it starts at the base outputs, the method a merge must refuse by name).
# Bottleneck adapters start at identity with the up projection at zero ("zero_up", "mam_adapter").
ZERO = dict(init_weights="zero_up")
TAP_CASES = {
    "seq_bn": (peft_jax.adapters("seq_bn", roles=TAP_ROLES, reduction_factor=2, **ZERO),
               ["ffn_residual"], True, "Bottleneck"),
    "double_seq_bn": (peft_jax.adapters("double_seq_bn", roles=TAP_ROLES, reduction_factor=2,
                                        train_norms=True, **ZERO),
                      ["attention_residual", "ffn_residual", "norm1", "norm2"], True, "Bottleneck"),
    "par_bn": (peft_jax.adapters("par_bn", roles=TAP_ROLES), ["ffn_residual"], True, "Bottleneck"),
    "scaled_par_bn_gated": (peft_jax.adapters("scaled_par_bn", roles=TAP_ROLES, use_gating=True),
                            ["ffn_residual"], True, "Bottleneck"),
    "compacter": (peft_jax.adapters("compacter", roles=TAP_ROLES, reduction_factor=2, **ZERO),
                  ["attention_residual", "ffn_residual"], True, "Bottleneck"),
    "compacter++": (peft_jax.adapters("compacter++", roles=TAP_ROLES, reduction_factor=2, **ZERO),
                    ["ffn_residual"], True, "Bottleneck"),
    "adapter_on_module": (P(["down"], Bottleneck(reduction_factor=2, **ZERO)), ["down"], True, "Bottleneck"),
    "prompt_tuning": (peft_jax.prompt_tuning(3, prompt_init="vocab"), ["input_tap"], False, "PromptTuning"),
    "p_tuning_lstm": (peft_jax.p_tuning(3, encoder="lstm", encoder_hidden_size=4), ["input_tap"], False,
                      "PTuning"),
    "prefix_tuning": (peft_jax.prefix_tuning(2), ["attention_tap", "input_tap"], False, "Prefix"),
    "prefix_projection": (peft_jax.prefix_tuning(2, projection=True, encoder_hidden_size=6),
                          ["attention_tap", "input_tap"], False, "Prefix"),
    "llama_adapter": (peft_jax.llama_adapter(3, 1), ["attention_tap"], True, "AdaptionPrompt"),
    "mam": (peft_jax.mam(roles=TAP_ROLES, prefix_length=2, bottleneck_size=6),
            ["attention_tap", "ffn_residual"], False, "PrefixTuning"),
    "lora_and_prompt": (peft_jax.compose(peft_jax.LoraConfig(targets=["q", "v"], rank=2),
                                         peft_jax.prompt_tuning(2)),
                        ["input_tap", "q", "v"], False, "PromptTuning"),
    "adapters_and_lora": (peft_jax.compose(peft_jax.LoraConfig(targets=["up"], rank=2),
                                           peft_jax.adapters("seq_bn", roles=TAP_ROLES, reduction_factor=2, **ZERO)),
                          ["ffn_residual", "up"], True, "Bottleneck"),
}


def _leaves(tree):
    def host(x):
        is_key = jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
        return np.array(jax.random.key_data(x) if is_key else x)
    return [host(x) for x in jax.tree.leaves(tree)]


# Every case runs jitted; eager (no-jit) runs for a representative subset (suite time).
EAGER = ("lora", "dora", "ia3", "vera", "loha", "oft", "bias_and_head", "mixed_layers", "same_layer",
         "trainable_tokens", "beft_on_embed")
RUNS = [pytest.param(case, jit, id=f"{case}-{'jit' if jit else 'nojit'}")
        for case in sorted(CASES) for jit in (True, False) if jit or case in EAGER]


@pytest.mark.parametrize("front", sorted(HARNESSES))
@pytest.mark.parametrize(("case", "jit"), RUNS)
def test_contract(case, jit, front):
    config, sites, mergeable = CASES[case]
    check_contract(HARNESSES[front](), config, sites, jit, identity=True,
                   refuses=None if mergeable else "BEFT on 'embed'")


# Eager (no-jit) runs for one case per family of taps; every case runs jitted (suite time).
TAP_EAGER = ("seq_bn", "prompt_tuning", "prefix_projection")
TAP_RUNS = [pytest.param(case, jit, id=f"{case}-{'jit' if jit else 'nojit'}")
            for case in sorted(TAP_CASES) for jit in (True, False) if jit or case in TAP_EAGER]


@pytest.mark.parametrize("front", sorted(HARNESSES))
@pytest.mark.parametrize(("case", "jit"), TAP_RUNS)
def test_tap_contract(case, jit, front):
    config, sites, identity, refuses = TAP_CASES[case]
    check_contract(HARNESSES[front](taps=True), config, sites, jit, identity=identity, refuses=refuses)


def check_contract(harness, config, sites, jit, *, identity: bool, refuses: str | None):
    """The contract on one harness; ``refuses`` names the method a merge must refuse."""
    ids = batch()["ids"]
    before = harness.forward(ids, jit)
    harness.attach(config)
    assert harness.adapted_paths() == sorted(sites)

    initial = harness.forward(ids, jit)
    if identity:  # where promised, methods start at the base outputs (PiSSA / OLoRA up to rounding)
        np.testing.assert_allclose(initial, before, atol=1e-5)

    trainable0, frozen0, _ = harness.split()
    trainable0, frozen0 = _leaves(trainable0), _leaves(frozen0)
    step, frozen_after, opt_state = train(harness, steps=4, jit=jit)
    trainable1, frozen1, _ = harness.split()
    chex.assert_trees_all_equal(frozen0, _leaves(frozen1))  # frozen leaves bitwise unchanged
    moved = [not np.array_equal(old, new) for old, new in zip(trainable0, _leaves(trainable1))]
    assert moved and all(moved), f"trainable leaves that did not move: {moved}"
    if jit:
        trainable, frozen, _ = harness.split()
        trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; keep the model's own
        with compile_log() as compiles:
            b = batch(9) | {"dropout_rng": jax.random.key(9)}
            step(trainable, opt_state, frozen, b)
        assert compiles == [], f"the step recompiled {len(compiles)} time(s)"

    harness.eval()
    adapted = harness.forward(ids, jit)
    assert float(jnp.max(jnp.abs(adapted - before))) > 1e-4, "training did not change the outputs"
    harness.fold()  # prefix tuning's MLP -> flat prefixes; a no-op for the others
    np.testing.assert_allclose(harness.forward(ids, jit), adapted, atol=1e-6)
    with harness.disabled():
        np.testing.assert_allclose(harness.forward(ids, jit), harness.base_forward(ids), atol=1e-6)

    if refuses is not None:
        with pytest.raises(errors.NotMergeableError, match=refuses):
            harness.merge(keep_original=True)
        np.testing.assert_allclose(harness.forward(ids, jit), adapted, atol=1e-6)  # nothing changed
        return
    base = harness.base_arrays()
    harness.merge(keep_original=True)
    assert float(jnp.max(jnp.abs(harness.forward(ids, jit) - adapted))) <= 1e-5
    harness.unmerge()
    chex.assert_trees_all_equal(harness.base_arrays(), base)
    np.testing.assert_allclose(harness.forward(ids, jit), adapted, atol=1e-6)

    harness.merge(keep_original=False)
    harness.unmerge()
    chex.assert_trees_all_close(harness.base_arrays(), base, atol=1e-5)
