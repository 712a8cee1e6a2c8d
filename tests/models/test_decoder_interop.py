"""Parity with transformers (torch CPU) on tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma 3 models.

Each HF model is saved with ``save_pretrained`` and loaded with our loader; logits must agree to
1e-4 max abs in fp32 on a left-padded batch, step by step through the KV cache, and greedy
generation must produce the same tokens.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from peft_jax.models.decoder_load import load_decoder  # noqa: E402
from peft_jax.models.generate import generate  # noqa: E402

pytestmark = pytest.mark.interop

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
TOL = 1e-4


def _hf_config(arch):
    t = transformers
    if arch == "llama":
        return t.LlamaConfig(**BASE, head_dim=16, rope_scaling=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))
    if arch == "mistral":
        return t.MistralConfig(**BASE, sliding_window=4)
    if arch == "qwen2":
        return t.Qwen2Config(**BASE, tie_word_embeddings=True)
    if arch == "qwen3":
        return t.Qwen3Config(**BASE, head_dim=16, attention_bias=True)
    return t.Gemma3TextConfig(**BASE, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              final_logit_softcapping=30.0)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        _hf_config(request.param), attn_implementation="eager").eval()
    with torch.no_grad():  # move norms away from their neutral init so their convention matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    model, _ = load_decoder(d)
    return hf, model


def _batch(t=10):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(3, t))
    mask = np.ones((3, t), np.int64)
    mask[1, :t // 4] = 0
    mask[2, :t // 2] = 0
    return np.where(mask == 1, ids, 0), mask


def _positions(mask):
    return np.clip(mask.cumsum(1) - 1, 0, None)


def _hf_logits(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)


def test_padded_batch_logits_match(pair):
    hf, model = pair
    ids, mask = _batch()
    ref = _hf_logits(hf, ids, mask, position_ids=torch.tensor(_positions(mask))).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))(model))
    diff = np.abs(ours - ref)[mask == 1].max()
    assert diff < TOL, diff


def test_kv_cache_decoding_step_by_step_matches(pair):
    hf, model = pair
    ids, mask = _batch(t=12)
    prefill = 7
    step = nnx.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))
    cache = model.init_cache(3, 12)
    ours, cache = step(model, jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache)
    out = _hf_logits(hf, ids[:, :prefill], mask[:, :prefill],
                     position_ids=torch.tensor(_positions(mask[:, :prefill])), use_cache=True)
    hf_cache = getattr(out, "cache", None) or out.past_key_values
    real = mask[:, :prefill] == 1
    assert np.abs(np.asarray(ours) - out.logits.numpy())[real].max() < TOL
    for t in range(prefill, 12):
        ours, cache = step(model, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        pos = _positions(mask[:, :t + 1])[:, -1:]
        out = _hf_logits(hf, ids[:, t:t + 1], mask[:, :t + 1], position_ids=torch.tensor(pos),
                         cache=hf_cache, use_cache=True)
        hf_cache = getattr(out, "cache", None) or out.past_key_values
        diff = np.abs(np.asarray(ours)[:, 0] - out.logits.numpy()[:, 0]).max()
        assert diff < TOL, (t, diff)


def test_greedy_generation_matches_hf_generate(pair):
    hf, model = pair
    ids, mask = _batch(t=6)
    new = 8
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0).numpy()[:, ids.shape[1]:]
    got = generate(model, ids, mask, max_new_tokens=new, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(got.tokens), ref)
