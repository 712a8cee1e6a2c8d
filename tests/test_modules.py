"""PEFT methods as Flax modules (`peft_jax.modules`): each module equals attaching its method to
the equivalent plain model (same variables -> same outputs, same layout), trains through the usual
filters, and merges where the front-end merges."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import peft_jax
from peft_jax import errors, hooks
from peft_jax.hooks import linen as linen_hooks
from peft_jax.methods import (
    IA3,
    Bottleneck,
    Lora,
    LoraConfig,
    Phm,
    compacter,
    compacter_pp,
    double_seq_bn,
    par_bn,
    place,
    scaled_par_bn,
    seq_bn,
)
from peft_jax.methods.bottleneck import adapter_plus
from peft_jax.methods.sites import Residual
from peft_jax.modules import linen as mlinen
from peft_jax.modules import nnx as mnnx

D, B, T = 8, 2, 3
X = jax.random.normal(jax.random.key(7), (B, T, D))
TARGET = jax.random.normal(jax.random.key(8), (B, T, D))  # (a post-LN output's loss vs 1 is constant)

LORAS = {
    "lora": {},
    "rslora_no_bias": {"use_rslora": True, "use_bias": False},
    "lora_bias": {"lora_bias": True},
    "dora": {"use_dora": True},
}
LORA_FIELDS = ("rank", "alpha", "use_rslora", "use_dora", "lora_bias")

BOTTLENECKS = {
    "seq_bn": seq_bn(reduction_factor=2),
    "seq_bn_ln": seq_bn(reduction_factor=2, ln_before=True, ln_after=True, residual_before_ln="post_add"),
    "double_seq_bn": double_seq_bn(reduction_factor=4),
    "par_bn": par_bn(),
    "scaled_par_bn_gated": scaled_par_bn(use_gating=True),
    "adapter_plus": adapter_plus(reduction_factor=2, stochastic_depth=0.0),
    "compacter": compacter(reduction_factor=2),
    "compacter++_factorized_rule": compacter_pp(reduction_factor=2, phm=Phm(phm_dim=2, factorized_phm_rule=True)),
    "compacter_shared_w": compacter(reduction_factor=2, phm=Phm(phm_dim=2, shared_W_phm=True)),
    "compacter_frozen_rule": compacter(reduction_factor=2, phm=Phm(phm_dim=2, learn_phm=False)),
}


def _lora_kwargs(case: dict) -> dict:
    return {k: v for k, v in case.items() if k in LORA_FIELDS}


def _noise(tree, seed: int):
    """Every leaf moved off its init (so zero-initialized factors do something)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _perturb_nnx(model: nnx.Module, seed: int = 0) -> None:
    nnx.update(model, _noise(nnx.state(model, nnx.LoRAParam), seed))


def _flat_types(model: nnx.Module) -> dict:
    return {k: type(v).__name__ for k, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# --- NNX -----------------------------------------------------------------------------------------
class NnxModuleMlp(nnx.Module):
    def __init__(self, rngs, *, use_bias=True, **lora):
        self.q = mnnx.LoraLinear(D, 2 * D, rank=2, alpha=4.0, use_bias=use_bias, rngs=rngs, **lora)
        self.out = nnx.Linear(2 * D, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.q(x)))


class NnxPlainMlp(nnx.Module):
    def __init__(self, rngs, *, use_bias=True):
        self.q = nnx.Linear(D, 2 * D, use_bias=use_bias, rngs=rngs)
        self.out = nnx.Linear(2 * D, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.q(x)))


def _nnx_lora_pair(case: dict):
    use_bias = case.get("use_bias", True)
    ours = NnxModuleMlp(nnx.Rngs(0), use_bias=use_bias, **_lora_kwargs(case))
    _perturb_nnx(ours)
    theirs = NnxPlainMlp(nnx.Rngs(1), use_bias=use_bias)
    cfg = LoraConfig(targets=["q"], rank=2, alpha=4.0, **_lora_kwargs(case))
    peft_jax.nnx.attach(theirs, cfg, rngs=nnx.Rngs(2))
    return ours, theirs


