"""GGUF loading without torch: tiny files written with ``gguf.GGUFWriter`` from HF-layout weights.

Writing applies llama.cpp's conventions (Q/K row permutation for ``llama``, Gemma norms stored as
``1 + w``); loading must undo them, so a GGUF model and the HF directory holding the same weights
give the same logits.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from peft_jax import errors
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.models.decoder_load import hf_tensor_shapes, load_decoder
from peft_jax.models.gguf import gguf_tokenizer_info, load_gguf_decoder

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV, HEAD_DIM, FFN, VOCAB = 32, 4, 2, 8, 48, 40

_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the loader must undo it)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name, arch):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    extra = ({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"} if arch == "gemma3"
             else {"post_attention_layernorm": "ffn_norm"})
    return f"blk.{layer}.{(_BLOCK | extra)[module]}.{leaf}"


def _hf_config(arch, layers):
    base = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV,
            "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "rope_theta": 5000.0}
    if arch == "gemma3":
        return {**base, "model_type": "gemma3_text", "sliding_window": 3, "query_pre_attn_scalar": HEAD_DIM,
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    return {**base, "model_type": "qwen3" if arch == "qwen3" else "llama", "tie_word_embeddings": arch == "qwen3"}


def _write(tmp_path, arch, layers=2, seed=0, quantize_embedding=False, hidden_in_metadata=HIDDEN):
    """Writes the same random weights as an HF dir and as a GGUF file; returns both paths."""
    hf = _hf_config(arch, layers)
    config = DecoderConfig.from_hf(hf)
    rng = np.random.default_rng(seed)
    tensors = {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in hf_tensor_shapes(config).items()}
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(hf_dir / "model.safetensors"))

    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden_in_metadata)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "gemma3":
        w.add_sliding_window(3)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")
    for name, value in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            value = _permute(value, HEADS)
        if arch == "llama" and ".k_proj." in name:
            value = _permute(value, KV)
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0
        if quantize_embedding and name == "model.embed_tokens.weight":
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name, arch), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        w.add_tensor(_gguf_name(name, arch), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf_dir, path, tensors


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, attention_mask=mask)


IDS = jnp.array([[0, 0, 5, 9, 3, 7, 11, 2], [4, 8, 15, 16, 23, 1, 3, 5]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)


@pytest.mark.parametrize("arch, layers", [("llama", 2), ("qwen3", 2), ("gemma3", 7)])
def test_gguf_matches_hf_dir_with_same_weights(tmp_path, arch, layers):
    hf_dir, path, _ = _write(tmp_path, arch, layers)
    from_gguf, gcfg = load_decoder(path)
    from_hf, hcfg = load_decoder(hf_dir)
    same = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "tie_embeddings",
            "qk_norm", "norm_offset", "sliding_window", "rope_local_theta", "query_pre_attn_scalar",
            "mlp_activation", "sandwich_norms", "embed_scale")
    assert {k: getattr(gcfg, k) for k in same} == {k: getattr(hcfg, k) for k in same}
    assert [gcfg.layer_window(i) for i in range(layers)] == [hcfg.layer_window(i) for i in range(layers)]
    diff = np.abs(np.asarray(_fwd(from_gguf, IDS, MASK)) - np.asarray(_fwd(from_hf, IDS, MASK)))
    assert diff[np.asarray(MASK) == 1].max() < 1e-5


def test_llama_qk_unpermute_restores_hf_rows(tmp_path):
    _, path, tensors = _write(tmp_path, "llama")
    model, _ = load_gguf_decoder(path)
    np.testing.assert_array_equal(model.layers[1].self_attn.q_proj.kernel[...],
                                  tensors["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(model.layers[0].self_attn.k_proj.kernel[...],
                                  tensors["model.layers.0.self_attn.k_proj.weight"].T)


def test_gemma_norms_loaded_in_hf_convention(tmp_path):
    _, path, tensors = _write(tmp_path, "gemma3", layers=7)
    model, _ = load_gguf_decoder(path)
    np.testing.assert_allclose(model.layers[3].post_feedforward_layernorm.scale[...],
                               tensors["model.layers.3.post_feedforward_layernorm.weight"], atol=1e-6)
    np.testing.assert_allclose(model.layers[0].self_attn.q_norm.scale[...],
                               tensors["model.layers.0.self_attn.q_norm.weight"], atol=1e-6)


def test_quantized_tensor_is_dequantized(tmp_path):
    _, path, tensors = _write(tmp_path, "llama", quantize_embedding=True)
    model, config = load_gguf_decoder(path, dtype=jnp.bfloat16)
    emb = np.asarray(model.embed_tokens.embedding[...].astype(jnp.float32))
    assert emb.shape == (VOCAB, HIDDEN) and config.vocab_size == VOCAB
    np.testing.assert_allclose(emb, tensors["model.embed_tokens.weight"], atol=0.02)


def test_tokenizer_metadata(tmp_path):
    _, path, _ = _write(tmp_path, "llama")
    info = gguf_tokenizer_info(path)
    assert info.model == "gpt2" and info.tokens[3] == "t3" and info.merges == ("t 1", "t 2")
    assert (info.bos_token_id, info.eos_token_id, info.chat_template) == (1, 2, "{{ messages }}")
    _, config = load_gguf_decoder(path)
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1


def test_truncated_gguf(tmp_path):
    _, path, _ = _write(tmp_path, "llama")
    data = path.read_bytes()
    for cut in (len(data) - 100, 200):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(errors.CheckpointError, match="truncated"):
            load_decoder(bad)


def test_not_gguf_and_missing_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(errors.CheckpointError, match="not a GGUF file"):
        load_decoder(bad)
    with pytest.raises(errors.CheckpointError, match="does not exist"):
        load_gguf_decoder(tmp_path / "missing.gguf")


def test_shape_mismatch_names_first_tensor(tmp_path):
    _, path, _ = _write(tmp_path, "llama", hidden_in_metadata=64)
    with pytest.raises(errors.CheckpointError, match="token_embd|embed_tokens"):
        load_decoder(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(errors.UnsupportedArchitectureError, match="'gpt2'.*llama, qwen2, qwen3, gemma3"):
        load_decoder(path)
