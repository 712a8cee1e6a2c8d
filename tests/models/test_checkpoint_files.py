"""HF-layout directory loading: single file, shards, dtype casts, and typed errors."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from peft_jax import errors
from peft_jax.models import checkpoint_files as cf


def _write_dir(d, tensors, config=None):
    (d / "config.json").write_text(json.dumps(config or {"model_type": "bert"}))
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_single_file_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    t = {"a.weight": rng.normal(size=(5, 3)).astype(np.float32), "ids": np.arange(4)}
    config, got = cf.load_hf_dir(_write_dir(tmp_path, t))
    assert config == {"model_type": "bert"}
    np.testing.assert_array_equal(got["a.weight"], t["a.weight"])
    assert got["ids"].dtype == np.int64


@pytest.mark.parametrize("chunk", [None, 8, 48])  # 48 B = 3 rows of 4 fp32: 10 = 3+3+3+1
def test_bf16_cast_keeps_integers(tmp_path, monkeypatch, chunk):
    if chunk:  # force the row-chunked cast path
        monkeypatch.setattr(cf, "_CHUNK_BYTES", chunk)
    w = np.linspace(-1, 1, 40, dtype=np.float32).reshape(10, 4)
    _, got = cf.load_hf_dir(_write_dir(tmp_path, {"w": w, "ids": np.arange(3)}), "bfloat16")
    assert got["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["w"], w.astype(ml_dtypes.bfloat16))
    assert got["ids"].dtype == np.int64


def test_sharded_index(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, got = cf.load_hf_dir(tmp_path)
    assert sorted(got) == ["a", "b"]


def test_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.CheckpointError, match="model-00001-of-00002"):
        cf.load_hf_dir(tmp_path)


def test_no_directory(tmp_path):
    with pytest.raises(errors.CheckpointError, match="does not exist"):
        cf.load_hf_dir(tmp_path / "nope")


def test_no_config(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(errors.CheckpointError, match="no config.json.*model.safetensors"):
        cf.load_hf_dir(tmp_path)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(errors.CheckpointError, match="not valid JSON"):
        cf.read_config(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(errors.CheckpointError, match="safe_serialization"):
        cf.load_hf_dir(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_names_file(tmp_path, keep):
    d = _write_dir(tmp_path, {"w": np.ones((64, 64), np.float32), "v": np.ones(8, np.float32)})
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(errors.CheckpointError, match="model.safetensors.*truncated or corrupt"):
        cf.load_hf_dir(d)


def test_garbage_header(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(errors.CheckpointError, match="model.safetensors"):
        cf.load_hf_dir(tmp_path)


def test_bad_dtype():
    with pytest.raises(errors.CheckpointError, match="bf16"):
        cf.resolve_dtype("int8")


def test_tensor_specs_reads_headers(tmp_path):
    d = _write_dir(tmp_path, {"w": np.ones((4, 2), np.float32), "ids": np.arange(3)})
    assert cf.tensor_specs(d) == {"ids": ((3,), np.dtype(np.int64)),
                                  "w": ((4, 2), np.dtype(np.float32))}


def test_bf16_source_cast_to_fp32(tmp_path):
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    _, got = cf.load_hf_dir(_write_dir(tmp_path, {"w": w}), np.float32)
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], w.astype(np.float32))
    assert cf.resolve_dtype(np.dtype(ml_dtypes.bfloat16)) == ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_host_memory_under_twice_the_model(tmp_path, dtype):
    import tracemalloc

    tensors = {"emb": np.ones((6000, 1024), np.float32),  # 24 MB: cast in row chunks
               **{f"l{i}": np.ones((1024, 1024), np.float32) for i in range(4)}}
    d = _write_dir(tmp_path, tensors)
    del tensors
    tracemalloc.start()
    try:
        _, got = cf.load_hf_dir(d, dtype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sum(a.nbytes for a in got.values())
    assert peak < 2 * size, (peak / 2**20, size / 2**20)