@pytest.mark.parametrize("case", LORAS.values(), ids=LORAS)
def test_nnx_lora_linear_equals_attach(case):
    ours, theirs = _nnx_lora_pair(case)
    assert _flat_types(ours) == _flat_types(theirs)  # same paths, same variable types
    nnx.update(theirs, nnx.state(ours))
    np.testing.assert_array_equal(ours(X), theirs(X))
    _assert_same_arrays(peft_jax.nnx.adapter_state(ours), peft_jax.nnx.adapter_state(theirs))
    assert peft_jax.nnx.summary(ours) == peft_jax.nnx.summary(theirs)
    assert not jnp.allclose(ours(X), ours.out(nnx.relu(ours.q.base_layer(X))))  # the adapter acts


@pytest.mark.parametrize("case", LORAS.values(), ids=LORAS)
def test_nnx_lora_linear_merges(case):
    model, _ = _nnx_lora_pair(case)
    before, kernel = model(X), model.q.base_layer.kernel[...]
    peft_jax.nnx.merge(model)
    assert not jnp.allclose(model.q.base_layer.kernel[...], kernel)
    np.testing.assert_allclose(model(X), before, atol=1e-5)
    peft_jax.nnx.unmerge(model)
    np.testing.assert_array_equal(model.q.base_layer.kernel[...], kernel)
    peft_jax.nnx.unload(model)
    assert type(model.q) is nnx.Linear
    np.testing.assert_allclose(model(X), before, atol=1e-5)


def test_nnx_lora_linear_trains_only_adapters():
    model = NnxModuleMlp(nnx.Rngs(0))
    frozen = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    before = model(X)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        step(model, opt)
    assert not jnp.allclose(model(X), before)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))), frozen)
    _, trainable, _ = peft_jax.nnx.split(model)
    assert {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(trainable)} == {"q/default/lora_a", "q/default/lora_b"}


def test_nnx_lora_linear_dropout_and_disabled():
    layer = nnx.Sequential(mnnx.LoraLinear(D, D, rank=2, dropout=0.5, rngs=nnx.Rngs(0)))
    _perturb_nnx(layer)
    layer.eval()
    a = layer(X)
    np.testing.assert_array_equal(a, layer(X))  # no dropout in eval mode
    layer.train()
    assert not jnp.allclose(layer(X), a)
    with peft_jax.nnx.disabled(layer):
        np.testing.assert_array_equal(layer(X), layer.layers[0].base_layer(X))


def test_nnx_adapt_any_layer_equals_attach():
    conv = mnnx.adapt(nnx.Conv(D, 4, kernel_size=(3,), rngs=nnx.Rngs(0)), Lora(rank=2), rngs=nnx.Rngs(1))
    ours = nnx.Sequential(conv)
    _perturb_nnx(ours)
    theirs = nnx.Sequential(nnx.Conv(D, 4, kernel_size=(3,), rngs=nnx.Rngs(3)))
    peft_jax.nnx.attach(theirs, place(["0"], Lora(rank=2)), rngs=nnx.Rngs(4))
    assert _flat_types(ours) == _flat_types(theirs)
    nnx.update(theirs, nnx.state(ours))
    np.testing.assert_array_equal(ours(X), theirs(X))
    # a second adapter on the adapted layer, as a second attach would add it
    both = mnnx.adapt(conv, IA3(), rngs=nnx.Rngs(5), adapter="second")
    assert both.adapter_order == ("default", "second")
    with pytest.raises(errors.InvalidConfigError):
        mnnx.adapt(lambda x: x, Lora(), rngs=nnx.Rngs(0))


class NnxModuleBlock(nnx.Module):
    """Two residual junctions with adapter modules (the second shares the first's bank)."""

    def __init__(self, method, rngs):
        self.attn, self.ffn = nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)
        self.norm1, self.norm2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attention_residual = mnnx.BottleneckAdapter(D, method, role="attention", rngs=rngs)
        self.ffn_residual = mnnx.BottleneckAdapter(D, method, role="ffn", rngs=rngs,
                                                   shared=self.attention_residual)

    def __call__(self, x):
        h = self.attention_residual(Residual(self.attn(x), x, self.norm1))
        return self.ffn_residual(Residual(self.ffn(h), h, self.norm2))


class NnxTapBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn, self.ffn = nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)
        self.norm1, self.norm2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attention_residual = hooks.ResidualTap(D, role="attention")
        self.ffn_residual = hooks.ResidualTap(D, role="ffn")

    def __call__(self, x):
        h = self.attention_residual(Residual(self.attn(x), x, self.norm1))
        return self.ffn_residual(Residual(self.ffn(h), h, self.norm2))


@pytest.mark.parametrize("method", BOTTLENECKS.values(), ids=BOTTLENECKS)
def test_nnx_bottleneck_adapter_equals_attach(method):
    ours = NnxModuleBlock(method, nnx.Rngs(0))
    _perturb_nnx(ours)
    theirs = NnxTapBlock(nnx.Rngs(1))
    peft_jax.nnx.attach(theirs, place(r".*_residual", method), rngs=nnx.Rngs(2))
    assert _flat_types(ours) == _flat_types(theirs)
    nnx.update(theirs, nnx.state(ours))
    np.testing.assert_allclose(ours(X), theirs(X), rtol=1e-6, atol=1e-6)
    state = peft_jax.nnx.adapter_state(ours)
    _assert_same_arrays(state, peft_jax.nnx.adapter_state(theirs))
    assert any(k.startswith("default/shared/") for k in state) == (method.phm is not None)
    assert peft_jax.nnx.summary(ours) == peft_jax.nnx.summary(theirs)


@pytest.mark.parametrize("method", [seq_bn(reduction_factor=2), par_bn(), compacter(reduction_factor=2)],
                         ids=["seq_bn", "par_bn", "compacter"])
def test_nnx_bottleneck_adapter_on_a_plain_hidden_state(method):
    class Identity(nnx.Module):
        def __call__(self, x):
            return x

    ours = nnx.Sequential(mnnx.BottleneckAdapter(D, method, rngs=nnx.Rngs(0)))
    _perturb_nnx(ours)
    theirs = nnx.Sequential(Identity())
    peft_jax.nnx.attach(theirs, place(["0"], peft_jax.modules.module_form(method, D)), rngs=nnx.Rngs(1))
    assert _flat_types(ours) == _flat_types(theirs)
    nnx.update(theirs, nnx.state(ours))
    np.testing.assert_allclose(ours(X), theirs(X), rtol=1e-6, atol=1e-6)
    with peft_jax.nnx.disabled(ours):
        np.testing.assert_array_equal(ours(X), X)


def test_nnx_bottleneck_adapter_trains_and_shares():
    model = NnxModuleBlock(compacter(reduction_factor=2, init_weights="zero_up"), nnx.Rngs(0))
    assert model.attention_residual.default.shared is model.ffn_residual.default.shared
    before = model(X)
    with peft_jax.nnx.disabled(model):
        np.testing.assert_array_equal(before, model(X))  # zero_up: the base model at init
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(X) - TARGET) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)

    step(model, opt)
    assert not jnp.allclose(model(X), before)
    assert model.attention_residual.default.shared is model.ffn_residual.default.shared
    with pytest.raises(errors.NotMergeableError):
        peft_jax.nnx.merge(model)


def test_nnx_bottleneck_adapter_errors():
    rngs = nnx.Rngs(0)
    first = mnnx.BottleneckAdapter(D, compacter(reduction_factor=2), rngs=rngs)
    with pytest.raises(errors.IncompatibleMethodsError):
        mnnx.BottleneckAdapter(D, compacter(reduction_factor=2, non_linearity="relu"), rngs=rngs, shared=first)
    with pytest.raises(errors.AdapterNameError):
        mnnx.BottleneckAdapter(D, compacter(reduction_factor=2), rngs=rngs, shared=first, adapter="other")
    with pytest.raises(errors.InvalidConfigError):
        mnnx.BottleneckAdapter(D, Lora(), rngs=rngs)
    with pytest.raises(errors.InvalidConfigError):
        mnnx.BottleneckAdapter(D, Bottleneck(features=4), rngs=rngs)
    with pytest.raises(errors.InvalidConfigError):
        mnnx.BottleneckAdapter(6, compacter(reduction_factor=2), rngs=rngs)  # phm_dim 4 does not divide 6


