"""PHM layers and Compacter / Compacter++: the Kronecker math against numpy, how the rule is shared,
inits, the METHODS.md §2.2 parameter counts (including the 0.047% of T5-base) and typed errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.methods import Context
from peft_jax.methods.bottleneck import Bottleneck, layer_norm, locations
from peft_jax.methods.phm import (
    Phm,
    compacter,
    compacter_pp,
    init_phm_rule,
    init_phm_w,
    kronecker,
    phm_linear,
    phm_weight,
)
from peft_jax.methods.sites import Residual, ResidualSite
from peft_jax.sites.run import run_site

TOL = 2e-5


def rand(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def site(index=0, d=128, role="ffn"):
    return ResidualSite(path=f"layers/{index}/{role}", layer="Block", features=d, role=role, index=index)


def randomize(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [rand(v.shape, seed + i, 0.5) for i, v in enumerate(leaves)])


def close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol)


def count(tree):
    return sum(math.prod(s) for s in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, tuple)))


def shared_of(method, sites, key=0):
    return {**method.init_shared(jax.random.key(key), sites, jnp.float32),
            **method.init_shared_params(jax.random.key(key), sites, jnp.float32)}


# --- the math --------------------------------------------------------------------------------------
def test_kronecker_and_phm_weight_match_numpy():
    a, b = rand((3, 2, 4), 0), rand((3, 5, 3), 1)
    k = kronecker(a, b)
    assert k.shape == (3, 10, 12)
    for i in range(3):
        close(k[i], np.kron(np.asarray(a[i]), np.asarray(b[i])))
    rule, w = rand((4, 4, 4), 2), rand((4, 3, 2), 3)
    close(phm_weight(rule, w), sum(np.kron(np.asarray(rule[i]), np.asarray(w[i])) for i in range(4)))


def test_phm_layer_forward_factorized():
    phm = Phm(phm_dim=2, phm_rank=3, factorized_phm_rule=True, shared_phm_rule=False)
    p = randomize(phm.init_layer(jax.random.key(0), 6, 4, jnp.float32), 10)
    assert {k: v.shape for k, v in p.items()} == {
        "w_left": (2, 3, 3), "w_right": (2, 3, 2), "phm_rule_left": (2, 2, 1), "phm_rule_right": (2, 1, 2),
        "bias": (4,)}
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    rule = P["phm_rule_left"] @ P["phm_rule_right"]
    w = P["w_left"] @ P["w_right"]
    h = sum(np.kron(rule[i], w[i]) for i in range(2))
    x = rand((5, 6), 4)
    close(phm.apply_layer(p, {}, "down", x), np.asarray(x, np.float64) @ h + P["bias"])
    close(phm_linear(x, jnp.asarray(rule, jnp.float32), jnp.asarray(w, jnp.float32)), np.asarray(x) @ h)


def _np_phm(P, S, phm, pos, h):
    rule = S["phm_rule"] if phm.shared_phm_rule else P["phm_rule"]
    w = P["w_left"] @ P["w_right"]
    H = sum(np.kron(rule[i], w[i]) for i in range(phm.phm_dim))
    return h @ H + P["bias"]


def _np_gelu(z):
    return np.asarray(jax.nn.gelu(jnp.asarray(z, jnp.float32), approximate=False), np.float64)


@pytest.mark.parametrize("name", ["compacter", "compacter++"])
def test_compacter_formulas(name):
    method = compacter() if name == "compacter" else compacter_pp()
    s = site(d=128)  # m = 128 // 32 = 4, n = 4
    params = randomize(method.init(jax.random.key(0), s, {}, {})[0], 20)
    shared = randomize(shared_of(method, [s]), 40)
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    S = {k: np.asarray(v, np.float64) for k, v in shared.items()}

    def f(h):
        return _np_phm(P["up"], S, method.phm, "up", _np_gelu(_np_phm(P["down"], S, method.phm, "down", h)))

    x, y = rand((2, 3, 128), 1), rand((2, 3, 128), 2)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ln = {"scale": rand((128,), 3, 0.1) + 1.0, "bias": rand((128,), 4, 0.1)}

    def np_ln(h):
        mu = h.mean(-1, keepdims=True)
        return ((h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
                * np.asarray(ln["scale"], np.float64) + np.asarray(ln["bias"], np.float64))

    for norm, np_norm in ((None, lambda h: h), (lambda h: layer_norm(h, ln), np_ln)):
        out = method.apply(params, shared, s, lambda r: r.combine(), Residual(y, x, norm), {}, Context())
        if name == "compacter":
            ref = np_norm(xn + yn + f(yn))
        else:
            ref = np_norm(xn + yn + f(np_norm(xn + yn)))
        close(out, ref, tol=1e-4)


# --- the shared rule --------------------------------------------------------------------------------
def test_one_rule_shared_by_every_layer_and_trainable():
    method = compacter()
    sites = [site(i, 128, role) for i in range(2) for role in ("attention", "ffn")]
    assert method.init_shared(jax.random.key(0), sites, jnp.float32) == {}
    shared = method.init_shared_params(jax.random.key(0), sites, jnp.float32)
    assert {k: v.shape for k, v in shared.items()} == {"phm_rule": (4, 4, 4)}
    params = [method.init(jax.random.key(i + 1), s, {}, {})[0] for i, s in enumerate(sites)]
    for p in params:  # no layer holds a rule of its own
        assert set(p["down"]) == set(p["up"]) == {"w_left", "w_right", "bias"}
    x, y = rand((1, 3, 128), 5), rand((1, 3, 128), 6)
    entries = [(method, p, shared, Context()) for p in params]

    def loss(shared):
        out = y
        for (m, p, _, c), s in zip(entries, sites):
            out = m.apply(p, shared, s, lambda r: r.combine(), Residual(out, x, None), {}, c)
        return jnp.sum(out ** 2)

    g = jax.grad(loss)(shared)
    assert float(jnp.abs(g["phm_rule"]).max()) > 0
    # changing the one shared rule changes every layer's output
    out_a = run_site(entries[:1], sites[0], lambda r: r.combine(), Residual(y, x, None), {})
    shared_b = {"phm_rule": shared["phm_rule"] * 3.0}
    out_b = run_site([(method, params[0], shared_b, Context())], sites[0], lambda r: r.combine(),
                     Residual(y, x, None), {})
    assert float(jnp.abs(out_a - out_b).max()) > 0


def test_learn_phm_false_freezes_the_rule():
    method = compacter_pp(phm=Phm(learn_phm=False, factorized_phm_rule=True))
    s = site()
    assert set(method.init_shared(jax.random.key(0), [s], jnp.float32)) == {"phm_rule_left", "phm_rule_right"}
    assert method.init_shared_params(jax.random.key(0), [s], jnp.float32) == {}
    per_layer = compacter_pp(phm=Phm(learn_phm=False, shared_phm_rule=False))
    p = randomize(per_layer.init(jax.random.key(0), s, {}, {})[0], 3)
    assert p["down"]["phm_rule"].shape == (4, 4, 4)
    x, y = rand((1, 2, 128), 1), rand((1, 2, 128), 2)
    g = jax.grad(lambda p: jnp.sum(per_layer.apply(p, {}, s, lambda r: r.combine(),
                                                   Residual(y, x, None), {}, Context()) ** 2))(p)
    assert float(jnp.abs(g["down"]["phm_rule"]).max()) == 0.0  # stop_gradient
    assert float(jnp.abs(g["down"]["w_left"]).max()) > 0


def test_shared_w_phm():
    method = compacter(phm=Phm(shared_W_phm=True, phm_rank=2))
    sites = [site(i) for i in range(3)]
    shared = method.init_shared_params(jax.random.key(0), sites, jnp.float32)
    assert {k: v.shape for k, v in shared.items()} == {
        "phm_rule": (4, 4, 4), "w_down_left": (4, 32, 2), "w_down_right": (4, 2, 1),
        "w_up_left": (4, 1, 2), "w_up_right": (4, 2, 32)}
    assert method.param_shapes(sites[0]) == {"down": {"bias": (4,)}, "up": {"bias": (128,)}}
    uneven = compacter(reduction_factor={"0": 16, "default": 32}, phm=Phm(shared_W_phm=True))
    with pytest.raises(errors.InvalidConfigError, match="shared_W_phm"):
        uneven.init_shared_params(jax.random.key(0), [site(0, 128), site(1, 128)], jnp.float32)


# --- inits --------------------------------------------------------------------------------------------
def test_inits():
    d, m = 512, 64
    phm = Phm()
    rule = init_phm_rule(jax.random.key(0), Phm(phm_dim=16), jnp.float32, shared=True)["phm_rule"]
    assert abs(float(rule.std()) - 1e-4) < 1e-5
    rule = init_phm_rule(jax.random.key(0), Phm(phm_dim=16), jnp.float32, shared=False)["phm_rule"]
    assert abs(float(rule.std()) - 1e-2) < 1e-3
    uni = init_phm_rule(jax.random.key(0), Phm(phm_dim=16, phm_c_init="uniform"), jnp.float32, shared=True)
    assert 0.9 < float(jnp.abs(uni["phm_rule"]).max()) <= 1.0
    w = init_phm_w(jax.random.key(1), Phm(phm_rank=8), d, m, jnp.float32)
    rows, cols = d // 4, 8
    bound = math.sqrt(6 / (rows + cols))
    assert float(jnp.abs(w["w_left"]).max()) <= bound
    assert abs(float(w["w_left"].std()) - math.sqrt(2 / (rows + cols))) < 0.1 * math.sqrt(2 / (rows + cols))
    wn = init_phm_w(jax.random.key(1), Phm(phm_rank=8, hypercomplex_nonlinearity="glorot-normal"), d, m, jnp.float32)
    assert float(jnp.abs(wn["w_left"]).max()) > bound  # normal tails
    full = init_phm_w(jax.random.key(1), Phm(factorized_phm_W=False, hypercomplex_nonlinearity="normal",
                                             phm_init_range=0.05), d, m, jnp.float32)
    assert full["w"].shape == (4, d // 4, m // 4) and abs(float(full["w"].std()) - 0.05) < 5e-3
    layer = phm.init_layer(jax.random.key(2), d, m, jnp.float32)
    assert float(jnp.abs(layer["bias"]).max()) == 0.0
    assert "bias" not in Phm(phm_bias=False).init_layer(jax.random.key(2), d, m, jnp.float32)


@pytest.mark.parametrize("phm", [Phm(), Phm(factorized_phm_W=False), Phm(shared_W_phm=True)], ids=range(3))
@pytest.mark.parametrize("norm", [None, lambda h: layer_norm(h, {"scale": jnp.ones(128), "bias": jnp.zeros(128)})],
                         ids=["pre_ln", "post_ln"])
def test_zero_up_is_identity_at_init(phm, norm):
    method = compacter(phm=phm, init_weights="zero_up")
    s = site(d=128)
    params, _ = method.init(jax.random.key(0), s, {}, {})
    shared = shared_of(method, [s])
    r = Residual(rand((2, 3, 128), 1), rand((2, 3, 128), 2), norm)
    out = method.apply(params, shared, s, lambda r: r.combine(), r, {}, Context())
    np.testing.assert_array_equal(np.asarray(out), np.asarray(r.combine()))


# --- counts -------------------------------------------------------------------------------------------
def _model_count(method, sites):
    per_site = sum(count(method.param_shapes(s)) for s in sites)
    shared = jax.eval_shape(lambda: method.init_shared_params(jax.random.key(0), sites, jnp.float32))
    return per_site + sum(math.prod(v.shape) for v in shared.values())


@pytest.mark.parametrize("name", ["compacter", "compacter++"])
def test_compacter_count_matches_the_formula(name):
    d, L, n = 128, 3, 4
    method = compacter() if name == "compacter" else compacter_pp()
    k = d // 32
    sites = [site(i, d, role) for i in range(L) for role in locations(name)]
    adapters = len(locations(name)) * L
    # per adapter: down (d -> k) and up (k -> d) PHM layers of rank 1: r(d + k) + k and r(k + d) + d
    assert _model_count(method, sites) == n ** 3 + adapters * (2 * (d + k) + k + d)


def _t5_base_total(vocab=32128, d=768, d_ff=3072, heads=12, d_kv=64, layers=12, buckets=32):
    attn = 4 * d * heads * d_kv  # q, k, v, o (no biases)
    ffn = 2 * d * d_ff  # wi, wo
    encoder = layers * (attn + ffn + 2 * d) + buckets * heads + d  # 2 norms per block + final norm
    decoder = layers * (2 * attn + ffn + 3 * d) + buckets * heads + d  # self + cross attention
    return vocab * d + encoder + decoder  # one tied embedding


def test_t5_base_budgets():
    total = _t5_base_total()
    assert total == 222_903_552
    layer_norms = (2 * 12 + 1 + 3 * 12 + 1) * 768
    assert layer_norms == 62 * 768
    # Compacter++: one adapter after the FFN of each of the 24 blocks (12 encoder + 12 decoder)
    sites = [site(i, 768) for i in range(24)]
    pp = _model_count(compacter_pp(), sites)
    assert pp == 4 ** 3 + 24 * (2 * (768 + 24) + 24 + 768)
    assert round(100 * (pp + layer_norms) / total, 3) == 0.047
    # Compacter: also after every self-attention
    sites2 = sites + [site(i, 768, "attention") for i in range(24)]
    assert round(100 * (_model_count(compacter(), sites2) + layer_norms) / total, 3) == 0.073


# --- errors -------------------------------------------------------------------------------------------
def test_phm_dim_must_divide_the_sizes():
    bad = compacter_pp(reduction_factor=4)
    with pytest.raises(errors.InvalidConfigError, match=r"phm_dim=4 must divide the PHM layer sizes 20 and 5.*"
                                                        r"try phm_dim=5"):
        bad.check(site(d=20))
    with pytest.raises(errors.InvalidConfigError, match="768 and 24"):
        compacter(phm=Phm(phm_dim=5)).check(site(d=768))
    compacter(phm=Phm(phm_dim=8)).check(site(d=768))


@pytest.mark.parametrize("kwargs, match", [
    ({"phm_dim": 0}, "phm_dim"),
    ({"phm_rank": 1.5}, "phm_rank"),
    ({"phm_init_range": 0.0}, "phm_init_range"),
    ({"phm_c_init": "xavier"}, "phm_c_init"),
    ({"hypercomplex_nonlinearity": "glorot"}, "hypercomplex_nonlinearity"),
    ({"learn_phm": "yes"}, "learn_phm"),
    ({"shared_W_phm": None}, "shared_W_phm"),
])
def test_bad_phm_values(kwargs, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        Phm(**kwargs)


def test_phm_refuses_inits_adapterhub_cannot_apply():
    for init in ("mam_adapter", "houlsby"):
        with pytest.raises(errors.InvalidConfigError, match="PHM"):
            compacter(init_weights=init)
    assert isinstance(compacter(init_weights="zero_up"), Bottleneck)


def test_presets():
    c, pp = compacter(), compacter_pp()
    assert (c.reduction_factor, c.non_linearity, c.original_ln_before, c.phm) == (32, "gelu", False, Phm())
    assert (pp.reduction_factor, pp.non_linearity, pp.original_ln_before, pp.phm) == (32, "gelu", True, Phm())
    assert Phm() == Phm(phm_dim=4, shared_phm_rule=True, factorized_phm_rule=False, learn_phm=True,
                        factorized_phm_W=True, shared_W_phm=False, phm_rank=1, phm_c_init="normal",
                        phm_init_range=1e-4, hypercomplex_nonlinearity="glorot-uniform", phm_bias=True)
