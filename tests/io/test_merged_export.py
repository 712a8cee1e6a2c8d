"""Merged export without torch: refusals before anything is written, the shard index, and the
written checkpoint read back by our own loaders (the transformers check is in tests/interop)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.io.merged_export import INDEX_FILE, export_base, export_merged, parse_size
from peft_jax.io.tensor_files import read_header, read_tensors
from peft_jax.models.decoder import Decoder, DecoderConfig
from peft_jax.models.decoder_load import hf_tensor_shapes, load_decoder
from peft_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification, load_encoder

IDS = jnp.array([[1, 5, 9, 3, 7, 2]])
CFG = DecoderConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4, attention_bias=True, model_type="qwen2", tie_embeddings=True,
                    layer_types=("full_attention",) * 2, remat=None)


def _randomize(model, name="default", scale=0.3):
    """Every adapter value moved off its init (LoRA B off zero), seeded."""
    rng = np.random.default_rng(0)
    state = peft_jax.nnx.adapter_state(model, name)
    peft_jax.nnx.load_adapter_state(model, {
        k: np.asarray(v) + scale * rng.standard_normal(v.shape).astype(np.asarray(v).dtype)
        for k, v in state.items()})


def _adapted(cfg=CFG):
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q_proj", "v_proj", "down_proj"], rank=2),
                        rngs=nnx.Rngs(1))
    _randomize(model)
    return model


def test_merged_checkpoint_reloads_with_the_adapted_outputs(tmp_path):
    model = _adapted()
    before = np.asarray(model(IDS))
    out = export_merged(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    header = read_header(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert "lm_head.weight" not in header  # tied: written once
    assert {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"} == hf_tensor_shapes(CFG)
    reloaded, cfg = load_decoder(out)
    assert cfg == DecoderConfig(**{**vars(CFG), "remat": cfg.remat})
    diff = np.abs(np.asarray(reloaded(IDS)) - before).max()
    assert diff < 1e-5, diff
    with peft_jax.nnx.disabled(model):  # negative control: the adapter changes the outputs
        assert np.abs(np.asarray(model(IDS)) - before).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(model(IDS)), before)  # the caller's model is unchanged
    assert not any(s.merged for _, layer in peft_jax.nnx.adapted_layers(model) for _, s in layer.slots())


def test_export_base_drops_the_adapters(tmp_path):
    model = _adapted()
    with peft_jax.nnx.disabled(model):
        base = np.asarray(model(IDS))
    reloaded, _ = load_decoder(export_base(model, tmp_path / "b"))
    np.testing.assert_allclose(np.asarray(reloaded(IDS)), base, atol=1e-6)


def test_shard_index_lists_every_tensor_once(tmp_path):
    model = _adapted()
    out = export_merged(model, tmp_path / "s", max_shard_size="8KB")
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) >= 3
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files and not (out / "model.safetensors").exists()
    held = {}
    for f in files:
        tensors = read_tensors(out / f)
        assert sum(a.nbytes for a in tensors.values()) <= 8000 or len(tensors) == 1
        held.update({name: f for name in tensors})
    assert held == index["weight_map"]
    assert set(held) == set(hf_tensor_shapes(CFG))
    assert index["metadata"]["total_size"] == sum(a.nbytes for f in files for a in read_tensors(out / f).values())
    reloaded, _ = load_decoder(out)
    assert np.abs(np.asarray(reloaded(IDS)) - np.asarray(model(IDS))).max() < 1e-5


def test_dtype_is_applied_and_recorded(tmp_path):
    out = export_merged(_adapted(), tmp_path / "h", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v["dtype"] for k, v in read_header(out / "model.safetensors").items() if k != "__metadata__"} == {"BF16"}


def test_prompt_tuning_is_not_mergeable_and_nothing_is_written(tmp_path):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    cfg = peft_jax.compose(peft_jax.LoraConfig(targets=["q_proj"], rank=2), peft_jax.prompt_tuning(3))
    peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(1))
    with pytest.raises(errors.NotMergeableError, match="PromptTuning.*save_adapter"):
        export_merged(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_directory_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    model = _adapted()
    with pytest.raises(errors.CheckpointError, match="overwrite=True"):
        export_merged(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    export_merged(model, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_shard_size_and_wrong_source_are_refused(tmp_path):
    model = _adapted()
    with pytest.raises(errors.InvalidConfigError, match="max_shard_size"):
        export_merged(model, tmp_path / "a", max_shard_size="lots")
    other = export_merged(_adapted(DecoderConfig(**{**vars(CFG), "num_layers": 1, "layer_types": ("full_attention",)})),
                          tmp_path / "other")
    with pytest.raises(errors.InvalidConfigError, match="num_layers"):
        export_merged(model, tmp_path / "b", source=other)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1KiB") == 1024


def test_bert_classifier_round_trip_copies_source_files(tmp_path):
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32)
    model = EncoderForSequenceClassification(cfg, num_labels=3, pooling="pooler", rngs=nnx.Rngs(0))
    src = export_base(model, tmp_path / "src")
    (src / "vocab.txt").write_text("[PAD]\n")
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["query", "value", "classifier"], rank=2),
                        rngs=nnx.Rngs(1))
    _randomize(model)
    ids, mask = jnp.array([[2, 7, 9, 4]]), jnp.array([[1, 1, 1, 0]])
    out = export_merged(model, tmp_path / "m", source=src)
    assert (out / "vocab.txt").read_text() == "[PAD]\n"
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["BertForSequenceClassification"] and len(hf["id2label"]) == 3
    reloaded = load_encoder(out, num_labels=3, pooling="pooler")
    diff = np.abs(np.asarray(reloaded(ids, mask)) - np.asarray(model(ids, mask))).max()
    assert diff < 1e-5, diff
    mean = EncoderForSequenceClassification(cfg, num_labels=3, pooling="mean", rngs=nnx.Rngs(0))
    with pytest.raises(errors.UnsupportedArchitectureError, match="backbone"):
        export_merged(mean, tmp_path / "x")
