"""Prefix tuning (HF PEFT, with AdapterHub's gates) and LLaMA-Adapter on attention sites.

Pure-JAX tests on tiny shapes with random nonzero params: the prefix concatenation and mask
extension, the reparameterized prefix against a numpy transcription of HF's ``get_prompt`` layout,
``fold`` (identical outputs), HF table <-> per-site conversion, the gate formula, the input-tap
companion, and the adaption-prompt formula (GQA, zero-gate identity, missing hook) through a small
softmax attention of our own. ``interop`` tests check the layout and the adaption-prompt formula
against the real HF PEFT modules (torch CPU).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.methods.adaption_prompt import AdaptionPrompt, prompt_attention
from peft_jax.methods.base import Attention, AttentionSite, Context, Inputs, InputSite
from peft_jax.methods.prefix import (
    PrefixPositions,
    PrefixTuning,
    fold,
    from_prompt_embeddings,
    kv_geometry,
    to_prompt_embeddings,
)
from peft_jax.sites.run import run_site

B, T, H, KV, D, L, F, N = 2, 5, 4, 2, 8, 3, 32, 3
TOL = 1e-5


def _interop(test):
    ignore = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    return pytest.mark.interop(pytest.mark.filterwarnings(ignore)(test))


def _rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * np.float32(scale)


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def _site(index=0, num_layers=L, heads=H, kv_heads=KV):
    return AttentionSite(path=f"layers/{index}/attn", layer="AttentionTap", num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=D, index=index, num_layers=num_layers,
                         features=F)


def _sites():
    return [_site(i) for i in range(L)]


def _randomize(tree, seed):
    return {k: jnp.asarray(_rand(seed + i, v.shape, 0.5)) for i, (k, v) in enumerate(sorted(tree.items()))}


def _attention(seed=0, t=T, s=T, batch=B, heads=H, kv_heads=KV, mask=None, project=None):
    q = jnp.asarray(_rand(seed, (batch, t, heads, D)))
    k = jnp.asarray(_rand(seed + 1, (batch, s, kv_heads, D)))
    v = jnp.asarray(_rand(seed + 2, (batch, s, kv_heads, D)))
    if mask is None:
        mask = np.tril(np.ones((t, s), bool), k=s - t)[None].repeat(batch, 0)
        mask[1, :, 0] = False  # a padded key in the second example
    hidden = jnp.asarray(_rand(seed + 3, (batch, t, F)))
    return Attention(q, k, v, jnp.asarray(mask), hidden=hidden, project=project)


def softmax_attention(a: Attention) -> jax.Array:
    """Plain masked softmax attention in numpy (float64), GQA by repeating key heads."""
    q, k, v, m = (np.asarray(x, np.float64) for x in (a.query, a.key, a.value, a.mask))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.broadcast_to(m.astype(bool)[:, None], scores.shape), scores, -1e30)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return jnp.asarray(np.einsum("bhts,bshd->bthd", p, v), jnp.float32)


def _apply(method, params, shared, site, a, call=lambda a: a, ctx=Context()):
    return run_site([(method, params, shared, ctx)], site, call, a, {})


# --- prefix tuning: the flat form ------------------------------------------------------------------
def test_prefix_concatenates_keys_values_and_mask():
    method = PrefixTuning(num_virtual_tokens=N)
    site = _site(1)
    params = _randomize(method.init(jax.random.key(0), site, {}, {})[0], 10)
    a = _attention()
    seen = _apply(method, params, {}, site, a)
    assert seen.key.shape == (B, N + T, KV, D) and seen.value.shape == (B, N + T, KV, D)
    for b in range(B):
        np.testing.assert_array_equal(seen.key[b, :N], params["prefix_key"])
        np.testing.assert_array_equal(seen.value[b, :N], params["prefix_value"])
    np.testing.assert_array_equal(seen.key[:, N:], a.key)
    np.testing.assert_array_equal(seen.value[:, N:], a.value)
    np.testing.assert_array_equal(seen.query, a.query)
    assert seen.mask.dtype == jnp.bool_ and seen.mask.shape == (B, T, N + T)
    assert bool(seen.mask[..., :N].all())
    np.testing.assert_array_equal(seen.mask[..., N:], a.mask)


def test_prefix_mask_broadcast_dims_and_dtype():
    """A ``[b, 1, s]`` mask (decoding) stays ``[b, 1, N + s]``; the prefix takes the keys' dtype."""
    method = PrefixTuning(num_virtual_tokens=N)
    site = _site()
    params = _randomize(method.init(jax.random.key(0), site, {}, {})[0], 3)
    a = _attention(t=1, s=4, mask=np.ones((B, 1, 4), bool))
    a = a._replace(key=a.key.astype(jnp.bfloat16), value=a.value.astype(jnp.bfloat16))
    seen = _apply(method, params, {}, site, a)
    assert seen.mask.shape == (B, 1, N + 4)
    assert seen.key.dtype == jnp.bfloat16 and seen.value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(seen.key[0, :N], params["prefix_key"].astype(jnp.bfloat16))


