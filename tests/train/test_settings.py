"""Run settings: defaults < config file < flags, validation, JSON / YAML files."""

import json
import re

import pytest

from peft_jax import errors
from peft_jax.train.layers import parse_layers, restrict_to_layers
from peft_jax.train.settings import TARGET_PRESETS, TrainSettings, load_config_file


def test_precedence_and_dash_keys():
    s = TrainSettings.from_sources({"rank": 4, "batch-size": 8, "lr": 1},
                                   {"rank": 16, "lr": None})
    assert (s.rank, s.batch_size, s.lr) == (16, 8, 1.0)
    assert TrainSettings().model == "minilm-l6" and TrainSettings().data == "fine-foods"


def test_targets_forms():
    every = dict(layers="all")
    assert TrainSettings(targets="query, value", **every).target_selector() == ["query", "value"]
    assert TrainSettings(targets="all-linear", **every).target_selector() == \
        TARGET_PRESETS["all-linear"]
    regex = r".*layer/[3-5]/.*query"
    assert TrainSettings(targets=regex, layers=None).target_selector() == regex
    s = TrainSettings.from_sources({"targets": ["query", "key"], "layers": None})
    assert s.target_selector() == ["query", "key"]


def test_default_targets_top_three_layers():
    selector = TrainSettings().target_selector(num_layers=6)
    paths = [f"bert/encoder/layer/{i}/{m}" for i in range(6) for m in (
        "attention/self/query", "attention/self/key", "attention/self/value",
        "attention/output/dense", "intermediate/dense", "output/dense")]
    hits = [p for p in paths if re.fullmatch(selector, p)]
    assert len(hits) == 18 and all(f"layer/{i}/" in " ".join(hits) for i in (3, 4, 5))
    assert not any(re.fullmatch(selector, p) for p in ["bert/pooler/dense", "classifier"])
    assert TrainSettings().target_selector(num_layers=2) == TrainSettings(
        layers="0-1").target_selector(num_layers=2)


@pytest.mark.parametrize("spec, n, want", [
    ("all", 6, None), (None, 6, None), ("top:2", 6, [4, 5]), ("top:9", 6, [0, 1, 2, 3, 4, 5]),
    ("1,3-4", 6, [1, 3, 4]), ("top:2", None, None),
])
def test_parse_layers(spec, n, want):
    assert parse_layers(spec, n) == want


@pytest.mark.parametrize("spec, match", [
    ("top:0", "top:K"), ("top:x", "top:K"), ("a", "layer spec"), ("-1", "layer spec"),
    ("2-9", "has 6 layers"),
])
def test_bad_layers(spec, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        parse_layers(spec, 6)


def test_layers_restrict_a_regex_too():
    selector = restrict_to_layers(r".*(query|value)", [1])
    assert re.fullmatch(selector, "bert/encoder/layer/1/attention/self/value")
    assert not re.fullmatch(selector, "bert/encoder/layer/2/attention/self/value")
    assert not re.fullmatch(selector, "bert/encoder/layer/1/attention/self/key")


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
    ({"layers": "x"}, "layer spec"),
])
def test_bad_values(values, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        TrainSettings.from_sources(values)


def test_unknown_method_lists_known():
    with pytest.raises(errors.UnknownNameError, match="known methods: .*'lora'.*'prefix'"):
        TrainSettings(method="adapter-of-my-dreams")
    with pytest.raises(errors.InvalidConfigError, match="method_options"):
        TrainSettings(method="vera", method_options=[("rank", 4)])


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
