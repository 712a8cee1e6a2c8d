"""`peft-jax train` end to end on a tiny random BERT and a synthetic dataset (same code path as
the default run), plus bad input: typed errors, exit status 2, nothing written."""

import json
import re

import numpy as np
import pytest
from train import tiny

import peft_jax
from peft_jax import cli, io, models
from peft_jax.io import saving
from peft_jax.train.metrics import read_metrics

FAST = ["--max-length", "16", "--bucket", "16", "--batch-size", "8", "--eval-batch-size", "24",
        "--log-every", "2", "--lr", "3e-3", "--rank", "2", "--alpha", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.write_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny.write_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, data_dir):
    out = tmp_path_factory.mktemp("runs") / "run"
    config = out.parent / "run.json"
    config.write_text(json.dumps({"epochs": 2, "targets": ["query", "value"], "seed": 3}))
    rc = cli.main(["train", "--model", str(model_dir), "--data", str(data_dir), "--config",
                   str(config), "--steps", "8", "--eval-every", "4", "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_outputs_exist_and_are_well_formed(trained, capsys):
    assert sorted(p.name for p in trained.iterdir()) == [
        "adapter", "checkpoints", "metrics.jsonl", "metrics.png", "results.json"]
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["8"]  # the last one
    results = json.loads((trained / "results.json").read_text())
    for key in ("method", "trainable_params", "total_params", "trainable_percent", "test_accuracy",
                "majority_accuracy", "linear_probe_accuracy", "wall_seconds", "settings"):
        assert key in results, key
    assert results["method"] == "lora" and results["steps"] == 8  # --steps beat the file's epochs
    assert results["settings"]["seed"] == 3 and results["settings"]["rank"] == 2
    assert 0 < results["trainable_params"] < results["total_params"]
    assert results["trainable_percent"] == pytest.approx(
        100 * results["trainable_params"] / results["total_params"])
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["majority_accuracy"] == pytest.approx(0.5)
    assert (trained / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_jsonl(trained):
    records = read_metrics(trained / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    # lr follows the warmup-then-decay schedule; grad_norm is the pre-clip norm; epoch = step / 5
    assert all(r["grad_norm"] > 0 and 0 <= r["lr"] <= 3e-3 for r in train)
    assert [r["epoch"] for r in train] == [0.4, 0.8, 1.2, 1.6]
    assert train[-1]["lr"] < train[1]["lr"]  # decaying towards 0 after the warmup
    assert [r["step"] for r in evals] == [4, 8]
    results = json.loads((trained / "results.json").read_text())
    assert evals[-1]["eval_accuracy"] == results["val_accuracy"]  # periodic: validation
    assert results["num_val"] == 5 and results["num_train"] == 43  # 10% of 48, seeded


def test_adapter_files(trained, model_dir):
    """adapter/ holds peft_jax's files (which load back onto the base) and HF PEFT's."""
    record, params = saving.read_native(trained / "adapter")
    assert record["base_model"] == {"name_or_path": str(model_dir), "kwargs": {"num_labels": 2}}
    assert [m["type"] for site in record["sites"] for m in site["methods"]].count("peft_jax.methods.lora.Lora") == 4
    assert any(k.endswith("attention/self/query/default/lora_a") for k in params)
    results = json.loads((trained / "results.json").read_text())
    assert sum(v.size for v in params.values()) == results["trainable_params"]
    b = [v for k, v in params.items() if k.endswith("lora_b")]
    assert b and any(np.abs(v).max() > 0 for v in b)  # trained away from the zero init
    # The recipe's classifier mean-pools; transformers' BERT classifier pools through the pooler,
    # so HF PEFT would compute other logits: the HF files are left out (a notice says so).
    assert results["adapter_formats"] == ["peft_jax"]
    assert not (trained / "adapter" / "adapter_config.json").exists()
    loaded = io.load_any(models.load(str(model_dir), "float32", **record["base_model"]["kwargs"]),
                         trained / "adapter")
    again = peft_jax.nnx.adapter_state(loaded, "default")
    assert sorted(again) == sorted(k for k in params if "/trained_base/" not in k)


def test_prefix_cache_path(tmp_path, model_dir, data_dir, capsys):
    """Adapters on the top layer only: the frozen bottom layer is cached, same outputs."""
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data_dir), "--layers", "1",
            "--steps", "4", "--eval-every", "0", "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    assert "cached the frozen embeddings + layers 0..0" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["prefix_cache_depth"] == 1
    record, params = saving.read_native(out / "adapter")
    assert all("layer/0/" not in k for k in params)
    assert any("layer/1/attention/self/value" in k for k in params)
    assert {s["path"].split("/layer/")[1][0] for s in record["sites"] if "/layer/" in s["path"]} == {"1"}


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, capsys, model_dir, data_dir, trained):
    """A restart loop always passing --resume: a run killed before its first checkpoint (here: a
    killed run's leftover metrics, no checkpoints) starts again and ends as an unbroken run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    config = trained.parent / "run.json"
    argv = ["train", "--model", str(model_dir), "--data", str(data_dir), "--config", str(config),
            "--steps", "8", "--eval-every", "4", "--out", str(out), "--resume", *FAST]
    assert cli.main(argv) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    (_, want), (_, got) = saving.read_native(trained / "adapter"), saving.read_native(out / "adapter")
    assert sorted(want) == sorted(got) and all(np.array_equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [2, 4, 6, 8]


def _assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cfg.yaml"] == []


@pytest.mark.parametrize("flag, value, match", [
    ("--model", "no-such-model", "known names: .*minilm-l6"),
    ("--data", "imdb", r"known datasets: \['fine-foods'\]"),
    ("--method", "adapter-of-my-dreams", r"known methods: \[.*'prefix'"),
    ("--targets", "nonexistent_layer", "matched none"),
    ("--rank", "0", "rank"),
    ("--layers", "x-y", "layers must be a layer spec"),
    ("--layers", "5", "the model has 2 layers"),
    ("--mesh", "data=3", r"MeshError: mesh \{'data': 3\} needs 3 devices but 8 are available"),
    ("--mesh", "rows=2", r"MeshError: .*unknown or missing axes \['rows'\]"),
    ("--mesh", "data=8 --batch-size 12", r"BatchError: --batch-size 12 does not divide .* 8 ways"),
])
def test_bad_input_writes_nothing(tmp_path, capsys, model_dir, data_dir, flag, value, match):
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            flag, *(value.split() if value is not None else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-jax train: error: ")
    assert re.search(match, err), err
    _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("text, match", [
    ("rank: [1", "not valid YAML"),
    ("bogus_key: 1", "unknown setting 'bogus_key'"),
    ("- 1\n- 2", "mapping"),
    ("rank: -3", "rank"),
])
def test_bad_config_file_writes_nothing(tmp_path, capsys, text, match):
    (tmp_path / "cfg.yaml").write_text(text)
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    _assert_nothing_written(tmp_path, out)


def test_missing_config_file_and_non_empty_out(tmp_path, capsys, model_dir, data_dir):
    assert cli.main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    argv = ["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out)]
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["results.json"]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "3", "--epochs", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])
