"""Early stopping: the rule, its replay after a restart, the fit loop stopping and saving there,
and `peft-jax train --early-stopping` (stops, records it, a resumed stopped run trains no more)."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train import tiny

from peft_jax import cli, errors
from peft_jax.train import make_train_step
from peft_jax.train.checkpoint import Checkpointer
from peft_jax.train.early_stopping import EarlyStopping
from peft_jax.train.fit import fit
from peft_jax.train.metrics import read_metrics


def test_patience_min_delta_and_mode():
    rule = EarlyStopping(patience=2, min_delta=0.05)
    assert [rule(s, {"loss": v}) for s, v in enumerate([1.0, 0.9, 0.88, 0.87])] == [False, False, False, True]
    assert (rule.best_step, rule.stopped_at) == (1, 3)  # 0.88 and 0.87 are within min_delta of 0.9
    up = EarlyStopping(patience=1, metric="accuracy", mode="max")
    assert [up(s, {"accuracy": v}) for s, v in enumerate([0.5, 0.6, 0.6])] == [False, False, True]


def test_replay_rebuilds_the_state_from_the_metric_records():
    records = [{"step": 5, "loss": 1.0}, {"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.6},
               {"step": 30, "eval_loss": 0.7}]
    assert not EarlyStopping(patience=2).replay(records, until=20)
    rule = EarlyStopping(patience=2)
    assert rule.replay(records, until=30) and rule.stopped_at == 30 and rule.best_step == 10


def test_bad_settings_are_typed_errors():
    with pytest.raises(errors.InvalidConfigError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(errors.InvalidConfigError, match="does not report"):
        EarlyStopping(patience=1, metric="f1")(1, {"loss": 1.0})
    assert cli.main(["train", "--early-stopping", "2", "--val-fraction", "0"]) == 2


def test_fit_stops_at_the_evaluation_and_checkpoints_there(tmp_path):
    def loss(trainable, frozen, batch):
        return jnp.mean((batch["x"] * trainable["w"] - 1.0) ** 2), {}

    tx = optax.sgd(0.1)
    step = make_train_step(loss, tx, has_aux=True)
    trainable = {"w": jnp.zeros((), jnp.float32)}
    batches = ({"x": np.ones((4,), np.float32)} for _ in range(100))
    val = iter([0.9, 0.8, 0.85, 0.86, 0.1])  # no improvement at steps 6 and 8: stop at 8
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), fingerprint={"run": 1})
    result = fit(step, trainable, tx.init(trainable), {}, batches, num_steps=50, log=None,
                 evaluate=lambda _: {"loss": next(val)}, eval_every=2, checkpointer=checkpointer,
                 save_every=5, should_stop=EarlyStopping(patience=2))
    assert result.step == 8 and {"step": 8, "stopped_early": True} in result.history
    assert max(r["step"] for r in result.history) == 8
    assert [r["step"] for r in result.history if "eval_loss" in r] == [2, 4, 6, 8]
    assert checkpointer.latest_step() == 8  # the stop is saved, though 8 is no multiple of 5
    checkpointer.close()


FAST = ["--max-length", "16", "--bucket", "16", "--batch-size", "8", "--eval-batch-size", "24",
        "--rank", "2", "--alpha", "4", "--targets", "query,value"]


def test_cli_stops_early_and_a_resumed_stopped_run_trains_no_more(tmp_path, capsys):
    model, data = tiny.write_model(tmp_path / "model"), tiny.write_data(tmp_path / "data", n_train=96)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(data), "--steps", "40", "--lr", "1.0",
            "--eval-every", "1", "--early-stopping", "1", "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    stop = results["stopped_early_at"]
    assert stop is not None and results["steps"] == stop < 40 and "stopped early at step" in capsys.readouterr().out
    losses = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert len(losses) == stop and losses[-1] >= min(losses[:-1])  # patience 1: the last did not improve
    adapter = (out / "adapter" / "peft_jax_adapter.safetensors").read_bytes()
    assert cli.main([*argv, "--resume"]) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["steps"] == stop
    assert (out / "adapter" / "peft_jax_adapter.safetensors").read_bytes() == adapter