def test_prefix_end_to_end_attention():
    """Through a softmax attention: equal to attending over the hand-concatenated keys."""
    method = PrefixTuning(num_virtual_tokens=N)
    site = _site(2)
    params = _randomize(method.init(jax.random.key(0), site, {}, {})[0], 20)
    a = _attention(seed=4)
    out = _apply(method, params, {}, site, a, call=softmax_attention)
    pk = np.broadcast_to(np.asarray(params["prefix_key"]), (B, N, KV, D))
    pv = np.broadcast_to(np.asarray(params["prefix_value"]), (B, N, KV, D))
    mask = np.concatenate([np.ones((B, T, N), bool), np.asarray(a.mask)], -1)
    ref = softmax_attention(Attention(a.query, np.concatenate([pk, a.key], 1),
                                      np.concatenate([pv, a.value], 1), mask))
    _close(out, ref)
    assert not np.allclose(out, softmax_attention(a), atol=1e-3)  # the prefix changes the output


def test_prefix_inits_and_shapes():
    site = _site()
    flat = PrefixTuning(num_virtual_tokens=N)
    assert flat.param_shapes(site) == {"prefix_key": (N, KV, D), "prefix_value": (N, KV, D)}
    params, updates = flat.init(jax.random.key(0), site, {}, {})
    assert updates == {} and float(jnp.std(params["prefix_key"])) > 0.5  # N(0, 1)
    zero = PrefixTuning(num_virtual_tokens=N, init_weights="zero")
    assert not any(bool(v.any()) for v in zero.init(jax.random.key(0), site, {}, {})[0].values())
    proj = PrefixTuning(num_virtual_tokens=N, projection=True, encoder_hidden_size=7)
    assert proj.param_shapes(site) == {}
    shared = proj.init_shared_params(jax.random.key(0), _sites(), jnp.float32)
    t = KV * D
    assert {k: v.shape for k, v in shared.items()} == {
        "prefix_embedding": (N, t), "prefix_hidden_kernel": (t, 7), "prefix_hidden_bias": (7,),
        "prefix_out_kernel": (7, 2 * L * t), "prefix_out_bias": (2 * L * t,)}
    bound = 1 / np.sqrt(7)
    assert float(jnp.abs(shared["prefix_out_kernel"]).max()) <= bound
    default = PrefixTuning(num_virtual_tokens=N, projection=True)
    assert default.init_shared_params(jax.random.key(0), _sites(), jnp.float32)[
        "prefix_hidden_kernel"].shape == (t, t)  # encoder_hidden_size defaults to token_dim
    zshared = dataclasses.replace(proj, init_weights="zero").init_shared_params(
        jax.random.key(0), _sites(), jnp.float32)
    assert not bool(zshared["prefix_out_kernel"].any()) and not bool(zshared["prefix_out_bias"].any())
    assert bool(zshared["prefix_embedding"].any())
    assert flat.init_shared_params(jax.random.key(0), _sites(), jnp.float32) == {}


