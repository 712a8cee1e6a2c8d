"""`peft_jax.save_adapter` / `load_adapter`: every method of the contract matrix round-trips.

Each case trains a few steps (so every trainable value, biases trained in place included, is off
its init), saves, loads into a freshly built base under another name and must give bitwise the
same outputs; the loaded state equals the saved one key for key. Then the failures: another
base (shapes, weights), a config the version does not know, damaged files, an occupied output
directory, each a typed error that leaves the model and the directory as they were.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_contract import CASES, TAP_CASES

import peft_jax
from frontends import TAP_ROLES, LinenHarness, NnxHarness, batch, train
from peft_jax import errors
from peft_jax.io import saving

ALL = {**{k: (v[0], False) for k, v in CASES.items()}, **{k: (v[0], True) for k, v in TAP_CASES.items()}}
LINEN = ("lora", "pissa", "bias_and_head", "vera", "compacter", "prompt_tuning", "mixed_layers")


def _trained(harness, config):
    harness.attach(config)
    train(harness, 3)
    harness.eval()
    return harness


def _state(model, name):
    return {k: np.asarray(v) for k, v in peft_jax.nnx.adapter_state(model, name).items()}


@pytest.mark.parametrize("case", sorted(ALL))
def test_nnx_round_trip_is_exact_under_another_name(case, tmp_path):
    config, taps = ALL[case]
    saved = _trained(NnxHarness(taps=taps), config)
    out = peft_jax.save_adapter(saved.model, tmp_path / "a")
    fresh = NnxHarness(taps=taps)
    peft_jax.load_adapter(fresh.model, out, name="again")
    fresh.eval()
    ids = batch(7)["ids"]
    np.testing.assert_array_equal(np.asarray(fresh.forward(ids, jit=True)), np.asarray(saved.forward(ids, jit=True)))
    before = peft_jax.io.frontends.nnx_parts(saved.model, "default").state
    after = peft_jax.io.frontends.nnx_parts(fresh.model, "again").state
    assert sorted(after) == sorted(k.replace("/default/", "/again/").replace("default/shared", "again/shared")
                                   for k in before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key.replace("default", "again")], value, err_msg=key)


@pytest.mark.parametrize("case", LINEN)
def test_linen_round_trip_is_exact(case, tmp_path):
    config, taps = ALL[case]
    saved = _trained(LinenHarness(taps=taps), config)
    out = peft_jax.save_adapter(saved.peft, tmp_path / "a", variables=saved.variables)
    fresh = LinenHarness(taps=taps)
    handle, variables = peft_jax.load_adapter(fresh.module, out, variables=fresh.variables,
                                              sample=(batch()["ids"],))
    ids = batch(7)["ids"]
    got = jax.jit(lambda v, x: handle.apply(v, x))(variables, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(saved.forward(ids, jit=True)))


def test_the_file_holds_what_trains_and_the_base_identity(tmp_path):
    saved = _trained(NnxHarness(), CASES["bias_and_head"][0])
    out = peft_jax.save_adapter(saved.model, tmp_path / "a")
    record, state = saving.read_native(out)
    trainable = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(peft_jax.nnx.split(saved.model)[1]))
    assert sum(v.size for v in state.values()) == trainable  # exactly what trains, nothing frozen
    assert record["base"]["architecture"] == "frontends.NnxNet"
    assert "dense/kernel" in record["base"]["tensors"] and "dense/bias" in record["base"]["unchecked"]
    assert {"peft_jax", "jax", "flax"} <= set(record["written_by"])


def _saved(tmp_path, case="lora"):
    return peft_jax.save_adapter(_trained(NnxHarness(), CASES[case][0]).model, tmp_path / "a")


def _unchanged(model):
    assert not list(peft_jax.nnx.adapted_layers(model)), "the failed load changed the model"


def test_another_base_shape_names_the_tensor(tmp_path):
    out = _saved(tmp_path)

    class Wider(NnxHarness.__init__.__globals__["NnxNet"]):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

    model = NnxHarness().model
    model.head = nnx.Linear(8, 4, rngs=nnx.Rngs(3))
    with pytest.raises(errors.CheckpointError, match=r"'head/bias' is float32\[3\], but here it is float32\[4\]"):
        peft_jax.load_adapter(model, out)
    _unchanged(model)
    with pytest.raises(errors.CheckpointError, match="saved on a 'frontends.NnxNet' model, not a"):
        peft_jax.load_adapter(Wider(nnx.Rngs(0)), out)


def test_other_weights_need_the_explicit_override(tmp_path):
    out = _saved(tmp_path)
    other = NnxHarness()
    other.model.dense.kernel[...] = other.model.dense.kernel[...] + 1.0
    with pytest.raises(errors.CheckpointError, match="'dense/kernel' has other weights.*allow_different_weights"):
        peft_jax.load_adapter(other.model, out)
    _unchanged(other.model)
    peft_jax.load_adapter(other.model, out, allow_different_weights=True)
    assert "default" in peft_jax.nnx.adapter_names(other.model)


def test_unknown_method_or_field_is_named(tmp_path):
    out = _saved(tmp_path)
    record = json.loads((out / saving.NATIVE_CONFIG).read_text())
    record["sites"][0]["methods"][0]["fields"]["lora_rank_boost"] = 2
    (out / saving.NATIVE_CONFIG).write_text(json.dumps(record))
    with pytest.raises(errors.InvalidConfigError, match="has no field 'lora_rank_boost'"):
        peft_jax.load_adapter(NnxHarness().model, out)
    record["sites"][0]["methods"][0] = {"type": "os.system", "fields": {}}
    (out / saving.NATIVE_CONFIG).write_text(json.dumps(record))
    with pytest.raises(errors.InvalidConfigError, match="'os.system' is not a peft_jax class"):
        peft_jax.load_adapter(NnxHarness().model, out)


@pytest.mark.parametrize("damage", ["truncate", "huge_header", "random_bytes", "wrong_shape", "missing_tensor"])
def test_damaged_weights_are_refused_before_anything_changes(tmp_path, damage):
    out = _saved(tmp_path)
    weights = out / saving.NATIVE_WEIGHTS
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "huge_header":
        weights.write_bytes((2 ** 62).to_bytes(8, "little") + data[8:])
    elif damage == "random_bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        state = peft_jax.io.read_tensors(weights)
        key = sorted(state)[0]
        if damage == "wrong_shape":
            state[key] = np.zeros((1, 1), np.float32)
        else:
            del state[key]
        peft_jax.io.write_tensors(weights, state)
    model = NnxHarness().model
    with pytest.raises(errors.CheckpointError, match="corrupt|shape|lacks tensor") as e:
        peft_jax.load_adapter(model, out)
    if damage in ("wrong_shape", "missing_tensor"):
        assert sorted(peft_jax.io.read_tensors(weights))[0] in str(e.value) or damage == "missing_tensor"
    _unchanged(model)


def test_an_occupied_directory_is_refused_and_kept(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    model = _trained(NnxHarness(), CASES["lora"][0]).model
    with pytest.raises(errors.CheckpointError, match="not empty; pass overwrite=True"):
        peft_jax.save_adapter(model, tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["notes.txt"]
    peft_jax.save_adapter(model, tmp_path / "a", overwrite=True)
    assert saving.has_native_adapter(tmp_path / "a")


def test_a_callable_in_a_method_is_named_when_saving(tmp_path):
    harness = NnxHarness(taps=True)
    harness.attach(peft_jax.llama_adapter(3, 1))
    peft_jax.save_adapter(harness.model, tmp_path / "ok")  # recipes with where= predicates still save
    with pytest.raises(errors.InvalidConfigError, match="is a callable"):
        peft_jax.to_dict(peft_jax.place(["dense"], peft_jax.Lora(rank=2)).__class__(
            lambda p, leaf: True, peft_jax.Lora(rank=2)))


def test_configs_round_trip_through_json():
    configs = [c for c, _ in ALL.values()] + [peft_jax.adapters("seq_bn", roles=TAP_ROLES)]
    encodable = 0
    for config in configs:
        try:
            d = peft_jax.to_dict(config)
        except errors.InvalidConfigError:
            continue  # recipes holding a predicate (where=) save through their sites instead
        assert peft_jax.from_dict(json.loads(json.dumps(d))) == config
        encodable += 1
    assert encodable >= len(CASES)
    assert jnp.asarray(1.0).dtype == jnp.float32
