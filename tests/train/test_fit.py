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
