"""Adapter export: safetensors keyed by "/"-joined paths, JSON config, atomic replacement."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors, io
from peft_jax.io import adapter as adapter_module


def _model():
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    cfg = peft_jax.LoraConfig(targets=["0"], rank=2, alpha=4, modules_to_save=["1"])
    peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(2))
    return model, cfg


def test_round_trip_through_trainable_state(tmp_path):
    model, cfg = _model()
    _, trainable, _ = peft_jax.nnx.split(model)
    trainable = jax_tree_scale(trainable, 3.0)
    config = io.lora_config_dict(cfg, base_model_name_or_path="toy")
    out = io.write_adapter_files(tmp_path / "adapter", trainable, config)
    params, loaded_config = io.read_adapter_files(out)
    assert set(params) == {"layers/0/default/lora_a", "layers/0/default/lora_b",
                           "layers/1/default/kernel", "layers/1/default/bias"}
    assert loaded_config["r"] == 2 and loaded_config["lora_alpha"] == 4
    assert loaded_config["target_modules"] == ["0"] and loaded_config["modules_to_save"] == ["1"]
    restored = io.restore_params(trainable, params)
    for (p, a), (q, b) in zip(io.flatten_params(trainable).items(),
                              io.flatten_params(restored).items()):
        assert p == q
        np.testing.assert_array_equal(a, b)


def jax_tree_scale(tree, factor):
    return jax.tree.map(lambda x: x * factor + 1, tree)


def test_restore_rejects_other_shapes_and_paths(tmp_path):
    template = {"a": jnp.zeros((2, 3))}
    with pytest.raises(errors.CheckpointError, match="missing.*unexpected"):
        io.restore_params(template, {"b": np.zeros((2, 3), np.float32)})
    with pytest.raises(errors.CheckpointError, match="rank"):
        io.restore_params(template, {"a": np.zeros((2, 4), np.float32)})


def test_save_replaces_atomically_and_failure_keeps_old(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    io.write_adapter_files(out, {"w": np.ones(3, np.float32)}, {"v": 1})
    io.write_adapter_files(out, {"w": np.full(3, 2.0, np.float32)}, {"v": 2})
    params, config = io.read_adapter_files(out)
    assert config == {"v": 2} and params["w"].tolist() == [2.0, 2.0, 2.0]

    import safetensors.numpy  # noqa: PLC0415

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        io.write_adapter_files(out, {"w": np.zeros(3, np.float32)}, {"v": 3})
    params, config = io.read_adapter_files(out)
    assert config == {"v": 2} and params["w"].tolist() == [2.0, 2.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp left behind


def test_bad_inputs(tmp_path):
    with pytest.raises(errors.InvalidConfigError, match="JSON"):
        io.write_adapter_files(tmp_path / "a", {"w": np.zeros(1)}, {"f": object()})
    assert not (tmp_path / "a").exists()
    with pytest.raises(errors.InvalidConfigError, match="not an array"):
        io.flatten_params({"w": "text"})
    with pytest.raises(errors.CheckpointError, match="adapter_model.safetensors"):
        io.read_adapter_files(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / io.ADAPTER_WEIGHTS).write_bytes(b"garbage")
    (tmp_path / "broken" / io.ADAPTER_CONFIG).write_text(json.dumps({}))
    with pytest.raises(errors.CheckpointError, match="safetensors"):
        io.read_adapter_files(tmp_path / "broken")
    cfg = peft_jax.LoraConfig(targets=lambda path, leaf: True)
    with pytest.raises(errors.InvalidConfigError, match="regex string or a list"):
        adapter_module.lora_config_dict(cfg)


def test_written_files_get_ordinary_modes(tmp_path):
    out = io.write_adapter_files(tmp_path / "adapter", {"w": np.ones(2, np.float32)}, {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
    path = io.write_json_atomic(tmp_path / "r.json", {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_write_json_atomic(tmp_path):
    path = io.write_json_atomic(tmp_path / "r.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        io.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
