"""Gated LoRA (UniPELT's LoRA, AdapterHub ``LoRAConfig(use_gating=True)``): pure-JAX tests on tiny
shapes with random nonzero params, against numpy transcriptions of AdapterHub's ``LoRA.forward``
(one gate) and ``LoRAMergedLinear.forward`` (one gate per block of outputs), plus init, typed
errors, `LoraConfig(use_gating=True)` routing, `unipelt`, and both front-ends (merge refuses).
The parity with the real AdapterHub on BERT is in tests/interop/test_adapterhub.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.methods.base import Context, LinearSite, is_mergeable
from peft_jax.methods.config import LoraConfig
from peft_jax.methods.dora import Dora
from peft_jax.methods.gated_lora import GatedLora
from peft_jax.methods.initializers import Gaussian, OLoRA, PiSSA
from peft_jax.methods.lora import Lora, input_dropout
from peft_jax.methods.recipes import unipelt
from peft_jax.ops import ContractionOp, ConvOp, EmbedOp, dense_op

B, T, IN, OUT, R = 2, 5, 6, 12, 3
TOL = 1e-5


def _rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * np.float32(scale)


def _site(op=None, path="blk/q"):
    return LinearSite(path=path, op=op or dense_op(IN, OUT), layer="Linear", has_bias=True)


def _params(method, site, seed=0):
    """Init, then every param replaced by seeded noise (so B and the gate are not at their init)."""
    params, _ = method.init(jax.random.key(seed), site, {"kernel": jnp.zeros(site.op.kernel_shape)}, {})
    leaves, tree = jax.tree.flatten(params)
    return jax.tree.unflatten(tree, [jnp.asarray(_rand(seed + i + 1, x.shape, 0.7)) for i, x in enumerate(leaves)])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _ah_forward(x, w, bias, params, heads):
    """AdapterHub in numpy (float64): ``layer(x) + ((x A^T) B^T) * gate``, with ``A (r, in)``,
    ``B (out, r)``, ``gate = mean_t sigmoid(Linear(in, heads)(x))`` and, for ``heads > 1``,
    ``gate.repeat_interleave(out // heads)`` (``LoRAMergedLinear``)."""
    x = np.asarray(x, np.float64)
    lora_A, lora_B = np.asarray(params["lora_a"], np.float64).T, np.asarray(params["lora_b"], np.float64).T
    gate_w = np.asarray(params["lora_gate"]["kernel"], np.float64).T
    gate_b = np.asarray(params["lora_gate"]["bias"], np.float64)
    hidden = x @ lora_A.T @ lora_B.T
    gate = _sigmoid(x @ gate_w.T + gate_b).mean(axis=1)  # [b, heads]
    if heads == 1:
        hidden = hidden * gate[:, None, :]  # AdapterHub: gate.unsqueeze(-1) -> [b, 1, 1]
    else:
        hidden = hidden * np.repeat(gate, w.shape[1] // heads, axis=-1)[:, None, :]
    return x @ np.asarray(w, np.float64) + np.asarray(bias, np.float64) + hidden


def _apply(method, params, site, x, w, bias, ctx=Context()):
    return method.apply(params, {}, site, lambda v: v @ w + bias, x, {"kernel": w, "bias": bias}, ctx)


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


# --- the formula ---------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 3, 4])
def test_formula_matches_adapterhub(heads):
    method, site = GatedLora(lora=Lora(rank=R, alpha=16.0), gating_heads=heads), _site()
    params = _params(method, site)
    x, w, bias = jnp.asarray(_rand(10, (B, T, IN))), jnp.asarray(_rand(11, (IN, OUT))), jnp.asarray(_rand(12, (OUT,)))
    _close(_apply(method, params, site, x, w, bias), _ah_forward(x, w, bias, params, heads))


def test_gate_replaces_the_scale_and_ignores_alpha():
    site = _site()
    params = _params(GatedLora(lora=Lora(rank=R)), site)
    x, w, bias = jnp.asarray(_rand(1, (B, T, IN))), jnp.zeros((IN, OUT)), jnp.zeros((OUT,))
    ys = [_apply(GatedLora(lora=Lora(rank=R, alpha=a)), params, site, x, w, bias) for a in (1.0, 2.0, 64.0)]
    _close(ys[0], ys[1], 0)
    _close(ys[0], ys[2], 0)
    g = np.asarray(GatedLora(lora=Lora(rank=R)).gate(params, site, x))
    assert g.shape == (B, 1) and np.all((g > 0) & (g < 1))
    lora = Lora(rank=R).apply(params, {}, site, lambda v: v @ w, x, {"kernel": w}, Context())
    _close(ys[0], np.asarray(lora) / Lora(rank=R).scale * g[:, :, None])  # g in place of alpha / r


def test_gate_averages_over_the_sequence_padding_included():
    method, site = GatedLora(lora=Lora(rank=R)), _site()
    params = _params(method, site)
    x = _rand(3, (B, T, IN))
    g = np.asarray(method.gate(params, site, jnp.asarray(x)))
    logits = x.astype(np.float64) @ np.asarray(params["lora_gate"]["kernel"]) + np.asarray(params["lora_gate"]["bias"])
    _close(g, _sigmoid(logits).mean(axis=1))
    x2 = x.copy()
    x2[0, -1] = 0.0  # a "padding" row still counts
    assert not np.allclose(np.asarray(method.gate(params, site, jnp.asarray(x2)))[0], g[0])


def test_extra_leading_axes_keep_their_own_gate():
    """[b, t, e, in]: the mean runs over t only, each e keeps its gate."""
    method, site = GatedLora(lora=Lora(rank=R)), _site()
    params = _params(method, site)
    x, w, bias = jnp.asarray(_rand(4, (B, T, 2, IN))), jnp.asarray(_rand(5, (IN, OUT))), jnp.zeros((OUT,))
    y = _apply(method, params, site, x, w, bias)
    for e in range(2):
        _close(y[:, :, e], _ah_forward(x[:, :, e], w, bias, params, 1))


def test_dense_general_over_two_input_axes():
    op = ContractionOp(in_shape=(2, 3), out_shape=(4, 3), axis=(-2, -1))
    method, site = GatedLora(lora=Lora(rank=R), gating_heads=2), _site(op)
    params = _params(method, site)
    x, w = jnp.asarray(_rand(6, (B, T, 2, 3))), jnp.asarray(_rand(7, (2, 3, 4, 3)))
    y = method.apply(params, {}, site, lambda v: op.apply_kernel(v, w), x, {"kernel": w}, Context())
    flat = {"lora_a": params["lora_a"].reshape(6, R), "lora_b": params["lora_b"].reshape(R, 12),
            "lora_gate": {"kernel": params["lora_gate"]["kernel"].reshape(6, 2),
                          "bias": params["lora_gate"]["bias"]}}
    want = _ah_forward(x.reshape(B, T, 6), w.reshape(6, 12), np.zeros(12), flat, 2)
    _close(y.reshape(B, T, 12), want)


def test_dropout_hits_the_low_rank_path_not_the_gate():
    method, site = GatedLora(lora=Lora(rank=R, dropout=0.5)), _site()
    assert method.needs_rng
    params = _params(method, site)
    x, w, bias = jnp.asarray(_rand(8, (B, T, IN))), jnp.asarray(_rand(9, (IN, OUT))), jnp.zeros((OUT,))
    key = jax.random.key(3)
    y = _apply(method, params, site, x, w, bias, Context(key))
    dropped = np.asarray(input_dropout(x, 0.5, key), np.float64)
    g = np.asarray(method.gate(params, site, x), np.float64)  # from the undropped input
    delta = dropped @ np.asarray(params["lora_a"]) @ np.asarray(params["lora_b"])
    _close(y, np.asarray(x @ w, np.float64) + g[:, :, None] * delta)
    _close(_apply(method, params, site, x, w, bias), _ah_forward(x, w, bias, params, 1))  # eval: no dropout


def test_kv_cache_step_gates_its_own_tokens():
    """A decoding step ``[b, 1, in]`` averages over that step only (as AdapterHub, per call)."""
    method, site = GatedLora(lora=Lora(rank=R)), _site()
    params = _params(method, site)
    x = jnp.asarray(_rand(13, (B, T, IN)))
    _close(method.gate(params, site, x[:, -1:]),
           _sigmoid(np.asarray(x[:, -1], np.float64) @ np.asarray(params["lora_gate"]["kernel"])
                    + np.asarray(params["lora_gate"]["bias"])))


# --- init ----------------------------------------------------------------------------------------
def test_init_is_identity_with_adapterhub_gate_init():
    method, site = GatedLora(lora=Lora(rank=R), gating_heads=3), _site(dense_op(400, 30))
    base = {"kernel": jnp.asarray(_rand(0, (400, 30)))}
    params, updates = method.init(jax.random.key(0), site, base, {})
    assert updates == {}
    assert {k: jax.tree.map(jnp.shape, v) for k, v in params.items()} == {
        "lora_a": (400, R), "lora_b": (R, 30), "lora_gate": {"kernel": (400, 3), "bias": (3,)}}
    assert method.param_shapes(site) == {"lora_a": (400, R), "lora_b": (R, 30),
                                         "lora_gate": {"kernel": (400, 3), "bias": (3,)}}
    kernel, bias = np.asarray(params["lora_gate"]["kernel"]), np.asarray(params["lora_gate"]["bias"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002  # N(0, 0.02)
    assert np.all(np.abs(bias) <= 1 / np.sqrt(400)) and np.any(bias != 0)  # nn.Linear's default
    x = jnp.asarray(_rand(1, (B, T, 400)))
    y = method.apply(params, {}, site, lambda v: v @ base["kernel"], x, base, Context())
    _close(y, x @ base["kernel"], 0)  # B = 0


def test_params_take_the_base_dtype():
    method, site = GatedLora(lora=Lora(rank=R, init_weights=Gaussian())), _site()
    params, _ = method.init(jax.random.key(0), site, {"kernel": jnp.zeros((IN, OUT), jnp.bfloat16)}, {})
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    x = jnp.ones((B, T, IN), jnp.bfloat16)
    y = method.apply(params, {}, site, lambda v: v @ jnp.zeros((IN, OUT), jnp.bfloat16), x, {}, Context())
    assert y.dtype == jnp.bfloat16


# --- typed errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(gating_heads=0), "gating_heads"),
    (dict(gating_heads=True), "gating_heads"),
    (dict(lora=Lora(rank=2, use_rslora=True)), "use_rslora"),
    (dict(lora=Lora(rank=2, lora_bias=True)), "lora_bias"),
    (dict(lora=Lora(rank=2, init_weights=PiSSA())), "PiSSA"),
    (dict(lora=Lora(rank=2, init_weights=OLoRA())), "OLoRA"),
    (dict(lora=Dora()), "Lora"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        GatedLora(**kwargs)


def test_bad_sites():
    method = GatedLora(lora=Lora(rank=2))
    conv = LinearSite(path="c", op=ConvOp(in_shape=(3, 3, 4), out_shape=(8,), kernel_size=(3, 3)),
                      layer="Conv", has_bias=False)
    embed = LinearSite(path="e", op=EmbedOp(in_shape=(10,), out_shape=(4,)), layer="Embed", has_bias=False)
    for site in (conv, embed):
        with pytest.raises(errors.UnsupportedLayerError, match="Dense / Linear"):
            method.check(site)
    with pytest.raises(errors.InvalidConfigError, match="must divide"):
        GatedLora(lora=Lora(rank=2), gating_heads=5).check(_site())
    GatedLora(lora=Lora(rank=2), gating_heads=4).check(_site())


def test_inputs_without_a_sequence_axis_raise():
    method, site = GatedLora(lora=Lora(rank=R)), _site()
    params = _params(method, site)
    w = jnp.zeros((IN, OUT))
    with pytest.raises(errors.UnsupportedLayerError, match="no sequence axis"):
        method.apply(params, {}, site, lambda v: v @ w, jnp.ones((4, IN)), {"kernel": w}, Context())
    moved = _site(ContractionOp(in_shape=(IN,), out_shape=(OUT,), axis=(1,)))
    with pytest.raises(errors.UnsupportedLayerError, match="contracted input axes last"):
        method.apply(params, {}, moved, lambda v: v, jnp.ones((B, IN, T)), {"kernel": w}, Context())


def test_not_mergeable():
    assert not is_mergeable(GatedLora())
    assert not hasattr(GatedLora(), "merge")


# --- LoraConfig and unipelt ----------------------------------------------------------------------
def test_lora_config_routes_use_gating():
    cfg = LoraConfig(targets=["q"], rank=4, alpha=2.0, dropout=0.1, use_gating=True,
                     rank_pattern={".*v": 2})
    method = cfg.placements()[0].method_for("blk/q")
    assert method == GatedLora(lora=Lora(rank=4, alpha=2.0, dropout=0.1))
    assert cfg.placements()[0].method_for("blk/v").lora.rank == 2
    assert type(LoraConfig(targets=["q"]).placements()[0].method_for("q")) is Lora


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(use_rslora=True), "use_rslora"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(init=PiSSA()), "PiSSA"),
    (dict(init=OLoRA()), "OLoRA"),
    (dict(target_parameters=["experts/w_up"]), "target_parameters"),
])
def test_lora_config_rejects_gating_combos(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        LoraConfig(targets=["q"], use_gating=True, **kwargs)


def test_lora_config_use_gating_must_be_bool():
    with pytest.raises(errors.InvalidConfigError, match="use_gating"):
        LoraConfig(targets=["q"], use_gating="yes")


def test_unipelt_recipe_is_adapterhubs_defaults():
    from peft_jax.methods.bottleneck import Bottleneck
    from peft_jax.methods.prefix import PrefixTuning
    from peft_jax.models.encoder import ROLES

    prefix, seq_bn, lora = unipelt(roles=ROLES, lora_targets=["query", "value"]).placements()
    assert prefix.kind == "attention" and prefix.method == PrefixTuning(
        num_virtual_tokens=10, projection=True, encoder_hidden_size=512, use_gating=True, shared_gating=True)
    assert isinstance(seq_bn.method, Bottleneck) and seq_bn.targets == ROLES.ffn
    assert (seq_bn.method.reduction_factor, seq_bn.method.use_gating) == (16, True)
    assert lora.method_for("encoder/layer/0/attention/self/value") == GatedLora(lora=Lora(rank=8, alpha=2.0))
    with pytest.raises(errors.InvalidConfigError, match="targets"):
        unipelt(roles=ROLES, lora_targets=None)


# --- both front-ends -----------------------------------------------------------------------------
class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Linear(IN, OUT, rngs=rngs)
        self.out = nnx.Linear(OUT, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.q(x))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(nn.Dense(OUT, name="q")(x))


def _random_state(state, seed=20):
    return {k: _rand(seed + i, v.shape, 0.5) for i, (k, v) in enumerate(sorted(state.items()))}


def test_front_ends_agree_with_the_formula_and_refuse_to_merge():
    cfg = LoraConfig(targets=["q"], rank=R, use_gating=True)
    x = jnp.asarray(_rand(30, (B, T, IN)))

    model = NnxBlock(nnx.Rngs(0))
    peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(1))
    values = _random_state(peft_jax.nnx.adapter_state(model))
    assert sorted(values) == ["q/default/lora_a", "q/default/lora_b", "q/default/lora_gate/bias",
                              "q/default/lora_gate/kernel"]
    peft_jax.nnx.load_adapter_state(model, values)
    params = {"lora_a": values["q/default/lora_a"], "lora_b": values["q/default/lora_b"],
              "lora_gate": {"kernel": values["q/default/lora_gate/kernel"],
                            "bias": values["q/default/lora_gate/bias"]}}
    w, b = model.q.base_layer.kernel[...], model.q.base_layer.bias[...]
    hidden = _ah_forward(x, w, b, params, 1)
    want = hidden @ np.asarray(model.out.kernel[...], np.float64) + np.asarray(model.out.bias[...])
    _close(model(x), want)
    with pytest.raises(errors.NotMergeableError, match="GatedLora"):
        peft_jax.nnx.merge(model)
    _close(model(x), want)  # nothing changed

    module = LinenBlock()
    variables = {"params": {"q": {"kernel": w, "bias": b},
                            "out": {"kernel": model.out.kernel[...], "bias": model.out.bias[...]}}}
    handle = peft_jax.linen.attach(module, cfg).plan(variables, x)
    variables = handle.init(jax.random.key(2), variables)
    variables = handle.load_adapter_state(variables, values)
    _close(handle.apply(variables, x), want)
    with pytest.raises(errors.NotMergeableError, match="GatedLora"):
        handle.merge(variables)


def test_two_d_rows_raise_through_the_front_end():
    class Rows(nnx.Module):
        def __init__(self, rngs):
            self.q = nnx.Linear(IN, OUT, rngs=rngs)

        def __call__(self, x):
            return self.q(x.reshape(-1, IN)).reshape(*x.shape[:-1], OUT)  # tokens as rows

    model = Rows(nnx.Rngs(0))
    peft_jax.nnx.attach(model, LoraConfig(targets=["q"], rank=R, use_gating=True), rngs=nnx.Rngs(1))
    with pytest.raises(errors.UnsupportedLayerError, match="no sequence axis"):
        model(jnp.ones((B, T, IN)))
