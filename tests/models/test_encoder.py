"""BERT-family encoder: structure, masking, dropout, dtypes, loading and its typed errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from peft_jax import errors
from peft_jax.models import encoder as enc

TINY = enc.EncoderConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=32, max_position_embeddings=40)


def _paths(model):
    return {"/".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Variable)}


def _hf_tensors(model, prefix=""):
    """Our params under HF names, torch layout (the inverse of the loader's mapping)."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            parts = [str(p) for p in path]
            leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(parts[-1],
                                                                                       parts[-1])
            value = np.asarray(var.get_value())
            out[prefix + ".".join(parts[:-1] + [leaf])] = value.T if parts[-1] == "kernel" else value
    return out


def _write(d, config: enc.EncoderConfig, tensors):
    hf = dataclasses.asdict(config)
    (d / "config.json").write_text(json.dumps(hf))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(d / "model.safetensors"))
    return d


def _batch(rng, b=3, t=7, vocab=64, pad=0):
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    lengths = rng.integers(2, t + 1, size=b)
    lengths[0] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def test_hf_mirroring_paths():
    paths = _paths(enc.Encoder(TINY, rngs=nnx.Rngs(0)))
    for p in ["embeddings/word_embeddings/embedding", "embeddings/LayerNorm/scale",
              "encoder/layer/0/attention/self/query/kernel",
              "encoder/layer/1/attention/self/value/bias",
              "encoder/layer/0/attention/output/dense/kernel",
              "encoder/layer/0/intermediate/dense/kernel",
              "encoder/layer/0/output/dense/kernel", "pooler/dense/kernel"]:
        assert p in paths, p
    clf = enc.EncoderForSequenceClassification(TINY, num_labels=2, rngs=nnx.Rngs(0))
    assert "bert/encoder/layer/0/attention/self/query/kernel" in _paths(clf)
    assert "classifier/kernel" in _paths(clf)
    assert isinstance(clf.bert.encoder.layer[0].attention.self.query, nnx.Linear)


def test_padding_does_not_change_real_tokens():
    model = enc.Encoder(TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids, mask = _batch(rng)
    full = model(ids, mask).last_hidden_state
    longer_ids = jnp.pad(ids, ((0, 0), (0, 5)))
    longer_mask = jnp.pad(mask, ((0, 0), (0, 5)))
    longer = model(longer_ids, longer_mask).last_hidden_state[:, :7]
    m = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(longer)[m], np.asarray(full)[m], atol=1e-5)
    e1 = enc.sentence_embedding(model, ids, mask)
    e2 = enc.sentence_embedding(model, longer_ids, longer_mask)
    np.testing.assert_allclose(e1, e2, atol=1e-5)


def test_roberta_position_ids_skip_padding():
    cfg = dataclasses.replace(TINY, model_type="roberta", pad_token_id=1)
    model = enc.Encoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[5, 6, 7, 1, 1]])
    assert model.position_ids(ids).tolist() == [[2, 3, 4, 1, 1]]


def test_dropout_only_with_key():
    model = enc.EncoderForSequenceClassification(TINY, num_labels=2, rngs=nnx.Rngs(0))
    ids, mask = _batch(np.random.default_rng(1))
    a, b = model(ids, mask), model(ids, mask)
    np.testing.assert_array_equal(a, b)
    k = jax.random.key(0)
    c = model(ids, mask, dropout_rng=k)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(c, model(ids, mask, dropout_rng=k))


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_classifier_jits_and_grads(pooling):
    model = enc.EncoderForSequenceClassification(TINY, num_labels=3, pooling=pooling,
                                                 rngs=nnx.Rngs(0))
    ids, mask = _batch(np.random.default_rng(2))

    @nnx.jit
    def loss(m):
        return jnp.mean(m(ids, mask) ** 2)

    grads = nnx.grad(lambda m: loss(m))(model)
    assert np.isfinite(float(loss(model)))
    assert float(jnp.abs(grads["classifier"]["kernel"][...]).sum()) > 0


def test_bf16_params_run_under_strict_promotion():
    model = enc.EncoderForSequenceClassification(TINY, num_labels=2, param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0))
    ids, mask = _batch(np.random.default_rng(3))
    assert model(ids, mask).dtype == jnp.bfloat16


def test_pool_cls_and_bad_kind():
    h = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(enc.pool(h, None, "cls"), h[:, 0])
    with pytest.raises(errors.InvalidConfigError):
        enc.pool(h, None, "max")


# --- config -----------------------------------------------------------------------------------
def test_from_hf_unsupported_model_type_lists_supported():
    with pytest.raises(errors.UnsupportedArchitectureError, match="'gpt2'.*bert.*roberta"):
        enc.EncoderConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_from_hf_relative_positions_unsupported():
    hf = dataclasses.asdict(TINY) | {"position_embedding_type": "relative_key"}
    with pytest.raises(errors.UnsupportedArchitectureError, match="relative_key"):
        enc.EncoderConfig.from_hf(hf)


