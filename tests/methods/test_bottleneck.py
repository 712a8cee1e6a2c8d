"""Bottleneck adapters (AdapterHub's BnConfig family): each placement against a hand-written numpy
version of the METHODS.md §2.1 formulas with random nonzero params, identity at init, gating and
scaling, per-block reduction factors, init statistics, parameter counts, presets and typed errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.methods import Context
from peft_jax.methods.base import ModuleSite
from peft_jax.methods.bottleneck import (
    DEPRECATED_ALIASES,
    PRESETS,
    AhName,
    Bottleneck,
    adapter_plus,
    adapterhub_names,
    double_seq_bn,
    layer_norm,
    locations,
    par_bn,
    preset,
    scaled_par_bn,
    seq_bn,
)
from peft_jax.methods.phm import Phm, compacter, compacter_pp
from peft_jax.methods.sites import Residual, ResidualSite
from peft_jax.ops import dense_op
from peft_jax.sites.run import run_site

D = 16
TOL = 2e-5


def site(index=0, d=D, role="ffn"):
    return ResidualSite(path=f"layers/{index}/{role}", layer="Block", features=d, role=role, index=index)


def rand(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_params(method, s, seed=10, scale=0.3):
    """Every param of ``param_shapes`` random (LN scales and scalings around 1)."""
    leaves, tree = jax.tree.flatten(method.param_shapes(s), is_leaf=lambda v: isinstance(v, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(method.param_shapes(s), is_leaf=lambda v: isinstance(v, tuple))[0]]
    out = []
    for i, (path, shape) in enumerate(zip(paths, leaves)):
        around_one = "scale" in path or "scaling" in path
        out.append(rand(shape, seed + i, 0.2 if around_one else scale) + (1.0 if around_one else 0.0))
    return jax.tree.unflatten(tree, out)


def np_ln(h, scale=None, bias=None, eps=1e-5):
    h = np.asarray(h, np.float64)
    mu = h.mean(-1, keepdims=True)
    out = (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + eps)
    if scale is not None:
        out = out * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    return out


def np_f(p, h, act, scaling=1.0, gate=False):
    """METHODS §2.1: f(h) = up(act(down(h))) * scaling (* mean_seq sigmoid gate)."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h = np.asarray(h, np.float64)
    z = act(h @ P["down"]["kernel"] + P["down"]["bias"])
    out = (z @ P["up"]["kernel"] + P["up"]["bias"]) * (P["scaling"] if "scaling" in P else scaling)
    if gate:
        g = 1 / (1 + np.exp(-(h @ P["gate"]["kernel"] + P["gate"]["bias"])))
        out = out * g.mean(axis=1, keepdims=True)
    return out


def relu(z):
    return np.maximum(z, 0)


def swish(z):
    return z / (1 + np.exp(-z))


def close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol)


LN_P = {"scale": rand((D,), 90, 0.1) + 1.0, "bias": rand((D,), 91, 0.1)}


def model_norm(h):
    return layer_norm(h, LN_P)


def np_model_norm(h):
    return np_ln(h, LN_P["scale"], LN_P["bias"])


X = rand((2, 5, D), 1)  # the residual stream (sub-layer input)
Y = rand((2, 5, D), 2)  # the sub-layer output


def run(method, params, s, norm, shared=None, x=X, y=Y, ctx=Context()):
    return method.apply(params, shared or {}, s, lambda r: r.combine(), Residual(y, x, norm), {}, ctx)


# --- placements vs the §2.1 formulas ------------------------------------------------------------------
def test_seq_bn_formula_post_ln_and_pre_ln():
    m, s = seq_bn(reduction_factor=4), site()
    p = random_params(m, s)
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    # post-LN (BERT): LN(x + y + f(LN(x + y))); the residual around the adapter is y
    close(run(m, p, s, model_norm), np_model_norm(x + y + np_f(p, np_model_norm(x + y), relu)))
    # pre-LN (norm=None): the adapter reads the sum, x + y + f(x + y)
    close(run(m, p, s, None), x + y + np_f(p, x + y, relu))


def test_seq_bn_residual_variants():
    s = site()
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    m = seq_bn(reduction_factor=4, residual_before_ln="post_add")
    p = random_params(m, s)
    close(run(m, p, s, model_norm), np_model_norm(x + (x + y) + np_f(p, np_model_norm(x + y), relu)))
    m = seq_bn(reduction_factor=4, residual_before_ln=False)
    inner = np_model_norm(x + y)
    close(run(m, p, s, model_norm), np_model_norm(x + inner + np_f(p, inner, relu)))