# --- Linen ---------------------------------------------------------------------------------------
class LinenModuleMlp(nn.Module):
    lora: dict
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        h = mlinen.LoraDense(2 * D, rank=2, alpha=4.0, use_bias=self.use_bias, name="q", **self.lora)(x)
        return nn.Dense(3, name="out")(nn.relu(h))


class LinenPlainMlp(nn.Module):
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(2 * D, use_bias=self.use_bias, name="q")(x)))


def _paths(tree) -> list[str]:
    return sorted(p for p, _ in peft_jax.core.paths.tree_items(tree))


def _linen_lora_pair(case: dict):
    use_bias = case.get("use_bias", True)
    ours = LinenModuleMlp(_lora_kwargs(case), use_bias=use_bias)
    variables = ours.init(jax.random.key(0), X)
    variables = {**variables, "adapters": _noise(variables["adapters"], 1)}
    plain = LinenPlainMlp(use_bias=use_bias)
    cfg = LoraConfig(targets=["q"], rank=2, alpha=4.0, **_lora_kwargs(case))
    peft = peft_jax.linen.attach(plain, cfg).plan({"params": variables["params"]}, X)
    return ours, variables, peft


@pytest.mark.parametrize("case", LORAS.values(), ids=LORAS)
def test_linen_lora_dense_equals_attach(case):
    ours, variables, peft = _linen_lora_pair(case)
    theirs = peft.init(jax.random.key(3), {"params": variables["params"]})
    assert _paths(theirs) == _paths(variables)  # same collections, same paths
    np.testing.assert_array_equal(ours.apply(variables, X), peft.apply(variables, X))
    assert not jnp.allclose(ours.apply(variables, X), peft.apply(variables, X, enabled=False))
    handle = mlinen.handle(ours, variables, X)
    _assert_same_arrays(handle.adapter_state(variables), peft.adapter_state(variables))
    assert handle.summary(variables) == peft.summary(variables)


@pytest.mark.parametrize("case", LORAS.values(), ids=LORAS)
def test_linen_lora_dense_merges(case):
    ours, variables, peft = _linen_lora_pair(case)
    handle = mlinen.handle(ours, variables, X)
    before = ours.apply(variables, X)
    merged = handle.merge(variables)
    np.testing.assert_allclose(handle.apply(merged, X), before, atol=1e-5)
    restored = handle.unmerge(merged)
    jax.tree.map(np.testing.assert_array_equal, restored["params"], variables["params"])
    served = handle.unload(variables)
    assert sorted(served) == ["params"]
    np.testing.assert_allclose(ours.apply(served, X), before, atol=1e-5)  # no adapters: plain layers
    np.testing.assert_allclose(LinenPlainMlp(use_bias=case.get("use_bias", True)).apply(served, X), before, atol=1e-5)


def test_linen_lora_dense_trains_only_adapters():
    ours, variables, _ = _linen_lora_pair({})
    handle = mlinen.handle(ours, variables, X)
    trainable, frozen = handle.partition(variables)
    assert _paths(trainable) == ["adapters/q/default/lora_a", "adapters/q/default/lora_b"]
    tx = optax.sgd(0.1)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, frozen, state):
        loss = lambda t: jnp.mean(ours.apply(peft_jax.combine(t, frozen), X) ** 2)  # noqa: E731
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    new, _ = step(trainable, frozen, state)
    after = peft_jax.combine(new, frozen)
    assert not jnp.allclose(ours.apply(after, X), ours.apply(variables, X))
    jax.tree.map(np.testing.assert_array_equal, after["params"], variables["params"])


