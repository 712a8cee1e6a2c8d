"""Bad HF PEFT adapter files and exports raise typed errors and write nothing."""

import json
import struct

import numpy as np
import pytest

from peft_jax import errors
from peft_jax.io import hf_peft
from peft_jax.io.frontends import AdapterParts
from peft_jax.methods.lora import Lora

KM = hf_peft.KeyMap(prefix="model.")
SITES = [("q", "linear", (Lora(rank=2, alpha=4.0),))]
STATE = {"q/default/lora_a": np.ones((3, 2), np.float32), "q/default/lora_b": np.ones((2, 4), np.float32)}
BASE = {"q/kernel": np.zeros((3, 4), np.float32)}


def _parts(sites=SITES, state=STATE):
    return AdapterParts("default", "Toy", tuple(sites), state, BASE)


def _import(d):
    return hf_peft.import_hf_peft(d, architecture="Toy", base=BASE, key_map=KM)


def _export(tmp_path):
    return hf_peft.export_hf_peft(_parts(), tmp_path / "a", key_map=KM)


def _edit_config(d, **fields):
    cfg = json.loads((d / hf_peft.HF_CONFIG).read_text())
    (d / hf_peft.HF_CONFIG).write_text(json.dumps({**cfg, **fields}))


@pytest.mark.parametrize("fields,named", [({"peft_type": "POLY"}, "POLY"),
                                          ({"layers_to_transform": [0]}, "layers_to_transform"),
                                          ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
                                          ({"bias": "all"}, "bias"),
                                          ({"frobnicate": 1}, "frobnicate")])
def test_unsupported_field_is_named(tmp_path, fields, named):
    d = _export(tmp_path)
    _edit_config(d, **fields)
    with pytest.raises(errors.InvalidConfigError, match=named):
        _import(d)


@pytest.mark.parametrize("content", ["truncated", "random", "huge_header"])
def test_bad_weights_file(tmp_path, content):
    d = _export(tmp_path)
    f = d / hf_peft.HF_WEIGHTS
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2],
                   "random": np.random.default_rng(0).bytes(256),
                   "huge_header": struct.pack("<Q", 2**60) + b"{}"}[content])
    with pytest.raises(errors.CheckpointError):
        _import(d)


def test_shape_mismatch_names_tensor(tmp_path):
    d = _export(tmp_path)
    _edit_config(d, r=3)
    with pytest.raises(errors.CheckpointError, match=r"model\.q\.lora_A"):
        _import(d)


def test_non_empty_dir_refused_and_untouched(tmp_path):
    d = _export(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(errors.CheckpointError, match="overwrite"):
        hf_peft.export_hf_peft(_parts(state={k: v * 2 for k, v in STATE.items()}), d, key_map=KM)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    hf_peft.export_hf_peft(_parts(state={k: v * 2 for k, v in STATE.items()}), d, key_map=KM, overwrite=True)
    _, again = _import(d)
    np.testing.assert_array_equal(again["q/default/lora_a"], STATE["q/default/lora_a"] * 2)


def test_unsupported_method_named(tmp_path):
    from peft_jax.methods import TrainBias

    with pytest.raises(errors.InvalidConfigError, match="TrainBias"):
        hf_peft.export_hf_peft(_parts([("q", "linear", (TrainBias(),))], {}), tmp_path / "b", key_map=KM)
    assert not (tmp_path / "b").exists()


def test_user_model_without_key_map():
    with pytest.raises(errors.PeftError, match="key_map="):
        hf_peft.for_architecture("MyModel")


def test_load_shape_mismatch_names_tensor(tmp_path):
    from flax import nnx

    d = _export(tmp_path)  # q: in 3, out 4
    model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)))

    class OneLayer:  # the documented hook: any object with to_hf / to_ours
        def to_hf(self, path):
            return path.replace("layers/0", "model.q")

        def to_ours(self, name):
            return name.replace("model.q", "layers/0")

    with pytest.raises(errors.CheckpointError, match=r"model\.q\.lora_A/B .* does not fit"):
        hf_peft.load_hf_peft(model, d, key_map=OneLayer())
    assert not hasattr(model.layers[0], "default")