def test_double_seq_bn_formula():
    m, s = double_seq_bn(reduction_factor=4), site(role="attention")
    p = random_params(m, s)
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    close(run(m, p, s, model_norm), np_model_norm(x + y + np_f(p, y, swish)))
    close(run(m, p, s, None), x + y + np_f(p, y, swish))


def test_par_bn_formula_reads_the_sublayer_input():
    m, s = par_bn(), site()
    assert m.size_at(s) == D // 2
    p = random_params(m, s)
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    close(run(m, p, s, model_norm), np_model_norm(x + y + np_f(p, x, relu, scaling=4.0)))
    close(run(m, p, s, None), x + y + np_f(p, x, relu, scaling=4.0), tol=1e-4)


def test_adapter_internal_layer_norms_and_no_original_ln_after():
    s = site()
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    m = double_seq_bn(reduction_factor=4, ln_before=True, ln_after=True)
    p = random_params(m, s)
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    f = np_f(p, np_ln(y, P["ln_before"]["scale"], P["ln_before"]["bias"]), swish)
    post = np_ln(f, P["ln_after"]["scale"], P["ln_after"]["bias"]) + y  # ln_after, then the residual
    close(run(m, p, s, model_norm), np_model_norm(x + post))
    m2 = double_seq_bn(reduction_factor=4, ln_after=True, adapter_residual_before_ln=True)
    p2 = random_params(m2, s)
    P2 = jax.tree.map(lambda a: np.asarray(a, np.float64), p2)
    close(run(m2, p2, s, None), x + np_ln(np_f(p2, y, swish) + y, P2["ln_after"]["scale"], P2["ln_after"]["bias"]))
    m3 = adapter_plus(reduction_factor=4, stochastic_depth=0.0)  # LN(x + y) -> adapter + its input; no LN after
    p3 = random_params(m3, s)
    h = np_model_norm(x + y)
    close(run(m3, p3, s, model_norm), h + np_f(p3, h, lambda z: np.asarray(jax.nn.gelu(z, approximate=False))))


def test_final_norm_goes_through_call():
    """The model's LN(h + x) is ``call(Residual(h, x, LN))``: an inner method sees the adapter's output."""
    m, s = double_seq_bn(reduction_factor=4), site()
    p = random_params(m, s)
    seen = []

    def call(r):
        seen.append(r)
        return r.combine() * 2.0

    out = m.apply(p, {}, s, call, Residual(Y, X, model_norm), {}, Context())
    assert len(seen) == 1 and seen[0].residual is X and seen[0].norm is model_norm
    close(seen[0].output, np.asarray(Y, np.float64) + np_f(p, Y, swish))
    close(out, 2.0 * np_model_norm(np.asarray(X, np.float64) + np.asarray(seen[0].output, np.float64)))


def test_two_adapters_fold_through_run_site():
    s = site()
    a, b = double_seq_bn(reduction_factor=4), par_bn()
    pa, pb = random_params(a, s, seed=20), random_params(b, s, seed=40)
    entries = [(a, pa, {}, Context()), (b, pb, {}, Context())]
    out = run_site(entries, s, lambda r: r.combine(), Residual(Y, X, None), {})
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    # b (outer) adds 4 f_b(x) to the output it hands to a (inner), which adds f_a of that
    h_b = y + np_f(pb, x, relu, scaling=4.0)
    close(out, x + h_b + np_f(pa, h_b, swish), tol=1e-4)


def test_module_site_sequential_and_parallel():
    op = dense_op(D, D)
    ms = ModuleSite(path="blocks/3/mlp", layer="Dense", param_shapes={"kernel": (D, D)}, op=op)
    w = rand((D, D), 5, 0.3)

    def call(x):
        return x @ w

    x = np.asarray(X, np.float64)
    y = x @ np.asarray(w, np.float64)
    m = seq_bn(reduction_factor=4)
    p = random_params(m, ms)
    close(m.apply(p, {}, ms, call, X, {}, Context()), y + np_f(p, y, relu))
    m = par_bn(reduction_factor=4)
    p = random_params(m, ms)
    close(m.apply(p, {}, ms, call, X, {}, Context()), y + np_f(p, x, relu, scaling=4.0))


# --- identity at init ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [seq_bn(init_weights="zero_up"), double_seq_bn(init_weights="zero_up"),
                                    par_bn(), scaled_par_bn(), seq_bn(init_weights="mam_adapter"),
                                    adapter_plus(init_weights="zero_up", reduction_factor=4),
                                    double_seq_bn(init_weights="zero_up", use_gating=True, scaling="channel")],
                         ids=lambda m: f"{m.init_weights}-{m.is_parallel}-{m.original_ln_before}-{m.use_gating}")
