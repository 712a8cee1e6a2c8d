"""Step options: accumulation, clipping, lr in metrics, mixed precision, remat, dropout keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.train import causal_lm_loss, make_train_step
from peft_jax.train.precision import Precision, cast_floating
from peft_jax.train.step import REMAT_POLICIES, StepState


def _loss(trainable, frozen, batch):
    h = jnp.tanh(batch["x"] @ (frozen["w"] + trainable["a"] @ trainable["b"]))
    return jnp.mean((h - batch["y"]) ** 2)


def _problem(batch_size=8):
    k = jax.random.split(jax.random.key(0), 5)
    trainable = {"a": jax.random.normal(k[0], (4, 2)), "b": jax.random.normal(k[1], (2, 3))}
    frozen = {"w": jax.random.normal(k[2], (4, 3))}
    batch = {"x": jax.random.normal(k[3], (batch_size, 4)), "y": jax.random.normal(k[4], (batch_size, 3))}
    return trainable, frozen, batch


def _run(steps=1, tx=None, **options):
    trainable, frozen, batch = _problem()
    tx = tx or optax.sgd(1.0)
    step = make_train_step(_loss, tx, **options)
    opt_state = step.init(trainable)
    history = []
    for _ in range(steps):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        history.append(jax.device_get(metrics))
    return trainable, opt_state, history


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulated_gradient_equals_full_batch_gradient(k):
    full, _, m_full = _run()
    acc, _, m_acc = _run(accumulate=k)
    assert _max_diff(full, acc) <= 1e-6  # sgd(1.0): the update *is* the gradient
    np.testing.assert_allclose(m_acc[0]["loss"], m_full[0]["loss"], rtol=1e-6)


def test_accumulation_is_one_scan_in_one_program():
    trainable, frozen, batch = _problem()
    step = make_train_step(_loss, optax.sgd(1.0), accumulate=4)
    text = step.lower(trainable, step.init(trainable), frozen, batch).as_text()
    assert "while" in text  # lax.scan lowers to one while loop


def test_batch_that_does_not_split_into_micro_batches_is_a_batch_error():
    trainable, frozen, batch = _problem(batch_size=6)
    step = make_train_step(_loss, optax.sgd(1.0), accumulate=4)
    with pytest.raises(errors.BatchError, match=r"leading dim 6.*accumulate=4"):
        step(trainable, step.init(trainable), frozen, batch)


def test_clipping_bounds_the_update_and_reports_the_raw_norm():
    trainable, frozen, batch = _problem()
    raw = optax.global_norm(jax.grad(_loss)(trainable, frozen, batch))
    clipped, _, m = _run(clip_norm=1e-3)
    update = jax.tree.map(jnp.subtract, clipped, trainable)
    np.testing.assert_allclose(optax.global_norm(update), 1e-3, rtol=1e-4)  # fp32 p1 - p0
    np.testing.assert_allclose(m[0]["grad_norm"], raw, rtol=1e-6)
    assert float(raw) > 1e-3


def test_learning_rate_schedule_lands_in_metrics():
    sched = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    _, state, m = _run(steps=3, tx=optax.sgd(sched), lr_schedule=sched)
    np.testing.assert_allclose([h["lr"] for h in m], [0.1, 0.075, 0.05], rtol=1e-6)
    assert isinstance(state, StepState) and int(state.count) == 3
    # An optimizer built with inject_hyperparams reports its learning rate without the option.
    _, _, m = _run(steps=3, tx=optax.inject_hyperparams(optax.sgd)(learning_rate=sched))
    np.testing.assert_allclose([h["lr"] for h in m], [0.1, 0.075, 0.05], rtol=1e-6)


def test_warmup_cosine_schedule_works_under_strict_promotion():
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10)
    _, _, m = _run(steps=3, tx=optax.adamw(sched), lr_schedule=sched)
    np.testing.assert_allclose([h["lr"] for h in m], [sched(i) for i in range(3)], rtol=1e-6)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_changes_memory_not_numbers(policy):
    plain, _, _ = _run(steps=2)
    remat, _, _ = _run(steps=2, remat=policy)
    assert _max_diff(plain, remat) <= 1e-6


def test_remat_is_in_the_program():
    trainable, frozen, batch = _problem()
    step = make_train_step(_loss, optax.sgd(1.0), remat="nothing_saveable")
    jaxpr = str(jax.make_jaxpr(step)(trainable, step.init(trainable), frozen, batch))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_dropout_key_is_folded_with_the_step_count():
    def loss(t, f, b):
        return jnp.sum(t["a"]) * 0.0, {"u": jax.random.uniform(b["dropout_rng"])}

    key = jax.random.key(7)
    trainable = {"a": jnp.ones(2)}
    step = make_train_step(loss, optax.sgd(0.1), has_aux=True, dropout_key=key)
    state = step.init(trainable)
    seen = []
    for _ in range(3):
        trainable, state, m = step(trainable, state, None, {"x": jnp.ones(2)})
        seen.append(float(m["u"]))
    expected = [float(jax.random.uniform(jax.random.fold_in(key, i))) for i in range(3)]
    np.testing.assert_allclose(seen, expected)
    assert len(set(seen)) == 3
    assert state.dropout_key is not None  # the stream is checkpointed with opt_state


def test_plain_optimizer_state_for_a_counting_step_is_a_state_error():
    trainable, frozen, batch = _problem()
    step = make_train_step(_loss, optax.sgd(0.1), dropout_key=jax.random.key(0))
    with pytest.raises(errors.StateError, match=r"step\.init"):
        step(trainable, optax.sgd(0.1).init(trainable), frozen, batch)


@pytest.mark.parametrize("bad, match", [
    ({"accumulate": 0}, "accumulate"), ({"clip_norm": -1.0}, "clip_norm"),
    ({"remat": "dots"}, "nothing_saveable"), ({"dropout_key": 3}, "PRNG key"),
    ({"acumulate": 2}, "valid options"),
])
def test_bad_options_are_config_errors(bad, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        make_train_step(_loss, optax.sgd(0.1), **bad)


def test_remat_policy_names_exist():
    for name in REMAT_POLICIES:
        assert callable(getattr(jax.checkpoint_policies, name))


# --- mixed precision on the reference decoder -----------------------------------------------------
CONFIG = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8)


def _decoder(dtype):
    model = Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=dtype)
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q_proj", "v_proj"], rank=2, alpha=4.0,
                                                   dropout=0.1), rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = peft_jax.nnx.split(model)
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    loss = peft_jax.nnx.make_loss(
        graphdef, lambda m, b: causal_lm_loss(m(b["input_ids"]).astype(jnp.float32), b["input_ids"]))
    return loss, trainable, frozen


def test_bf16_base_fp32_adapters_and_optimizer_state():
    batch = {"input_ids": jax.random.randint(jax.random.key(0), (4, 6), 0, CONFIG.vocab_size)}
    results = {}
    for name, dtype, precision in [("fp32", jnp.float32, None),
                                   ("bf16", jnp.bfloat16, Precision(compute_dtype=jnp.bfloat16))]:
        loss, trainable, frozen = _decoder(dtype)
        if precision is not None:
            frozen = cast_floating(frozen, jnp.bfloat16)
        step = make_train_step(loss, optax.adam(1e-2), precision=precision, accumulate=2,
                               clip_norm=1.0, dropout_key=jax.random.key(5), remat="dots_saveable")
        state = step.init(trainable)
        for _ in range(2):
            trainable, state, m = step(trainable, state, frozen, batch)
        results[name] = (trainable, float(m["loss"]))
        floats = [x for x in jax.tree.leaves((trainable, state.inner))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
        assert m["loss"].dtype == jnp.float32
        if precision is not None:
            kernels = [x for p, x in peft_jax.core.tree_items(frozen) if p.endswith("kernel")]
            assert kernels and all(x.dtype == jnp.bfloat16 for x in kernels)
    # bf16 compute tracks fp32 compute to bf16 accuracy.
    assert _max_diff(results["fp32"][0], results["bf16"][0]) < 5e-2
    assert abs(results["fp32"][1] - results["bf16"][1]) < 5e-2
