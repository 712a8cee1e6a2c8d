"""Reference decoder without torch: structure, masks, KV cache, dtypes, HF-dir loading and its errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from peft_jax import errors
from peft_jax.models import decoder as dec
from peft_jax.models import rope
from peft_jax.models.decoder_config import DecoderConfig, reference_config
from peft_jax.models.decoder_load import hf_tensor_shapes, load_decoder

HF_BASE = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
HF_CONFIGS = {
    "llama": {**HF_BASE, "model_type": "llama", "head_dim": 16,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16}},
    "mistral": {**HF_BASE, "model_type": "mistral", "sliding_window": 3, "rope_theta": 1e4},
    "qwen2": {**HF_BASE, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**HF_BASE, "model_type": "qwen3", "head_dim": 8},
    "gemma3_text": {**HF_BASE, "model_type": "gemma3_text", "head_dim": 8, "sliding_window": 3,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 10},
}


def _small(**kw):
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8)
    return DecoderConfig(**{**base, **kw})


def _write_hf(tmp_path, hf, seed=0, tamper=None):
    config = DecoderConfig.from_hf(hf)
    rng = np.random.default_rng(seed)
    tensors = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in hf_tensor_shapes(config).items()}
    if tamper:
        tamper(tensors)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _batch(rng, b=3, t=8, vocab=50):
    ids = rng.integers(1, vocab, size=(b, t)).astype(np.int32)
    lengths = np.array([t, t - 3, 2][:b])
    mask = (np.arange(t)[None] >= (t - lengths)[:, None]).astype(np.int32)  # left padding
    return jnp.asarray(np.where(mask == 1, ids, 0)), jnp.asarray(mask)


# --- structure ----------------------------------------------------------------------------------
def test_hf_mirroring_paths_for_lora_targets():
    model = dec.Decoder(_small(qk_norm=True), rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Variable)}
    for i in range(2):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"layers/{i}/self_attn/{name}/kernel" in paths
            assert isinstance(model.layers[i].self_attn.__dict__[name], nnx.Linear)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert f"layers/{i}/mlp/{name}/kernel" in paths
            assert isinstance(model.layers[i].mlp.__dict__[name], nnx.Linear)
        assert f"layers/{i}/self_attn/q_norm/scale" in paths
    assert {"embed_tokens/embedding", "norm/scale", "lm_head/kernel"} <= paths


def test_reference_config_is_the_benchmark_model():
    c = reference_config()
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size,
            c.vocab_size, c.tie_embeddings) == (512, 8, 8, 8, 1408, 8192, False)
    model = dec.Decoder(c, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == 2 * 8192 * 512 + 8 * (4 * 512 * 512 + 3 * 512 * 1408 + 2 * 512) + 512


def test_tied_head_has_no_lm_head():
    model = dec.Decoder(_small(tie_embeddings=True), rngs=nnx.Rngs(0))
    assert model.lm_head is None
    assert _fwd(model, jnp.ones((1, 3), jnp.int32)).shape == (1, 3, 50)


def test_config_validation_errors():
    with pytest.raises(errors.InvalidConfigError, match="multiple of num_kv_heads"):
        _small(num_kv_heads=3)
    with pytest.raises(errors.InvalidConfigError, match="layer_types"):
        _small(layer_types=("full_attention",))
    with pytest.raises(errors.InvalidConfigError, match="mlp_activation"):
        _small(mlp_activation="relu")


# --- masks, positions, cache --------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(sliding_window=3), dict(qk_norm=True, norm_offset=1.0,
                                embed_scale=True, sandwich_norms=True, mlp_activation="gelu_tanh",
                                final_logit_softcap=5.0, attn_logit_softcap=3.0,
                                sliding_window=2, layer_types=("sliding_attention", "full_attention"),
                                rope_local_theta=100.0)])
def test_left_padding_matches_unpadded_rows(kw):
    model = dec.Decoder(_small(**kw), rngs=nnx.Rngs(1))
    ids, mask = _batch(np.random.default_rng(0))
    padded = _fwd(model, ids, mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = _fwd(model, ids[row:row + 1, -n:])
        np.testing.assert_allclose(padded[row, -n:], alone[0], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, dict(sliding_window=3),
                                dict(sliding_window=2, layer_types=("sliding_attention", "full_attention"),
                                     rope_local_theta=100.0, qk_norm=True)])
def test_kv_cache_step_by_step_equals_full_forward(kw):
    model = dec.Decoder(_small(**kw), rngs=nnx.Rngs(2))
    ids, mask = _batch(np.random.default_rng(1), t=9)
    full = _fwd(model, ids, mask)
    step = nnx.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))
    cache = model.init_cache(3, 12)
    logits, cache = step(model, ids[:, :5], mask[:, :5], cache)  # prefill
    outs = [logits]
    for t in range(5, 9):
        logits, cache = step(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(logits)
    got = jnp.concatenate(outs, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5)
    assert int(cache.length) == 9
    assert cache.next_position.tolist() == mask.sum(1).tolist()


def test_cache_overflow_is_a_typed_error():
    model = dec.Decoder(_small(), rngs=nnx.Rngs(0))
    _, cache = model(jnp.ones((1, 3), jnp.int32), cache=model.init_cache(1, 4))
    with pytest.raises(errors.InvalidConfigError, match="KV cache holds 4 tokens"):
        model(jnp.ones((1, 2), jnp.int32), cache=cache)


def test_default_positions_count_real_tokens_only():
    model = dec.Decoder(_small(), rngs=nnx.Rngs(0))
    ids, mask = _batch(np.random.default_rng(0))
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    # Default positions read RoPE from numpy-built tables, given ones compute cos/sin in XLA:
    # the two differ by an ulp, nothing more.
    np.testing.assert_allclose(_fwd(model, ids, mask),
                               nnx.jit(lambda m: m(ids, attention_mask=mask, positions=pos))(model),
                               rtol=1e-6, atol=1e-7)


def test_inputs_embeds_equals_input_ids():
    model = dec.Decoder(_small(embed_scale=True), rngs=nnx.Rngs(0))
    ids = jnp.arange(6, dtype=jnp.int32)[None]
    np.testing.assert_allclose(_fwd(model, ids), nnx.jit(lambda m: m(inputs_embeds=m.embed(ids)))(model),
                               atol=1e-6)


def test_sliding_window_limits_context():
    model = dec.Decoder(_small(sliding_window=2, num_layers=1), rngs=nnx.Rngs(0))
    a = jnp.array([[5, 6, 7, 8]], jnp.int32)
    b = jnp.array([[9, 6, 7, 8]], jnp.int32)  # differs only outside the window of the last token
    out_a, out_b = _fwd(model, a), _fwd(model, b)
    np.testing.assert_allclose(out_a[0, -1], out_b[0, -1], atol=1e-6)
    assert not np.allclose(out_a[0, 1], out_b[0, 1])


def test_bf16_forward_and_grad_under_strict_promotion():
    model = dec.Decoder(_small(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids, mask = _batch(np.random.default_rng(0))
    out = _fwd(model, ids, mask)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    grads = nnx.jit(nnx.grad(lambda m: m(ids, attention_mask=mask).astype(jnp.float32).mean()))(model)
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads))


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    s = rope.RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_positions=64)
    plain = rope.inverse_frequencies(64, 10000.0)
    scaled = rope.inverse_frequencies(64, 10000.0, s)
    assert scaled[0] == plain[0]
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)


# --- from_hf ------------------------------------------------------------------------------------
def test_from_hf_per_architecture():
    c = {k: DecoderConfig.from_hf(v) for k, v in HF_CONFIGS.items()}
    assert c["llama"].rope_scaling.kind == "llama3" and c["llama"].head_dim == 16
    assert c["mistral"].layer_window(0) == 3 and c["mistral"].layer_window(2) == 3
    assert c["qwen2"].attention_bias and not c["qwen2"].attention_out_bias and c["qwen2"].tie_embeddings
    assert c["qwen3"].qk_norm and not c["qwen3"].attention_bias
    g = c["gemma3_text"]
    assert (g.norm_offset, g.embed_scale, g.sandwich_norms, g.qk_norm, g.mlp_activation) == (
        1.0, True, True, True, "gelu_tanh")
    assert [g.layer_window(i) for i in range(3)] == [3, None, 3]
    assert g.layer_rope(0) == (10000.0, None) and g.layer_rope(1)[0] == 1_000_000.0
    assert g.query_pre_attn_scalar == 10 and g.final_logit_softcap == 30.0


def test_from_hf_old_style_rope_keys_and_gemma_pattern():
    hf = {**HF_BASE, "model_type": "gemma3_text", "num_hidden_layers": 7, "rope_theta": 5e5,
          "rope_local_base_freq": 123.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
          "sliding_window_pattern": 6}
    g = DecoderConfig.from_hf(hf)
    assert g.layer_types[5] == "full_attention" and g.layer_types[6] == "sliding_attention"
    assert g.layer_rope(5) == (5e5, rope.RopeScaling("linear", factor=8.0))
    assert g.layer_rope(0) == (123.0, None)


def test_unsupported_architecture_names_it_and_lists_supported():
    with pytest.raises(errors.UnsupportedArchitectureError) as e:
        DecoderConfig.from_hf({**HF_BASE, "model_type": "gpt2"})
    assert "'gpt2'" in str(e.value)
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        assert name in str(e.value)


def test_unsupported_rope_type():
    with pytest.raises(errors.UnsupportedArchitectureError, match="yarn"):
        DecoderConfig.from_hf({**HF_BASE, "model_type": "llama",
                               "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# --- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_load_hf_dir_places_every_tensor(tmp_path, arch):
    d, tensors = _write_hf(tmp_path, HF_CONFIGS[arch])
    model, config = load_decoder(d)
    assert config == DecoderConfig.from_hf(HF_CONFIGS[arch])
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(model.layers[1].self_attn.q_proj.kernel[...], q.T)
    np.testing.assert_array_equal(model.embed_tokens.embedding[...], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(model.norm.scale[...], tensors["model.norm.weight"])
    assert _fwd(model, jnp.ones((1, 4), jnp.int32)).shape == (1, 4, 61)


def test_load_bf16(tmp_path):
    d, _ = _write_hf(tmp_path, HF_CONFIGS["llama"])
    model, _ = dec.load_decoder(d, dtype=jnp.bfloat16)
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    assert _fwd(model, jnp.ones((1, 4), jnp.int32)).dtype == jnp.bfloat16


def test_shape_mismatch_names_first_tensor(tmp_path):
    def tamper(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

    d, _ = _write_hf(tmp_path, HF_CONFIGS["llama"], tamper=tamper)
    with pytest.raises(errors.CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_decoder(d)


def test_missing_and_unexpected_tensors(tmp_path):
    d, _ = _write_hf(tmp_path, HF_CONFIGS["llama"],
                     tamper=lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(errors.CheckpointError, match="missing.*up_proj"):
        load_decoder(d)
    d2 = tmp_path / "extra"
    d2.mkdir()
    _write_hf(d2, HF_CONFIGS["llama"],
              tamper=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(errors.CheckpointError, match="unexpected.*q_proj.bias"):
        load_decoder(d2)


def test_unsupported_architecture_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", **HF_BASE}))
    with pytest.raises(errors.UnsupportedArchitectureError, match="falcon"):
        load_decoder(tmp_path)


def test_missing_config_and_truncated_file(tmp_path):
    with pytest.raises(errors.CheckpointError, match="config.json"):
        load_decoder(tmp_path)
    d, _ = _write_hf(tmp_path, HF_CONFIGS["qwen3"])
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError):
        load_decoder(d)