@pytest.mark.parametrize("norm", [None, model_norm], ids=["pre_ln", "post_ln"])
def test_identity_at_init(method, norm):
    s = site()
    params, base_updates = method.init(jax.random.key(0), s, {}, {})
    assert base_updates == {}
    assert float(jnp.abs(params["up"]["kernel"]).max()) == 0.0
    out = run_site([(method, params, {}, Context())], s, lambda r: r.combine(), Residual(Y, X, norm), {})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Residual(Y, X, norm).combine()))


def test_bert_init_is_not_identity_and_zero_up_still_trains():
    s = site()
    p, _ = seq_bn().init(jax.random.key(0), s, {}, {})
    assert float(jnp.abs(run(seq_bn(), p, s, None) - (X + Y)).max()) > 1e-4
    m = seq_bn(init_weights="zero_up", reduction_factor=4)
    p, _ = m.init(jax.random.key(0), s, {}, {})
    g = jax.grad(lambda p: jnp.sum(run(m, p, s, model_norm) ** 2))(p)
    assert float(jnp.abs(g["up"]["kernel"]).max()) > 0


# --- gating, scaling, dropout -------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [0.5, "learned", "channel"])
def test_scaling_modes(scaling):
    m, s = double_seq_bn(reduction_factor=4, scaling=scaling), site()
    p = random_params(m, s)
    shapes = m.param_shapes(s)
    if scaling == "learned":
        assert shapes["scaling"] == (1,) and float(m.init(jax.random.key(0), s, {}, {})[0]["scaling"][0]) == 1.0
    elif scaling == "channel":
        assert shapes["scaling"] == (D,)
        assert np.all(np.asarray(m.init(jax.random.key(0), s, {}, {})[0]["scaling"]) == 1.0)
    else:
        assert "scaling" not in shapes
    y = np.asarray(Y, np.float64)
    close(run(m, p, s, None), np.asarray(X, np.float64) + y + np_f(p, y, swish, scaling=0.5))


@pytest.mark.parametrize("parallel", [False, True])
def test_gating_mean_over_sequence(parallel):
    m = (par_bn if parallel else double_seq_bn)(reduction_factor=4, use_gating=True)
    s = site()
    p = random_params(m, s)
    assert m.param_shapes(s)["gate"] == {"bias": (1,), "kernel": (D, 1)}
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    h = x if parallel else y  # the gate reads the adapter's input
    f = np_f(p, h, relu if parallel else swish, scaling=4.0 if parallel else 1.0, gate=True)
    close(run(m, p, s, model_norm), np_model_norm(x + y + f))
    g = 1 / (1 + np.exp(-(h @ np.asarray(p["gate"]["kernel"], np.float64) + np.asarray(p["gate"]["bias"]))))
    assert g.mean(axis=1, keepdims=True).shape == (2, 1, 1)  # one gate per example


def test_dropout_only_with_a_key():
    m, s = double_seq_bn(reduction_factor=4, dropout=0.5), site()
    assert m.needs_rng
    p = random_params(m, s)
    eval_out = run(m, p, s, None)
    close(eval_out, np.asarray(X, np.float64) + np.asarray(Y, np.float64) + np_f(p, Y, swish))
    train = run(m, p, s, None, ctx=Context(jax.random.key(3)))
    delta = np.asarray(train - X - Y)
    ref = np_f(p, Y, swish)
    dropped = np.isclose(delta, 0.0, atol=1e-6)
    assert 0.3 < dropped.mean() < 0.7
    close(delta[~dropped], 2.0 * ref[~dropped], tol=1e-4)


# --- reduction factors ----------------------------------------------------------------------------------
def test_per_block_reduction_factors():
    m = Bottleneck(reduction_factor={"1": 8, "default": 2}, features=None)
    assert [m.size_at(site(i)) for i in range(3)] == [8, 2, 8]
    assert m.param_shapes(site(1))["down"]["kernel"] == (D, 2)
    ms = ModuleSite(path="encoder/layers/1/mlp", layer="Dense", param_shapes={}, op=dense_op(D, D))
    assert m.size_at(ms) == 2
    assert Bottleneck(reduction_factor={1: 4, "default": 2}) == Bottleneck(reduction_factor={"1": 4, "default": 2})
    hash(m)  # the mapping is stored as pairs: the config stays hashable
    no_default = Bottleneck(reduction_factor={"0": 4})
    assert no_default.size_at(site(0)) == 4
    with pytest.raises(errors.InvalidConfigError, match="no entry for block 2"):
        no_default.check(site(2))
    assert Bottleneck(reduction_factor=32).size_at(site(d=768)) == 24
    assert Bottleneck(reduction_factor=0.5).size_at(site()) == 2 * D
    assert Bottleneck(reduction_factor=64).size_at(site()) == 1  # at least 1, as AdapterHub
    assert Bottleneck(bottleneck_size=3, reduction_factor=2).size_at(site()) == 3