def test_linen_lora_dense_dropout_matches_attach():
    _, variables, _ = _linen_lora_pair({})
    ours = LinenModuleMlp({"dropout": 0.5})
    cfg = LoraConfig(targets=["q"], rank=2, alpha=4.0, dropout=0.5)
    peft = peft_jax.linen.attach(LinenPlainMlp(), cfg).plan({"params": variables["params"]}, X)
    rngs = {"dropout": jax.random.key(9)}
    noisy = ours.apply(variables, X, rngs=rngs)
    assert not jnp.allclose(noisy, ours.apply(variables, X))
    np.testing.assert_allclose(noisy, peft.apply(variables, X, rngs=rngs), atol=1e-6)


def test_linen_handle_active_and_errors():
    ours, variables, peft = _linen_lora_pair({})
    handle = mlinen.handle(ours, variables, X)
    np.testing.assert_array_equal(handle.apply(variables, X, active=["default"]), ours.apply(variables, X))
    np.testing.assert_array_equal(handle.apply(variables, X, active=[]), peft.apply(variables, X, enabled=False))
    np.testing.assert_array_equal(handle.apply(variables, X, enabled=False), peft.apply(variables, X, enabled=False))
    with pytest.raises(errors.AdapterNameError):
        handle.apply(variables, X, active=["nope"])
    with pytest.raises(errors.StateError):
        handle.attach(LoraConfig(targets=["out"]))
    with pytest.raises(errors.NoMatchError):
        mlinen.handle(LinenPlainMlp(), {"params": variables["params"]}, X)
    with pytest.raises(errors.InvalidConfigError):
        layer = mlinen.LoraDense(4, rank=2)
        mlinen.handle(layer, layer.init(jax.random.key(0), X), X)


class LinenModuleBlock(nn.Module):
    method: Bottleneck

    @nn.compact
    def __call__(self, x):
        norm1, norm2 = nn.LayerNorm(name="norm1"), nn.LayerNorm(name="norm2")
        h = mlinen.BottleneckAdapter(D, self.method, role="attention", name="attention_residual")(
            Residual(nn.Dense(D, name="attn")(x), x, norm1))
        return mlinen.BottleneckAdapter(D, self.method, role="ffn", name="ffn_residual")(
            Residual(nn.Dense(D, name="ffn")(h), h, norm2))


class LinenTapBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        norm1, norm2 = nn.LayerNorm(name="norm1"), nn.LayerNorm(name="norm2")
        h = linen_hooks.ResidualTap(D, "attention", name="attention_residual")(
            Residual(nn.Dense(D, name="attn")(x), x, norm1))
        return linen_hooks.ResidualTap(D, "ffn", name="ffn_residual")(Residual(nn.Dense(D, name="ffn")(h), h, norm2))


@pytest.mark.parametrize("method", BOTTLENECKS.values(), ids=BOTTLENECKS)
def test_linen_bottleneck_adapter_equals_attach(method):
    ours = LinenModuleBlock(method)
    variables = ours.init(jax.random.key(0), X)
    trainable = {k: v for k, v in variables.items() if k != "params" and k != "adapter_shared"}
    variables = {**variables, **_noise(trainable, 1)}
    peft = peft_jax.linen.attach(LinenTapBlock(), place(r".*_residual", method)).plan(
        {"params": variables["params"]}, X)
    theirs = peft.init(jax.random.key(3), {"params": variables["params"]})
    assert _paths(theirs) == _paths(variables)
    np.testing.assert_allclose(ours.apply(variables, X), peft.apply(variables, X), rtol=1e-6, atol=1e-6)
    handle = mlinen.handle(ours, variables, X)
    state = handle.adapter_state(variables)
    _assert_same_arrays(state, peft.adapter_state(variables))
    assert any(k.startswith("default/shared/") for k in state) == (method.phm is not None)
    assert handle.summary(variables) == peft.summary(variables)


@pytest.mark.parametrize("method", [seq_bn(reduction_factor=2), par_bn(), compacter(reduction_factor=2)],
                         ids=["seq_bn", "par_bn", "compacter"])
