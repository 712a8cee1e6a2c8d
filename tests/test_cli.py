"""`peft-jax train` end to end on a tiny random BERT and a synthetic dataset (same code path as
the default run), plus bad input: typed errors, exit status 2, nothing written."""

import json
import re

import numpy as np
import pytest
from train import tiny

from peft_jax import cli, io
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
    assert [r["step"] for r in evals] == [4, 8]
    results = json.loads((trained / "results.json").read_text())
    assert evals[-1]["eval_accuracy"] == results["test_accuracy"]


def test_adapter_files(trained):
    params, config = io.read_adapter_files(trained / "adapter")
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["modules_to_save"] == ["classifier"]
    assert any(k.endswith("attention/self/query/default/lora_a") for k in params)
    assert "classifier/default/kernel" in params
    results = json.loads((trained / "results.json").read_text())
    assert sum(v.size for v in params.values()) == results["trainable_params"]
    b = [v for k, v in params.items() if k.endswith("lora_b")]
    assert b and any(np.abs(v).max() > 0 for v in b)  # trained away from the zero init


def test_prefix_cache_path(tmp_path, model_dir, data_dir, capsys):
    """Adapters on the top layer only: the frozen bottom layer is cached, same outputs."""
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data_dir), "--layers", "1",
            "--steps", "4", "--eval-every", "0", "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    assert "cached the frozen embeddings + layers 0..0" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["prefix_cache_depth"] == 1
    params, config = io.read_adapter_files(out / "adapter")
    assert all("layer/0/" not in k for k in params)
    assert any("layer/1/attention/self/value" in k for k in params)
    assert "layer/(?:1)/" in config["target_modules"]


def _assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cfg.yaml"] == []


@pytest.mark.parametrize("flag, value, match", [
    ("--model", "no-such-model", "known names: .*minilm-l6"),
    ("--data", "imdb", r"known datasets: \['fine-foods'\]"),
    ("--method", "prefix", r"known methods: \['lora'\]"),
    ("--targets", "nonexistent_layer", "matched none"),
    ("--rank", "0", "rank"),
    ("--layers", "x-y", "layers must be a layer spec"),
    ("--layers", "5", "the model has 2 layers"),
    ("--mesh", "data=3", r"MeshError: mesh \{'data': 3\} needs 3 devices but 8 are available"),
    ("--mesh", "rows=2", r"MeshError: .*unknown or missing axes \['rows'\]"),
    ("--mesh", "data=8 --batch-size 12", r"BatchError: --batch-size 12 does not divide .* 8 ways"),
    ("--resume", None, r"ResumeError: .*checkpoints does not exist, so there is nothing to resume"),
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