def test_from_hf_missing_field_and_bad_heads():
    with pytest.raises(errors.InvalidConfigError, match="hidden_size"):
        enc.EncoderConfig.from_hf({"model_type": "bert", "vocab_size": 3})
    with pytest.raises(errors.InvalidConfigError, match="divisible"):
        dataclasses.replace(TINY, num_attention_heads=3)


# --- loading ----------------------------------------------------------------------------------
def test_load_roundtrip_and_bf16(tmp_path):
    model = enc.Encoder(TINY, rngs=nnx.Rngs(0))
    d = _write(tmp_path, TINY, _hf_tensors(model) | {"embeddings.position_ids": np.arange(40)[None]})
    loaded = enc.load_encoder(d)
    ids, mask = _batch(np.random.default_rng(4))
    np.testing.assert_array_equal(loaded(ids, mask).last_hidden_state,
                                  model(ids, mask).last_hidden_state)
    half = enc.load_encoder(d, "bfloat16")
    assert half.embeddings.word_embeddings.embedding[...].dtype == jnp.bfloat16
    assert half.encoder.layer[0].attention.self.query.kernel[...].dtype == jnp.bfloat16


def test_load_classifier_prefix_and_fresh_head(tmp_path):
    clf = enc.EncoderForSequenceClassification(TINY, num_labels=2, pooling="pooler",
                                               rngs=nnx.Rngs(1))
    d = _write(tmp_path, TINY, _hf_tensors(clf))  # "bert." prefix + "classifier.*"
    ids, mask = _batch(np.random.default_rng(5))
    same = enc.load_encoder(d, num_labels=2, pooling="pooler")
    np.testing.assert_array_equal(same(ids, mask), clf(ids, mask))
    fresh = enc.load_encoder(d, num_labels=5, seed=3)  # head shape differs: initialised
    assert fresh(ids, mask).shape == (3, 5)
    np.testing.assert_array_equal(fresh.bert.encoder.layer[1].output.dense.kernel[...],
                                  clf.bert.encoder.layer[1].output.dense.kernel[...])
    bare = enc.load_encoder(d)  # a bare encoder from a task checkpoint
    np.testing.assert_array_equal(bare(ids, mask).pooler_output,
                                  clf.bert(ids, mask).pooler_output)


def test_load_without_pooler(tmp_path):
    model = enc.Encoder(dataclasses.replace(TINY, add_pooler=False), rngs=nnx.Rngs(0))
    loaded = enc.load_encoder(_write(tmp_path, TINY, _hf_tensors(model)))
    assert loaded.pooler is None and loaded.config.add_pooler is False


def test_shape_mismatch_names_first_tensor(tmp_path):
    tensors = _hf_tensors(enc.Encoder(TINY, rngs=nnx.Rngs(0)))
    tensors["encoder.layer.1.intermediate.dense.weight"] = np.zeros((31, 16), np.float32)
    tensors["encoder.layer.1.output.dense.weight"] = np.zeros((16, 31), np.float32)
    with pytest.raises(errors.CheckpointError,
                       match=r"'encoder\.layer\.1\.intermediate\.dense\.weight'.*\(31, 16\)"):
        enc.load_encoder(_write(tmp_path, TINY, tensors))


def test_missing_tensor(tmp_path):
    tensors = _hf_tensors(enc.Encoder(TINY, rngs=nnx.Rngs(0)))
    del tensors["encoder.layer.0.attention.self.key.bias"]
    with pytest.raises(errors.CheckpointError, match="attention.self.key.bias"):
        enc.load_encoder(_write(tmp_path, TINY, tensors))


def test_unsupported_architecture_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(errors.UnsupportedArchitectureError, match="'t5'.*supported"):
        enc.load_encoder(tmp_path)


def test_no_config_dir(tmp_path):
    with pytest.raises(errors.CheckpointError, match="config.json"):
        enc.load_encoder(tmp_path)


def test_truncated_checkpoint(tmp_path):
    d = _write(tmp_path, TINY, _hf_tensors(enc.Encoder(TINY, rngs=nnx.Rngs(0))))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(errors.CheckpointError, match="model.safetensors.*truncated"):
        enc.load_encoder(d)


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16)
               for k, v in _hf_tensors(enc.Encoder(TINY, rngs=nnx.Rngs(0))).items()}
    loaded = enc.load_encoder(_write(tmp_path, TINY, tensors))
    assert loaded.encoder.layer[0].output.dense.kernel[...].dtype == jnp.bfloat16