# --- prefix tuning: the reparameterized form ---------------------------------------------------------
def _hf_get_prompt_numpy(shared, batch, num_layers, kv_heads, head_dim):
    """A numpy transcription of HF's ``PrefixEncoder.forward`` + ``get_prompt`` layout:
    ``(B, N, 2L·T)`` -> view ``(B, N, 2L, KV, d)`` -> permute ``[2, 0, 3, 1, 4]`` -> split(2)."""
    s = {k: np.asarray(v, np.float64) for k, v in shared.items()}
    h = np.tanh(s["prefix_embedding"] @ s["prefix_hidden_kernel"] + s["prefix_hidden_bias"])
    out = h @ s["prefix_out_kernel"] + s["prefix_out_bias"]
    out = np.broadcast_to(out[None], (batch, *out.shape))
    n = out.shape[1]
    out = out.reshape(batch, n, 2 * num_layers, kv_heads, head_dim).transpose(2, 0, 3, 1, 4)
    return [out[2 * i: 2 * i + 2] for i in range(num_layers)]  # each (2, B, KV, N, d)


def test_projection_matches_hf_layout():
    method = PrefixTuning(num_virtual_tokens=N, projection=True, encoder_hidden_size=6)
    shared = method.init_shared_params(jax.random.key(1), _sites(), jnp.float32)
    shared = _randomize(shared, 30)
    ref = _hf_get_prompt_numpy(shared, B, L, KV, D)
    a = _attention()
    for site in _sites():
        pk, pv = method.prefix({}, shared, site)
        _close(pk, ref[site.index][0, 0].transpose(1, 0, 2))  # (KV, N, d) -> (N, KV, d)
        _close(pv, ref[site.index][1, 0].transpose(1, 0, 2))
        seen = _apply(method, {}, shared, site, a)
        for b in range(B):
            _close(seen.key[b, :N], ref[site.index][0, b].transpose(1, 0, 2))
            _close(seen.value[b, :N], ref[site.index][1, b].transpose(1, 0, 2))


def test_fold_gives_identical_outputs():
    method = PrefixTuning(num_virtual_tokens=N, projection=True, use_gating=True, shared_gating=False)
    sites = _sites()
    shared = _randomize(method.init_shared_params(jax.random.key(2), sites, jnp.float32), 40)
    params = {s.path: _randomize(method.init(jax.random.key(3), s, {}, shared)[0], 50 + s.index)
              for s in sites}
    flat, folded = fold(method, shared, sites, params)
    assert flat == dataclasses.replace(method, projection=False, encoder_hidden_size=None)
    a = _attention(seed=7)
    for site in sites:
        assert sorted(folded[site.path]) == ["prefix_gate_bias", "prefix_gate_kernel", "prefix_key",
                                             "prefix_value"]
        want = _apply(method, params[site.path], shared, site, a, call=softmax_attention)
        got = _apply(flat, folded[site.path], {}, site, a, call=softmax_attention)
        np.testing.assert_array_equal(got, want)
    # a flat method folds to itself
    again, same = fold(flat, {}, sites, folded)
    assert again is flat and same.keys() == folded.keys()


def test_hf_table_round_trips():
    sites = _sites()
    table = jnp.asarray(_rand(60, (N, 2 * L * KV * D)))
    per_site = from_prompt_embeddings(table, sites)
    assert per_site[sites[1].path]["prefix_key"].shape == (N, KV, D)
    # the layout: layer l's keys are columns [2l T, (2l+1) T), its values the next T
    t = KV * D
    np.testing.assert_array_equal(per_site[sites[2].path]["prefix_value"].reshape(N, t),
                                  table[:, 5 * t: 6 * t])
    np.testing.assert_array_equal(to_prompt_embeddings(per_site, sites[::-1]), table)
    method = PrefixTuning(num_virtual_tokens=N)
    flat = {s.path: _randomize(method.init(jax.random.key(0), s, {}, {})[0], 70 + s.index) for s in sites}
    back = from_prompt_embeddings(to_prompt_embeddings(flat, sites), sites)
    for s in sites:
        for name in ("prefix_key", "prefix_value"):
            np.testing.assert_array_equal(back[s.path][name], flat[s.path][name])
    # folded MLP output == HF's get_prompt_embedding_to_save (the MLP applied once)
    proj = PrefixTuning(num_virtual_tokens=N, projection=True)
    shared = _randomize(proj.init_shared_params(jax.random.key(4), sites, jnp.float32), 80)
    s64 = {k: np.asarray(v, np.float64) for k, v in shared.items()}
    saved = (np.tanh(s64["prefix_embedding"] @ s64["prefix_hidden_kernel"] + s64["prefix_hidden_bias"])
             @ s64["prefix_out_kernel"] + s64["prefix_out_bias"])
    _close(to_prompt_embeddings(fold(proj, shared, sites)[1], sites), saved)