# --- inits ----------------------------------------------------------------------------------------------
def _init(method, d=256):
    return method.init(jax.random.key(7), site(d=d), {}, {})[0]


def test_init_statistics():
    d = 256
    bert = _init(seq_bn(reduction_factor=2, use_gating=True), d)
    for name in ("down", "up", "gate"):
        assert abs(float(bert[name]["kernel"].std()) - 0.02) < 3e-3
        assert float(jnp.abs(bert[name]["bias"]).max()) == 0.0
    mam = _init(par_bn(use_gating=True), d)
    assert float(jnp.abs(mam["up"]["kernel"]).max()) == 0.0 and float(jnp.abs(mam["up"]["bias"]).max()) == 0.0
    bound = 1 / math.sqrt(d)
    assert float(jnp.abs(mam["down"]["kernel"]).max()) <= bound
    assert abs(float(mam["down"]["kernel"].std()) - bound / math.sqrt(3)) < 5e-3
    assert abs(float(mam["gate"]["kernel"].std()) - 0.02) < 6e-3
    hou = _init(seq_bn(reduction_factor=2, init_weights="houlsby", use_gating=True), d)
    for name in ("down", "up"):
        k = hou[name]["kernel"]
        assert float(jnp.abs(k).max()) <= 2e-2
        assert abs(float(k.std()) - 0.0088) < 1e-3  # std of N(0, 1e-2) truncated at 2 sigma
        assert float(jnp.abs(hou[name]["bias"]).max()) == 0.0
    # AdapterHub leaves the gate at torch's nn.Linear default under "houlsby"
    assert float(jnp.abs(hou["gate"]["kernel"]).max()) <= bound and float(jnp.abs(hou["gate"]["bias"]).max()) > 0
    ln = _init(seq_bn(ln_before=True, ln_after=True), d)
    assert np.all(np.asarray(ln["ln_before"]["scale"]) == 1) and np.all(np.asarray(ln["ln_after"]["bias"]) == 0)


def test_init_weights_seed_gives_every_site_the_same_init():
    m = seq_bn(reduction_factor=4, init_weights_seed=3)
    a = m.init(jax.random.key(0), site(0), {}, {})[0]
    b = m.init(jax.random.key(1), site(5), {}, {})[0]
    np.testing.assert_array_equal(np.asarray(a["down"]["kernel"]), np.asarray(b["down"]["kernel"]))


def test_params_take_the_base_dtype():
    ms = ModuleSite(path="mlp", layer="Dense", param_shapes={"kernel": (D, D)}, op=dense_op(D, D))
    p, _ = seq_bn(reduction_factor=4).init(jax.random.key(0), ms, {"kernel": jnp.ones((D, D), jnp.bfloat16)}, {})
    assert p["down"]["kernel"].dtype == jnp.bfloat16


# --- counts, names, presets -----------------------------------------------------------------------------
def _count(tree):
    return sum(math.prod(s) for s in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, tuple)))


@pytest.mark.parametrize("factory", [seq_bn, double_seq_bn, par_bn])
def test_param_count_per_location(factory):
    d = 64
    m = factory()
    k = m.size_at(site(d=d))
    assert _count(m.param_shapes(site(d=d))) == 2 * d * k + k + d


def test_houlsby_model_count():
    d, L = 64, 3
    m = double_seq_bn()
    k = d // 16
    sites = [site(i, d, role) for i in range(L) for role in locations("double_seq_bn")]
    assert sum(_count(m.param_shapes(s)) for s in sites) == 2 * L * (2 * d * k + k + d)


@pytest.mark.parametrize("method", [
    seq_bn(), seq_bn(ln_before=True, ln_after=True, use_gating=True, scaling="learned"),
    par_bn(scaling="channel"), compacter(), compacter_pp(phm=Phm(shared_phm_rule=False, factorized_phm_rule=True)),
    compacter(phm=Phm(shared_W_phm=True, factorized_phm_W=False)), compacter(phm=Phm(phm_bias=False)),
], ids=range(7))
def test_adapterhub_names_cover_every_param(method):
    s = site(d=128)
    names = adapterhub_names(method)
    flat = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        method.param_shapes(s), is_leaf=lambda v: isinstance(v, tuple))[0]}
    shared = {**method.init_shared(jax.random.key(0), [s], jnp.float32),
              **method.init_shared_params(jax.random.key(0), [s], jnp.float32)}
    assert {k for k, v in names.items() if not v.shared} == flat
    assert {k.removeprefix("shared/") for k, v in names.items() if v.shared} == set(shared)
    assert all(v.transpose == k.endswith("kernel") for k, v in names.items())


