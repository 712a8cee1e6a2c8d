"""Run settings: defaults < config file < flags, validation, JSON / YAML files."""

import json

import pytest

from peft_jax import errors
from peft_jax.train.settings import TARGET_PRESETS, TrainSettings, load_config_file


def test_precedence_and_dash_keys():
    s = TrainSettings.from_sources({"rank": 4, "batch-size": 8, "lr": 1},
                                   {"rank": 16, "lr": None})
    assert (s.rank, s.batch_size, s.lr) == (16, 8, 1.0)
    assert TrainSettings().model == "minilm-l6" and TrainSettings().data == "fine-foods"


def test_targets_forms():
    assert TrainSettings(targets="query, value").target_selector() == ["query", "value"]
    assert TrainSettings(targets="all-linear").target_selector() == TARGET_PRESETS["all-linear"]
    regex = r".*layer/[3-5]/.*query"
    assert TrainSettings(targets=regex).target_selector() == regex
    s = TrainSettings.from_sources({"targets": ["query", "key"]})
    assert s.target_selector() == ["query", "key"]


@pytest.mark.parametrize("values, match", [
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"lr": -1.0}, "lr"),
    ({"epochs": 0}, "epochs"),
    ({"steps": 0}, "steps"),
    ({"warmup": 1.5}, "warmup"),
    ({"head_init": "zeros"}, "head_init"),
    ({"bogus": 1}, "unknown setting 'bogus'.*known settings"),
    ({"targets": [1, 2]}, "list of strings"),
    ({"model_dropout": "yes"}, "true or false"),
])
def test_bad_values(values, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        TrainSettings.from_sources(values)


def test_unknown_method_lists_known():
    with pytest.raises(errors.UnknownNameError, match="lora"):
        TrainSettings(method="prefix")


def test_config_files(tmp_path):
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"rank": 4, "targets": ["query"]}))
    assert load_config_file(j) == {"rank": 4, "targets": ["query"]}
    y = tmp_path / "run.yaml"
    y.write_text("rank: 4\nlr: 5.0e-4\ntargets: [query, value]\n")
    assert TrainSettings.from_sources(load_config_file(y)).lr == 5e-4
    (tmp_path / "empty.yml").write_text("")
    assert load_config_file(tmp_path / "empty.yml") == {}
    bad = [("missing.json", None, "does not exist"), ("bad.json", "{rank: 4", "not valid JSON"),
           ("bad.yaml", "rank: [1", "not valid YAML"), ("list.json", "[1, 2]", "mapping"),
           ("run.toml", "rank = 4", "must end in")]
    for name, text, match in bad:
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(errors.InvalidConfigError, match=match):
            load_config_file(tmp_path / name)