def test_table_errors():
    sites = _sites()
    method = PrefixTuning(num_virtual_tokens=N)
    flat = {s.path: method.init(jax.random.key(0), s, {}, {})[0] for s in sites}
    with pytest.raises(errors.InvalidConfigError, match=r"layers \[1\]"):
        to_prompt_embeddings(flat, [sites[0], sites[2]])
    with pytest.raises(errors.InvalidConfigError, match="claim layer 0"):
        to_prompt_embeddings(flat, [sites[0], dataclasses.replace(sites[1], index=0), sites[2]])
    with pytest.raises(errors.CheckpointError, match="another model"):
        from_prompt_embeddings(jnp.zeros((N, 7)), sites)
    with pytest.raises(errors.InvalidConfigError, match="one \\(num_layers"):
        kv_geometry([sites[0], _site(1, kv_heads=1)])
    with pytest.raises(errors.InvalidConfigError, match="no attention taps"):
        kv_geometry([])


def test_prefix_errors():
    with pytest.raises(errors.InvalidConfigError):
        PrefixTuning(num_virtual_tokens=0)
    with pytest.raises(errors.InvalidConfigError, match="init_weights"):
        PrefixTuning(init_weights="gaussian")
    with pytest.raises(errors.InvalidConfigError):
        PrefixTuning(dropout=1.0)
    with pytest.raises(errors.InvalidConfigError, match="projection"):
        PrefixTuning(projection=1)
    method = PrefixTuning(num_virtual_tokens=N)
    with pytest.raises(errors.UnsupportedLayerError):
        method.check(InputSite(path="i", layer="InputTap", features=F, vocab_size=9))
    with pytest.raises(errors.InvalidConfigError, match="layer 3 of 3"):
        method.check(_site(3))
    with pytest.raises(errors.InvalidConfigError, match="features"):
        PrefixTuning(use_gating=True).check(dataclasses.replace(_site(), features=0))
    method.check(_site(2))
    proj = PrefixTuning(num_virtual_tokens=N, projection=True)
    shared = proj.init_shared_params(jax.random.key(0), _sites(), jnp.float32)
    with pytest.raises(errors.InvalidConfigError, match="rebuild"):
        proj.prefix({}, shared, _site(0, num_layers=L + 1))
    with pytest.raises(errors.StateError):
        proj.prefix({}, {}, _site())
    with pytest.raises(errors.StateError):
        method.prefix({}, {}, _site())


# --- gating and dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_gating", [True, False])
def test_gating_formula(shared_gating):
    method = PrefixTuning(num_virtual_tokens=N, use_gating=True, shared_gating=shared_gating)
    site = _site()
    params = method.init(jax.random.key(0), site, {}, {})[0]
    g = 1 if shared_gating else 2
    assert params["prefix_gate_kernel"].shape == (F, g) and params["prefix_gate_bias"].shape == (g,)
    assert 0.005 < float(jnp.std(params["prefix_gate_kernel"])) < 0.04  # N(0, 0.02)
    params = _randomize(params, 90)
    a = _attention(seed=9)
    seen = _apply(method, params, {}, site, a)
    hid = np.asarray(a.hidden, np.float64)
    logits = hid @ np.asarray(params["prefix_gate_kernel"], np.float64) + np.asarray(params["prefix_gate_bias"])
    gate = (1 / (1 + np.exp(-logits))).mean(axis=1)  # [b, G]
    for b in range(B):
        _close(seen.key[b, :N], gate[b, 0] * np.asarray(params["prefix_key"]))
        _close(seen.value[b, :N], gate[b, -1] * np.asarray(params["prefix_value"]))
    np.testing.assert_array_equal(seen.key[:, N:], a.key)
    with pytest.raises(errors.MissingHookError, match="hidden="):
        _apply(method, params, {}, site, a._replace(hidden=None))