def test_adapterhub_names_values():
    names = adapterhub_names(seq_bn(ln_before=True, use_gating=True, scaling="channel"))
    assert names["ln_before/scale"] == AhName("adapter_norm_before.weight")
    assert names["down/kernel"] == AhName("adapter_down.1.weight", transpose=True)
    assert names["up/kernel"] == AhName("adapter_up.weight", transpose=True)
    assert names["gate/bias"] == AhName("gate.bias") and names["scaling"] == AhName("scaling")
    assert adapterhub_names(seq_bn())["down/bias"].key == "adapter_down.0.bias"
    c = adapterhub_names(compacter())
    assert c["down/w_left"] == AhName("adapter_down.0.W_left") and c["up/bias"] == AhName("adapter_up.b")
    assert c["shared/phm_rule"] == AhName("phm_rule", shared=True)


def test_presets_aliases_and_locations():
    assert preset("pfeiffer") == seq_bn() and preset("houlsby") == double_seq_bn()
    assert preset("parallel") == par_bn() and preset("scaled_parallel") == scaled_par_bn()
    assert set(DEPRECATED_ALIASES) == {"pfeiffer", "houlsby", "parallel", "scaled_parallel"}
    assert locations("seq_bn") == ("ffn",) and locations("double_seq_bn") == ("attention", "ffn")
    assert locations("par_bn") == locations("scaled_parallel") == ("ffn",)
    assert locations("compacter") == ("attention", "ffn") and locations("compacter++") == ("ffn",)
    assert set(PRESETS) >= {"seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "compacter", "compacter++"}
    s = seq_bn()
    assert (s.reduction_factor, s.non_linearity, s.original_ln_before, s.residual_before_ln) == (16, "relu", True, True)
    h = double_seq_bn()
    assert (h.reduction_factor, h.non_linearity, h.original_ln_before) == (16, "swish", False)
    p = par_bn()
    assert (p.reduction_factor, p.init_weights, p.scaling, p.is_parallel) == (2, "mam_adapter", 4.0, True)
    assert par_bn(scaling=2).scaling == 2.0 and seq_bn(non_linearity="gelu").non_linearity == "gelu"
    with pytest.raises(errors.UnknownNameError, match="seq_bn"):
        preset("pfeifer")


# --- typed errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"reduction_factor": 0}, "reduction_factor"),
    ({"reduction_factor": {"x": 2}}, "block indices"),
    ({"reduction_factor": {"1": -1}}, "reduction_factor"),
    ({"reduction_factor": {}}, "empty"),
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"non_linearity": "relux"}, "non_linearity"),
    ({"scaling": "learnt"}, "scaling"),
    ({"scaling": True}, "scaling"),
    ({"residual_before_ln": "pre_add"}, "residual_before_ln"),
    ({"residual_before_ln": "post_add"}, "original_ln_before"),
    ({"init_weights": "xavier"}, "init_weights"),
    ({"dropout": 1.0}, "dropout"),
    ({"stochastic_depth": -0.1}, "stochastic_depth"),
    ({"use_gating": 1}, "use_gating"),
    ({"init_weights_seed": "1"}, "init_weights_seed"),
    ({"phm": {"phm_dim": 4}}, "phm"),
    ({"phm": Phm(), "init_weights": "mam_adapter"}, "PHM"),
    ({"features": 0}, "features"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        Bottleneck(**kwargs)


def test_bad_sites():
    plain = ModuleSite(path="blocks/0/mixer", layer="Mixer", param_shapes={})
    with pytest.raises(errors.InvalidConfigError, match="features="):
        seq_bn().check(plain)
    seq_bn(features=D).check(plain)
    wide = ModuleSite(path="blocks/0/up", layer="Dense", param_shapes={}, op=dense_op(D, 2 * D))
    seq_bn().check(wide)
    with pytest.raises(errors.InvalidConfigError, match="parallel"):
        par_bn().check(wide)
    with pytest.raises(errors.InvalidConfigError, match="disagrees"):
        seq_bn(features=D + 1).check(site())
    from peft_jax.methods.base import LinearSite

    with pytest.raises(errors.UnsupportedLayerError):
        seq_bn().check(LinearSite(path="q", op=dense_op(D, D), layer="Dense", has_bias=False))
