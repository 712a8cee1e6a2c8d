"""The fit loop: progress, metrics records, periodic evaluation, non-finite loss."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax import errors
from peft_jax.train import make_train_step
from peft_jax.train.fit import count_tokens, fit
from peft_jax.train.metrics import MetricsLog, read_metrics


def _problem(lr=0.1):
    def loss(trainable, frozen, batch):
        pred = batch["x"] @ trainable["w"] + frozen["b"]
        return jnp.mean((pred - batch["y"]) ** 2), {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

    tx = optax.sgd(lr)
    step = make_train_step(loss, tx, has_aux=True)
    trainable = {"w": jnp.zeros((3,), jnp.float32)}
    return step, tx, trainable, {"b": jnp.float32(0.5)}


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    w = np.array([1.0, -2.0, 0.5], np.float32)
    for _ in range(n):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        yield {"x": x, "y": (x @ w + 0.5).astype(np.float32),
               "attention_mask": np.ones((8, 2), np.int32)}


def test_fit_trains_logs_and_records(tmp_path):
    step, tx, trainable, frozen = _problem()
    lines, evals = [], []

    def evaluate(params):
        evals.append(1)
        return {"w0": params["w"][0]}

    with MetricsLog(tmp_path / "m.jsonl") as log:
        result = fit(step, trainable, tx.init(trainable), frozen, _batches(100), num_steps=30,
                     evaluate=evaluate, eval_every=10, log_every=5, log=lines.append,
                     metrics_log=log)
    assert result.step == 30 and len(evals) == 3  # steps 10, 20, 30: no extra final eval
    train = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < 0.1 * train[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and "mae" in r for r in train)
    assert result.last_eval["w0"] == pytest.approx(1.0, abs=0.1)
    assert "tok/s" in lines[0] and lines[0].startswith("step 5/30")
    assert read_metrics(tmp_path / "m.jsonl") == result.history
    assert result.train_seconds > 0


def test_fit_stops_when_batches_end_and_evaluates_last():
    step, tx, trainable, frozen = _problem()
    result = fit(step, trainable, tx.init(trainable), frozen, _batches(7), num_steps=None,
                 evaluate=lambda p: {"one": 1.0}, eval_every=0, log_every=5, log=None)
    assert result.step == 7
    assert [r["step"] for r in result.history if "loss" in r] == [5, 7]
    assert result.history[-1]["eval_one"] == 1.0 and result.last_eval == {"one": 1.0}


def test_non_finite_loss_raises_and_keeps_log(tmp_path):
    step, tx, trainable, frozen = _problem()

    def poisoned():
        for i, batch in enumerate(_batches(20)):
            if i == 6:
                batch["y"] = batch["y"] * np.float32(np.nan)
            yield batch

    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log, pytest.raises(errors.NonFiniteLossError, match="step 7.*--lr"):
        fit(step, trainable, tx.init(trainable), frozen, poisoned(), num_steps=20, log_every=5,
            log=None, metrics_log=log)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [5] and math.isfinite(records[0]["loss"])


def test_rng_adds_a_fresh_dropout_key_per_step():
    seen = []

    def step(trainable, opt_state, frozen, batch):
        seen.append(np.asarray(jax.random.key_data(batch["dropout_rng"])).tobytes())
        return trainable, opt_state, {"loss": jnp.float32(1.0)}

    fit(step, {}, {}, {}, ({"x": np.zeros(2)} for _ in range(3)), log=None,
        rng=jax.random.key(0))
    assert len(set(seen)) == 3


def test_bad_arguments():
    step, tx, trainable, frozen = _problem()
    with pytest.raises(errors.InvalidConfigError):
        fit(step, trainable, tx.init(trainable), frozen, [], num_steps=-1)
    with pytest.raises(errors.InvalidConfigError):
        fit(step, trainable, tx.init(trainable), frozen, [], log_every=0)


def test_count_tokens():
    assert count_tokens({"attention_mask": np.array([[1, 1, 0]])}) == 2
    assert count_tokens({"input_ids": np.zeros((2, 5))}) == 10
    assert count_tokens({"x": np.zeros((4, 3))}) == 4


def _bucketed(position=None):
    from peft_jax.data import DataPosition  # noqa: PLC0415
    from peft_jax.train.buckets import LengthBucketedBatches  # noqa: PLC0415

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    arrays = {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.5).astype(np.float32),
              "attention_mask": np.ones((40, 4), np.int32)}
    return LengthBucketedBatches(arrays, 8, seed=3, bucket=4, position=position or DataPosition())


def _noisy_problem():
    """Adam + a loss that reads the per-step dropout key: resuming must restore all of it."""
    def loss(trainable, frozen, batch):
        noise = jax.random.normal(batch["dropout_rng"], batch["y"].shape) * 0.1
        pred = batch["x"] @ trainable["w"] + frozen["b"]
        return jnp.mean((pred - batch["y"] - noise) ** 2)

    tx = optax.adam(0.05)
    return make_train_step(loss, tx), tx, {"w": jnp.zeros((3,), jnp.float32)}, {"b": jnp.float32(0.5)}


def test_fit_checkpoints_and_resumes_bitwise(tmp_path):
    from peft_jax.data import DataPosition  # noqa: PLC0415
    from peft_jax.train import Checkpointer, restore_training_state  # noqa: PLC0415

    step, tx, trainable, frozen = _noisy_problem()
    fresh = lambda: jax.tree.map(jnp.copy, trainable)  # noqa: E731 (steps donate their inputs)
    rng = jax.random.key(9)
    straight = fit(step, fresh(), tx.init(trainable), frozen, _bucketed(), num_steps=12,
                   log=None, rng=rng)

    ckpt = Checkpointer(str(tmp_path), fingerprint={"problem": "noisy"}, keep=2)
    fit(step, fresh(), tx.init(trainable), frozen, _bucketed(), num_steps=7, log=None, rng=rng,
        checkpointer=ckpt, save_every=3)
    assert ckpt.all_steps() == [6, 7]  # every 3 and the last, keeping 2
    state = restore_training_state(ckpt, trainable, tx.init(trainable), rng=jax.random.key(0))
    assert state.step == 7 and state.data_position == {"epoch": 1, "index": 2}  # 5 batches/epoch
    assert np.array_equal(jax.random.key_data(state.rng), jax.random.key_data(rng))
    resumed = fit(step, state.trainable, state.opt_state, frozen,
                  _bucketed(DataPosition.from_dict(state.data_position)), num_steps=5,
                  start_step=state.step, log=None, rng=state.rng)
    assert resumed.step == 12
    assert np.array_equal(np.asarray(straight.trainable["w"]), np.asarray(resumed.trainable["w"]))


def test_non_finite_loss_leaves_the_last_good_checkpoint(tmp_path):
    from peft_jax.train import Checkpointer, restore_training_state  # noqa: PLC0415

    step, tx, trainable, frozen = _problem()
    fresh = lambda: jax.tree.map(jnp.copy, trainable)  # noqa: E731 (steps donate their inputs)

    def poisoned():
        for i, batch in enumerate(_batches(20)):
            if i == 6:
                batch["y"] = batch["y"] * np.float32(np.nan)
            yield batch

    ckpt = Checkpointer(str(tmp_path), fingerprint={}, keep=5)
    good = fit(step, fresh(), tx.init(trainable), frozen, _batches(4), num_steps=4, log=None)
    with pytest.raises(errors.NonFiniteLossError):
        fit(step, fresh(), tx.init(trainable), frozen, poisoned(), num_steps=20, log=None,
            checkpointer=ckpt, save_every=2)
    assert ckpt.all_steps() == [2, 4, 6]  # step 7 diverged and was not saved
    state = restore_training_state(ckpt, trainable, tx.init(trainable), step=4)
    assert np.array_equal(np.asarray(state.trainable["w"]), np.asarray(good.trainable["w"]))
    assert state.data_position is None  # a generator has no position to save


def test_resume_with_a_different_rng_setting_is_refused(tmp_path):
    from peft_jax.train import Checkpointer, restore_training_state  # noqa: PLC0415

    step, tx, trainable, frozen = _problem()
    ckpt = Checkpointer(str(tmp_path), fingerprint={}, keep=1)
    fit(step, trainable, tx.init(trainable), frozen, _batches(2), log=None, checkpointer=ckpt)
    with pytest.raises(errors.ResumeError, match="without an RNG key"):
        restore_training_state(ckpt, trainable, tx.init(trainable), rng=jax.random.key(0))
    with pytest.raises(errors.InvalidConfigError, match="needs a checkpointer"):
        fit(step, trainable, tx.init(trainable), frozen, [], save_every=2)


def test_progress_bar_on_a_terminal_and_log_lines_above_it(capsys):
    step, tx, trainable, frozen = _problem()
    fit(step, trainable, tx.init(trainable), frozen, _batches(6), num_steps=6, log_every=3,
        log=print, progress=True)
    out = capsys.readouterr().out
    assert "\r\033[K[" in out and "6/6 | loss " in out and "tok/s" in out
    assert out.endswith("\n")
    lines = [line.split("\r")[-1] for line in out.split("\n")]
    assert any(line.startswith("\033[Kstep 3/6 | ") or line.startswith("step 3/6 | ")
               for line in lines), lines  # log lines are printed above the bar, whole


def test_no_progress_bar_off_a_terminal(capsys):
    step, tx, trainable, frozen = _problem()
    fit(step, trainable, tx.init(trainable), frozen, _batches(4), num_steps=4, log_every=2,
        log=print)  # pytest's captured stdout is no terminal
    out = capsys.readouterr().out
    assert "\r" not in out and out.count("\n") == 2