def test_dropout_only_with_a_key():
    method = PrefixTuning(num_virtual_tokens=N, dropout=0.5)
    assert method.needs_rng and not PrefixTuning().needs_rng
    site = _site()
    params = _randomize(method.init(jax.random.key(0), site, {}, {})[0], 100)
    a = _attention()
    eval_out = _apply(method, params, {}, site, a)
    np.testing.assert_array_equal(eval_out.key[0, :N], params["prefix_key"])
    train = _apply(method, params, {}, site, a, ctx=Context(jax.random.key(5)))
    kept = np.asarray(train.key[:, :N]) != 0
    assert 0 < kept.mean() < 1
    _close(np.asarray(train.key[:, :N])[kept],
           2 * np.broadcast_to(np.asarray(params["prefix_key"]), (B, N, KV, D))[kept])
    np.testing.assert_array_equal(train.key[:, N:], a.key)


# --- positions ------------------------------------------------------------------------------------------
def test_prefix_positions():
    site = InputSite(path="inputs", layer="InputTap", features=F, vocab_size=11, max_positions=10)
    pos = PrefixTuning(num_virtual_tokens=N).positions()
    assert pos == PrefixPositions(num_virtual_tokens=N) and pos.param_shapes(site) == {}
    assert pos.init(jax.random.key(0), site, {}, {}) == ({}, {})
    x = Inputs(jnp.zeros((B, 4, F)), jnp.ones((B, 4), bool), offset=2)
    out = _apply(pos, {}, {}, site, x)
    assert out.offset == 2 + N and out.embeds is x.embeds and out.mask is x.mask
    step = x._replace(fresh=False)
    assert _apply(pos, {}, {}, site, step) is step
    with pytest.raises(errors.SequenceTooLongError, match="at most 10"):
        _apply(pos, {}, {}, site, x._replace(embeds=jnp.zeros((B, 6, F)), mask=jnp.ones((B, 6), bool)))
    with pytest.raises(errors.SequenceTooLongError):
        PrefixPositions(num_virtual_tokens=10).check(site)
    pos.check(site)
    with pytest.raises(errors.UnsupportedLayerError):
        pos.check(_site())


# --- adaption prompt ------------------------------------------------------------------------------------
def _projection(seed, kv_heads=KV):
    """A layer's k/v projections (with biases) ``[b, n, F] -> [b, n, KV, d]``, no RoPE."""
    wk, wv = _rand(seed, (F, kv_heads * D), 0.3), _rand(seed + 1, (F, kv_heads * D), 0.3)
    bk, bv = _rand(seed + 2, (kv_heads * D,), 0.1), _rand(seed + 3, (kv_heads * D,), 0.1)

    def project(h):
        x = h.astype(jnp.float32)
        k = (x @ jnp.asarray(wk) + jnp.asarray(bk)).reshape(*h.shape[:-1], kv_heads, D)
        v = (x @ jnp.asarray(wv) + jnp.asarray(bv)).reshape(*h.shape[:-1], kv_heads, D)
        return k.astype(h.dtype), v.astype(h.dtype)

    return project, (wk, bk, wv, bv)


