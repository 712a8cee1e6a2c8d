"""AdaLoRA without torch: the whole budget schedule in one compiled step on both front-ends, the
step's refusal to train AdaLoRA without its allocator, typed errors for bad settings, the
orthogonality penalty (HF PEFT's formula, the same in NNX and Linen) and folding to plain LoRA.
Parity with HF PEFT itself is in ``tests/interop/test_hf_peft_adalora.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax
from frontends import HARNESSES, LinenHarness, NnxHarness, batch, compile_log, mse, train
from peft_jax import errors
from peft_jax.train.rank_allocation import (
    allocate_ranks,
    budget_schedule,
    current_budget,
    factor_groups,
    rank_pattern,
)

TARGETS = ["dense", "general", "einsum"]  # Linear, LinearGeneral (8 -> (2, 4)), Einsum ((2, 4) -> 8)
N_LAYERS = len(TARGETS)
METHOD = peft_jax.AdaLora(init_r=4, target_r=2, alpha=8.0, tinit=2, tfinal=3, delta_t=2,
                          total_step=12)
CONFIG = peft_jax.place(TARGETS, METHOD)
EXTRA = 3  # steps run past total_step: the frozen phase keeps going


def _loss(harness):
    """``(trainable, frozen, loss)``; the Linen loss adds the penalty itself, as users must
    (NNX's `make_loss` adds it)."""
    trainable, frozen, loss = harness.split()
    if harness.name == "nnx":
        return trainable, frozen, loss
    peft = harness.peft

    def with_penalty(trainable, frozen, b):
        variables = peft_jax.combine(trainable, frozen)
        return mse(peft.apply(variables, b["ids"]), b["target"]) + peft.regularizer(variables)

    return trainable, frozen, with_penalty


def _e_values(trainable) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves(trainable)
    return {k: np.asarray(leaves[g["lora_e"]]) for k, g in factor_groups(trainable).items()}


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_the_whole_schedule_runs_in_one_compiled_step(front):
    harness = HARNESSES[front]()
    harness.attach(CONFIG)
    trainable, frozen, loss = _loss(harness)
    assert len(factor_groups(trainable)) == N_LAYERS
    step = peft_jax.make_train_step(loss, allocate_ranks(optax.adam(1e-2), METHOD))
    opt_state = step.init(trainable)
    batches = [batch(i) for i in range(METHOD.total_step + EXTRA)]
    trainable, opt_state, _ = step(trainable, opt_state, frozen, batches[0])  # compiles
    budgets, kept = [int(current_budget(opt_state))], []
    with compile_log() as compiles:
        for b in batches[1:]:
            trainable, opt_state, metrics = step(trainable, opt_state, frozen, b)
            budgets.append(int(current_budget(opt_state)))
            kept.append(sum(map(sum, rank_pattern(opt_state).values())))
    assert compiles == []  # warm-up, pruning, the forced final mask and the frozen phase alike
    want = [budget_schedule(METHOD, N_LAYERS, t)[0] for t in range(len(batches))]
    assert budgets == want
    assert want[0] == METHOD.init_r * N_LAYERS and want[-1] == METHOD.target_r * N_LAYERS
    assert len(set(want)) > 2
    assert kept[-1] == METHOD.target_r * N_LAYERS
    assert np.isfinite(float(metrics["loss"]))
    # after the schedule E is zero exactly off the rank pattern, in every layer
    pattern, e = rank_pattern(opt_state), _e_values(trainable)
    assert set(pattern) == set(e)
    for layer in pattern:
        np.testing.assert_array_equal(e[layer] != 0, pattern[layer], err_msg=layer)
    assert sum(int((v != 0).sum()) for v in e.values()) == METHOD.target_r * N_LAYERS


def test_the_step_refuses_adalora_without_the_allocator():
    harness = NnxHarness()
    harness.attach(CONFIG)
    trainable, frozen, loss = harness.split()
    tx = optax.adam(1e-2)
    step = peft_jax.make_train_step(loss, tx)
    with pytest.raises(errors.StateError, match="allocate_ranks"):
        step(trainable, tx.init(trainable), frozen, batch())
    with pytest.raises(errors.StateError, match="allocate_ranks"):
        rank_pattern(tx.init(trainable))
    # LoRA trains with a plain optimizer as before
    plain = NnxHarness()
    plain.attach(peft_jax.LoraConfig(targets=TARGETS, rank=2))
    trainable, frozen, loss = plain.split()
    peft_jax.make_train_step(loss, tx)(trainable, tx.init(trainable), frozen, batch())


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_r=4, target_r=5, total_step=10), "target_r=5 is larger than init_r=4"),
    (dict(tinit=5, tfinal=5, total_step=10), "must be smaller than total_step"),
    (dict(tinit=8, tfinal=5, total_step=10), "must be smaller than total_step"),
    (dict(use_dora=True, total_step=10), "DoRA"),
    (dict(), "needs total_step"),
    (dict(total_step=0), "total_step"),
    (dict(beta1=1.0, total_step=10), "beta1"),
    (dict(delta_t=0, total_step=10), "delta_t"),
    (dict(init_r=0, total_step=10), "init_r"),
    (dict(tinit=-1, total_step=10), "tinit"),
])
def test_bad_settings_are_typed_errors(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        peft_jax.AdaLora(**kwargs)


def test_the_allocator_checks_what_it_is_given():
    harness = NnxHarness()
    harness.attach(CONFIG)
    trainable, _, _ = harness.split()
    with pytest.raises(errors.InvalidConfigError, match="needs the AdaLora method"):
        allocate_ranks(optax.sgd(0.1), peft_jax.Lora(rank=2))
    with pytest.raises(errors.InvalidConfigError, match="not the attached one"):
        allocate_ranks(optax.sgd(0.1), peft_jax.AdaLora(init_r=3, target_r=2, total_step=12)).init(trainable)
    with pytest.raises(errors.InvalidConfigError, match="found no AdaLoRA params"):
        allocate_ranks(optax.sgd(0.1), METHOD).init({"w": jnp.ones(3)})
    tx = allocate_ranks(optax.sgd(0.1), METHOD)
    with pytest.raises(errors.InvalidConfigError, match="needs the params"):
        tx.update(trainable, tx.init(trainable))


def _hf_penalty(factors: list[tuple[np.ndarray, np.ndarray]], weight: float) -> float:
    """HF PEFT's ``AdaLoraModel.forward``: ``weight *`` the mean over every A (r, in) and
    B (out, r) of ``|A A^T - I|_F`` / ``|B^T B - I|_F``; our (in, r) / (r, out) factors."""
    norms = []
    for a, b in factors:  # a: (*in, r) -> HF's (r, in); b: (r, *out) -> HF's (out, r)
        r = a.shape[-1]
        hf_a, hf_b = a.reshape(-1, r).T.astype(np.float64), b.reshape(r, -1).T.astype(np.float64)
        norms.append(np.linalg.norm(hf_a @ hf_a.T - np.eye(r)))
        norms.append(np.linalg.norm(hf_b.T @ hf_b - np.eye(r)))
    return weight * float(np.mean(norms))


def test_linen_attaches_adalora_with_the_same_penalty_outputs_and_fold():
    nnx_side, linen_side = NnxHarness(), LinenHarness()
    base = nnx.to_pure_dict(nnx.state(nnx_side.model, nnx.Param))
    linen_side.variables = {"params": base}
    nnx_side.attach(CONFIG)
    train(nnx_side, steps=5, tx=allocate_ranks(optax.adam(2e-2), METHOD))  # ends on the prune at t = 4
    nnx_side.eval()
    linen_side.attach(CONFIG)
    state = peft_jax.nnx.adapter_state(nnx_side.model)
    assert set(state) == set(linen_side.peft.adapter_state(linen_side.variables))
    linen_side.variables = linen_side.peft.load_adapter_state(linen_side.variables, state)

    factors = [(np.asarray(m.default.lora_a[...]), np.asarray(m.default.lora_b[...]))
               for _, m in peft_jax.nnx.adapted_layers(nnx_side.model)]
    assert len(factors) == N_LAYERS
    want = _hf_penalty(factors, METHOD.orth_reg_weight)
    nnx_penalty = float(peft_jax.nnx.regularizer(nnx_side.model))
    linen_penalty = float(linen_side.peft.regularizer(linen_side.variables))
    np.testing.assert_allclose(nnx_penalty, want, rtol=1e-5)
    np.testing.assert_allclose(linen_penalty, nnx_penalty, rtol=1e-6)
    # NNX's make_loss adds the penalty to the model's loss
    trainable, frozen, loss = nnx_side.split()
    b = batch(7)
    plain = mse(nnx_side.model(b["ids"]), b["target"])
    np.testing.assert_allclose(float(loss(trainable, frozen, b)), float(plain) + nnx_penalty, rtol=1e-6)

    ids = batch(5)["ids"]
    out = nnx_side.forward(ids, jit=False)
    np.testing.assert_allclose(linen_side.forward(ids, jit=False), out, atol=1e-5)
    assert float(jnp.abs(out - linen_side.base_forward(ids)).max()) > 1e-4  # the adapter matters

    ranks = {p: int((np.asarray(m.default.lora_e[...]) != 0).sum())
             for p, m in peft_jax.nnx.adapted_layers(nnx_side.model)}
    assert sum(ranks.values()) < METHOD.init_r * N_LAYERS  # the prune at t = 4 left zeros
    for harness in (nnx_side, linen_side):
        harness.fold()
        np.testing.assert_allclose(harness.forward(ids, jit=False), out, atol=1e-5, err_msg=harness.name)
        harness.merge()
        np.testing.assert_allclose(harness.forward(ids, jit=False), out, atol=1e-5, err_msg=harness.name)
    for path, m in peft_jax.nnx.adapted_layers(nnx_side.model):
        rank = max(ranks[path], 1)
        assert m.default.methods == (peft_jax.Lora(rank=rank, alpha=float(rank)),), path
    linen_sites = {s.path: s.methods for a in linen_side.peft.plans for s in a.sites}
    assert linen_sites == {p: (peft_jax.Lora(rank=max(r, 1), alpha=float(max(r, 1))),)
                           for p, r in ranks.items()}


def test_a_folded_adalora_is_a_plain_lora_config_on_a_fresh_base():
    """After `fold`, `as_lora_config(ranks)` re-attaches to an untouched base and the folded
    state loads into it: the same model, as any LoRA with per-layer ranks."""
    from peft_jax.methods.adalora import as_lora_config

    trained = NnxHarness()
    trained.attach(CONFIG)
    train(trained, steps=5, tx=allocate_ranks(optax.adam(2e-2), METHOD))
    trained.eval()
    ids = batch(5)["ids"]
    out = trained.forward(ids, jit=False)
    trained.fold()
    ranks = {p: m.default.methods[0].rank for p, m in peft_jax.nnx.adapted_layers(trained.model)}
    assert sum(ranks.values()) < METHOD.init_r * N_LAYERS

    fresh = NnxHarness()
    fresh.attach(as_lora_config(ranks))
    fresh.eval()
    assert {p: m.default.methods[0] for p, m in peft_jax.nnx.adapted_layers(fresh.model)} == {
        p: peft_jax.Lora(rank=r, alpha=float(r)) for p, r in ranks.items()}
    peft_jax.nnx.load_adapter_state(fresh.model, peft_jax.nnx.adapter_state(trained.model))
    np.testing.assert_allclose(fresh.forward(ids, jit=False), out, atol=1e-5)


def test_adalora_and_dora_on_one_layer_is_a_typed_error():
    harness = NnxHarness()
    config = peft_jax.compose(CONFIG, peft_jax.LoraConfig(targets=["dense"], use_dora=True))
    with pytest.raises(errors.IncompatibleMethodsError, match="AdaLora and Dora"):
        harness.attach(config)
    assert not list(peft_jax.nnx.adapted_layers(harness.model))  # nothing changed
