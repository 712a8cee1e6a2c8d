"""Jitted generation: greedy equals a cache-free argmax loop, stop tokens, sampling filters, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax import errors
from peft_jax.models import generate as gen
from peft_jax.models.decoder import Decoder, DecoderConfig

CFG = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, sliding_window=4, eos_token_ids=(), pad_token_id=0)
IDS = jnp.array([[0, 0, 0, 5, 9, 3], [4, 8, 15, 16, 23, 7], [0, 12, 13, 14, 1, 2]], jnp.int32)
MASK = (IDS != 0).astype(jnp.int32).at[1].set(1)


@pytest.fixture(scope="module")
def model():
    m = Decoder(CFG, rngs=nnx.Rngs(3))
    for layer in m.layers:  # larger weights: peaked, tie-free next-token distributions
        k = layer.mlp.down_proj.kernel
        k[...] = k[...] * 20.0
    return m


def _argmax_loop(model, ids, mask, n):
    fwd = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
    out = []
    for _ in range(n):
        nxt = jnp.argmax(fwd(model, ids, mask)[:, -1], axis=-1).astype(jnp.int32)
        out.append(nxt)
        ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(nxt)[:, None]], axis=1)
    return np.stack(out, axis=1)


def test_greedy_equals_cache_free_argmax_loop(model):
    got = gen.generate(model, IDS, MASK, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got.tokens), _argmax_loop(model, IDS, MASK, 6))
    assert got.lengths.tolist() == [6, 6, 6]


def test_stop_tokens_end_rows_and_pad_after(model):
    free = np.asarray(gen.generate(model, IDS, MASK, max_new_tokens=6).tokens)
    stop = int(free[0, 1])
    got = gen.generate(model, IDS, MASK, max_new_tokens=6, stop_tokens=[stop], pad_token_id=39)
    tokens, lengths = np.asarray(got.tokens), np.asarray(got.lengths)
    for row in range(3):
        hits = np.flatnonzero(free[row] == stop)
        n = hits[0] + 1 if hits.size else 6
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == 39).all()


def test_config_eos_is_the_default_stop(model):
    free = np.asarray(gen.generate(model, IDS, MASK, max_new_tokens=4).tokens)
    graphdef, state = nnx.split(model)
    import dataclasses

    eos_model = nnx.merge(graphdef, state)
    eos_model.config = dataclasses.replace(CFG, eos_token_ids=(int(free[1, 0]),))
    got = gen.generate(eos_model, IDS, MASK, max_new_tokens=4)
    assert int(got.lengths[1]) == 1


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = np.asarray(gen.generate(model, IDS, MASK, max_new_tokens=5).tokens)
    for s in (gen.Sampling(temperature=1.5, top_k=1), gen.Sampling(temperature=1.5, top_p=1e-6)):
        got = gen.generate(model, IDS, MASK, max_new_tokens=5, sampling=s, rng=jax.random.key(7))
        np.testing.assert_array_equal(np.asarray(got.tokens), greedy)


def test_sampling_is_reproducible_per_key(model):
    s = gen.Sampling(temperature=5.0)
    a = gen.generate(model, IDS, MASK, max_new_tokens=8, sampling=s, rng=jax.random.key(1)).tokens
    b = gen.generate(model, IDS, MASK, max_new_tokens=8, sampling=s, rng=jax.random.key(1)).tokens
    c = gen.generate(model, IDS, MASK, max_new_tokens=8, sampling=s, rng=jax.random.key(2)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_next_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256, jnp.float32))
    keys = jax.random.key(0)
    kw = dict(greedy=False, temperature=jnp.float32(1.0), top_p=jnp.float32(1.0))
    top2 = gen.sample_next(logits, keys, top_k=2, use_top_p=False, **kw)
    assert set(np.asarray(top2).tolist()) == {0, 1}
    kw["top_p"] = jnp.float32(0.7)  # smallest set reaching 0.7: tokens 0 and 1
    nucleus = gen.sample_next(logits, keys, top_k=None, use_top_p=True, **kw)
    assert set(np.asarray(nucleus).tolist()) == {0, 1}


def test_one_compile_per_shape(model):
    gen.generate(model, IDS, MASK, max_new_tokens=3, sampling=gen.Sampling(temperature=0.5))
    before = gen._generate._cache_size()
    for t in (0.7, 1.3):
        gen.generate(model, IDS, MASK, max_new_tokens=3, sampling=gen.Sampling(temperature=t, top_p=None))
    assert gen._generate._cache_size() == before


def test_bad_arguments():
    m = Decoder(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(errors.InvalidConfigError, match="max_new_tokens"):
        gen.generate(m, IDS, max_new_tokens=0)
    with pytest.raises(errors.InvalidConfigError, match="attention_mask shape"):
        gen.generate(m, IDS, MASK[:, 1:])
    with pytest.raises(errors.InvalidConfigError, match="top_p"):
        gen.Sampling(temperature=1.0, top_p=1.5)