def _adaption_reference(a, prompt, gate, weights):
    """LLaMA-Adapter per HF ``AdaptedAttention``, in numpy: ``gate * softmax(q ak^T / sqrt(d)) av``
    with the projected prompt repeated per query-head group."""
    wk, bk, wv, bv = (np.asarray(w, np.float64) for w in weights)
    p = np.asarray(prompt, np.float64)
    n, heads, kv_heads = p.shape[0], a.query.shape[2], wk.shape[1] // D
    ak = np.repeat((p @ wk + bk).reshape(n, kv_heads, D), heads // kv_heads, axis=1)
    av = np.repeat((p @ wv + bv).reshape(n, kv_heads, D), heads // kv_heads, axis=1)
    q = np.asarray(a.query, np.float64)
    s = np.einsum("bthd,nhd->bhtn", q, ak) / np.sqrt(D)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return float(np.asarray(gate)[0]) * np.einsum("bhtn,nhd->bthd", w, av)


@pytest.mark.parametrize("kv_heads", [KV, H, 1])
def test_adaption_prompt_formula(kv_heads):
    method = AdaptionPrompt(adapter_len=4, adapter_layers=2)
    site = _site(L - 1, kv_heads=kv_heads)
    params = method.init(jax.random.key(0), site, {}, {})[0]
    params = {"adaption_prompt": params["adaption_prompt"], "adaption_gate": jnp.array([0.7])}
    project, weights = _projection(110, kv_heads)
    a = _attention(seed=11, kv_heads=kv_heads, project=project)
    out = _apply(method, params, {}, site, a, call=softmax_attention)
    ref = np.asarray(softmax_attention(a)) + _adaption_reference(a, params["adaption_prompt"],
                                                                  params["adaption_gate"], weights)
    _close(out, ref, 1e-4)


def test_adaption_prompt_identity_at_zero_gate():
    method = AdaptionPrompt(adapter_len=4, adapter_layers=1)
    site = _site(L - 1)
    params, updates = method.init(jax.random.key(0), site, {}, {})
    assert updates == {} and not bool(params["adaption_gate"].any())
    assert float(jnp.std(params["adaption_prompt"])) > 0.5  # N(0, 1)
    assert method.param_shapes(site) == {"adaption_gate": (1,), "adaption_prompt": (4, F)}
    project, _ = _projection(120)
    a = _attention(seed=12, project=project)
    np.testing.assert_array_equal(_apply(method, params, {}, site, a, call=softmax_attention),
                                  softmax_attention(a))


def test_adaption_prompt_dtype_and_helper():
    project, _ = _projection(130)
    a = _attention(seed=13, project=project)
    a16 = a._replace(query=a.query.astype(jnp.bfloat16), hidden=a.hidden.astype(jnp.bfloat16))
    method = AdaptionPrompt(adapter_len=3, adapter_layers=1)
    site = _site(L - 1)
    params = {"adaption_prompt": jnp.asarray(_rand(131, (3, F))), "adaption_gate": jnp.array([1.0])}
    out = _apply(method, params, {}, site, a16, call=lambda a: a.query)
    assert out.dtype == jnp.bfloat16
    k, v = project(params["adaption_prompt"][None])
    _close(out, np.asarray(a16.query, np.float32) + np.asarray(prompt_attention(
        a.query, k[0], v[0], params["adaption_gate"])), 0.1)


def test_adaption_prompt_placement_and_errors():
    method = AdaptionPrompt(adapter_len=2, adapter_layers=2)
    assert [method.applies_to(s) for s in _sites()] == [False, True, True]
    method.check(_site(2))
    with pytest.raises(errors.InvalidConfigError, match="applies_to"):
        method.check(_site(0))
    with pytest.raises(errors.InvalidConfigError, match="model has 3"):
        AdaptionPrompt(adapter_len=2, adapter_layers=4).check(_site(2))
    with pytest.raises(errors.InvalidConfigError, match="features"):
        method.check(dataclasses.replace(_site(2), features=0))
    with pytest.raises(errors.UnsupportedLayerError):
        method.check(InputSite(path="i", layer="InputTap", features=F, vocab_size=9))
    with pytest.raises(errors.InvalidConfigError):
        AdaptionPrompt(adapter_len=0, adapter_layers=1)
    with pytest.raises(TypeError):
        AdaptionPrompt(adapter_len=2)  # both are required, as in HF
    params = method.init(jax.random.key(0), _site(2), {}, {})[0]
    with pytest.raises(errors.MissingHookError, match="project="):
        _apply(method, params, {}, _site(2), _attention())


# --- against the real HF PEFT ---------------------------------------------------------------------------
@_interop
def test_prefix_layout_matches_hf_peft():
    """Our per-layer prefixes == HF's ``get_prompt`` cache (GQA Llama), and fold == HF's saved table."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=40,
                                   num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
                                   head_dim=D, max_position_embeddings=32)
    hf = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=12))
    enc = hf.prompt_encoder["default"]
    shared = {"prefix_embedding": enc.embedding.weight, "prefix_hidden_kernel": enc.transform[0].weight.T,
              "prefix_hidden_bias": enc.transform[0].bias, "prefix_out_kernel": enc.transform[2].weight.T,
              "prefix_out_bias": enc.transform[2].bias}
    shared = {k: jnp.asarray(v.detach().numpy()) for k, v in shared.items()}
    method = PrefixTuning(num_virtual_tokens=N, projection=True, encoder_hidden_size=12)
    assert {k: v.shape for k, v in shared.items()} == {
        k: v.shape for k, v in method.init_shared_params(jax.random.key(0), _sites(), jnp.float32).items()}
    with torch.no_grad():
        cache = hf.get_prompt(batch_size=B)
        saved = hf.get_prompt_embedding_to_save("default").numpy()
    for site in _sites():
        layer = cache.layers[site.index]
        pk, pv = method.prefix({}, shared, site)
        for b in range(B):
            _close(pk, layer.keys[b].numpy().transpose(1, 0, 2))
            _close(pv, layer.values[b].numpy().transpose(1, 0, 2))
    _close(to_prompt_embeddings(fold(method, shared, _sites())[1], _sites()), saved)


@_interop
def test_adaption_prompt_matches_hf_peft():
    """HF's ``AdaptedAttention`` around a GQA ``LlamaAttention`` adds ``o_proj(ours)``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from peft.tuners.adaption_prompt.layer import AdaptedAttention
    from transformers.models.llama import modeling_llama as ml

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=F, num_attention_heads=H, num_key_value_heads=KV,
                                   head_dim=D, num_hidden_layers=1, intermediate_size=8)
    cfg._attn_implementation = "eager"
    attn = ml.LlamaAttention(cfg, layer_idx=0).eval()
    adapted = AdaptedAttention("llama", 4, attn)
    with torch.no_grad():
        adapted.adaption_gate.fill_(0.6)
        hidden = torch.randn(B, T, F)
        pos = torch.arange(T)[None].expand(B, T)
        cos, sin = ml.LlamaRotaryEmbedding(cfg)(hidden, pos)
        kwargs = dict(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)
        base = attn(**kwargs)[0]
        got = adapted(**kwargs)[0]
        q = attn.q_proj(hidden).view(B, T, H, D).transpose(1, 2)
        q, _ = ml.apply_rotary_pos_emb(q, q, cos, sin)
    q = jnp.asarray(q.transpose(1, 2).numpy())

    def project(h):
        with torch.no_grad():
            t = torch.from_numpy(np.array(h))
            k, v = attn.k_proj(t), attn.v_proj(t)
        return (jnp.asarray(k.numpy()).reshape(*h.shape[:-1], KV, D),
                jnp.asarray(v.numpy()).reshape(*h.shape[:-1], KV, D))

    params = {"adaption_prompt": jnp.asarray(adapted.adaption_prompt.detach().numpy()[0]),
              "adaption_gate": jnp.asarray(adapted.adaption_gate.detach().numpy())}
    a = Attention(q, jnp.zeros((B, T, KV, D)), jnp.zeros((B, T, KV, D)), jnp.ones((B, T, T), bool),
                  hidden=jnp.asarray(hidden.numpy()), project=project)
    method = AdaptionPrompt(adapter_len=4, adapter_layers=1)
    heads = _apply(method, params, {}, _site(0, num_layers=1), a, call=lambda a: jnp.zeros_like(a.query))
    wo = attn.o_proj.weight.detach().numpy()
    _close(np.asarray(heads).reshape(B, T, H * D) @ wo.T, (got - base).numpy(), 1e-4)