def test_linen_bottleneck_adapter_on_a_plain_hidden_state(method):
    class Identity(nn.Module):
        def __call__(self, x):
            return x

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return mlinen.BottleneckAdapter(D, method, name="adapter")(x)

    class Theirs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Identity(name="adapter")(x)

    variables = Ours().init(jax.random.key(0), X)
    variables = {**variables, "adapters": _noise(variables["adapters"], 1)}
    peft = peft_jax.linen.attach(Theirs(), place(["adapter"], peft_jax.modules.module_form(method, D))).plan(
        {"params": {}}, X)
    # (peft.init cannot build a module site without params here: linen._site_base looks them up)
    np.testing.assert_allclose(Ours().apply(variables, X), peft.apply(variables, X), rtol=1e-6, atol=1e-6)
    _assert_same_arrays(mlinen.handle(Ours(), variables, X).adapter_state(variables), peft.adapter_state(variables))


def test_linen_bottleneck_adapter_trains():
    model = LinenModuleBlock(compacter(reduction_factor=2, init_weights="zero_up"))
    variables = model.init(jax.random.key(0), X)
    handle = mlinen.handle(model, variables, X)
    base = handle.apply(variables, X, enabled=False)
    np.testing.assert_allclose(model.apply(variables, X), base, atol=1e-6)  # zero_up: the base at init
    trainable, frozen = handle.partition(variables)
    assert "adapter_shared_params/default/phm_rule" in _paths(trainable)
    grads = jax.grad(lambda t: jnp.mean((model.apply(peft_jax.combine(t, frozen), X) - TARGET) ** 2))(trainable)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
    assert not jnp.allclose(model.apply(peft_jax.combine(new, frozen), X), base)
    with pytest.raises(errors.NotMergeableError):
        handle.merge(variables)
    with pytest.raises(errors.StateError, match="adapter_shared_params"):
        model.apply({k: v for k, v in variables.items() if k != "adapter_shared_params"}, X)


def test_linen_bottleneck_adapter_errors():
    class Mismatched(nn.Module):
        @nn.compact
        def __call__(self, x):
            method = compacter(reduction_factor=2, phm=Phm(phm_dim=2, shared_W_phm=True))
            x = mlinen.BottleneckAdapter(D, method, name="a")(x)
            return mlinen.BottleneckAdapter(D, dataclasses.replace(method, reduction_factor=4), name="b")(x)

    class Lifted(nn.Module):
        method: Bottleneck

        @nn.compact
        def __call__(self, x):
            return nn.remat(mlinen.BottleneckAdapter)(D, self.method, name="a")(x)

    with pytest.raises(errors.IncompatibleMethodsError):
        Mismatched().init(jax.random.key(0), X)
    with pytest.raises(errors.InvalidConfigError, match="lifted transform"):
        Lifted(compacter(reduction_factor=2)).init(jax.random.key(0), X)
    variables = Lifted(seq_bn(reduction_factor=2)).init(jax.random.key(0), X)  # no shared state: fine
    assert _paths(variables) == _paths({"adapters": {"a": {"default": variables["adapters"]["a"]["default"]}}})
    with pytest.raises(errors.InvalidConfigError):
        mlinen.BottleneckAdapter(D, Lora()).init(jax.random.key(0), X)


# --- both front-ends -----------------------------------------------------------------------------
def test_modules_give_one_layout_across_front_ends():
    """An adapter written as modules in NNX and in Linen has the same canonical keys and shapes."""
    method = compacter(reduction_factor=2)
    nnx_model = NnxModuleBlock(method, nnx.Rngs(0))
    linen_model = LinenModuleBlock(method)
    variables = linen_model.init(jax.random.key(0), X)
    a = peft_jax.nnx.adapter_state(nnx_model)
    b = mlinen.handle(linen_model, variables, X).adapter_state(variables)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    peft_jax.nnx.load_adapter_state(nnx_model, b)
    _assert_same_arrays(peft_jax.nnx.adapter_state(nnx_model), b)
