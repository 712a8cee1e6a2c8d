"""The LoRA-family math on its own: ops, initializers, DoRA norms, LoRA+, several adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft_jax
from frontends import ADAPTABLE, NnxNet, batch
from peft_jax.methods import LoraConfig, OLoRA, PiSSA, column_norm, exact_column_norm
from peft_jax.ops import ConvOp, EinsumOp, dense_op


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


OPS = {
    "einsum_permuted": (EinsumOp.from_string("btd,ndh->bnth", (3, 6, 4)), (2, 5, 6)),
    "dense": (dense_op(6, 5), (2, 6)),
    "conv": (ConvOp(in_shape=(3, 3, 4), out_shape=(5,), kernel_size=(3, 3), strides=(2, 1)), (1, 7, 6, 4)),
}


def _full(op, x, kernel):
    if isinstance(op, EinsumOp):
        return jnp.einsum("btd,ndh->bnth", x, kernel)
    if isinstance(op, ConvOp):
        return jax.lax.conv_general_dilated(x, kernel, (2, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return x @ kernel


@pytest.mark.parametrize("name", sorted(OPS))
def test_low_rank_path_equals_the_materialised_kernel(name):
    op, x_shape = OPS[name]
    a, b, x = _normal(1, op.a_shape(2)), _normal(2, op.b_shape(2)), _normal(3, x_shape)
    kernel = op.factors_to_kernel(a, b)
    np.testing.assert_allclose(op.project_out(op.project_in(x, a), b), _full(op, x, kernel), atol=1e-4)
    np.testing.assert_array_equal(op.matrix_to_kernel(op.kernel_to_matrix(kernel)), kernel)


@pytest.mark.parametrize("name", sorted(OPS))
def test_dora_norm_without_materialising_matches_exact(name):
    op, _ = OPS[name]
    kernel = op.matrix_to_kernel(_normal(0, (op.fan_in, op.fan_out)))
    a, b = _normal(1, op.a_shape(2)), _normal(2, op.b_shape(2))
    np.testing.assert_allclose(column_norm(op, kernel, a, b, 0.7),
                               exact_column_norm(op, kernel, a, b, 0.7), rtol=1e-5)


@pytest.mark.parametrize("init", [PiSSA(), OLoRA()], ids=["pissa", "olora"])
def test_residual_inits_keep_the_weight(init):
    op = dense_op(6, 5)
    w = _normal(0, (6, 5))
    a, b, residual = init(jax.random.key(1), op, w, 2, 0.5)
    np.testing.assert_allclose(residual + 0.5 * a @ b, w, atol=1e-5)
    if isinstance(init, PiSSA):  # the adapter holds the top-2 singular directions
        s = jnp.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(jnp.linalg.svd(0.5 * a @ b, compute_uv=False)[:2], s[:2], rtol=1e-5)


def test_scales_and_overrides():
    cfg = LoraConfig(targets=["q"], rank=16, alpha=32, use_rslora=True,
                     rank_pattern={".*v": 4}, alpha_pattern={".*v": 2.0})
    assert cfg.settings_for("attn/q").scale == pytest.approx(32 / 4)
    v = cfg.settings_for("attn/v")
    assert (v.rank, v.alpha, v.scale) == (4, 2.0, pytest.approx(1.0))
    assert LoraConfig(targets=["q"], rank=8, alpha=16).settings_for("q").scale == 2.0


def test_loraplus_gives_b_its_own_learning_rate():
    tx = peft_jax.loraplus(optax.sgd, learning_rate=0.1, ratio=4.0)
    params = {"q": {"adapters": {"default": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3))}}}}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    leaf = updates["q"]["adapters"]["default"]
    np.testing.assert_allclose(leaf["lora_a"], -0.1)
    np.testing.assert_allclose(leaf["lora_b"], -0.4)


def test_nnx_optimizer_with_lora_param_filter_trains_only_adapters():
    model = NnxNet(nnx.Rngs(0))
    peft_jax.nnx.attach(model, LoraConfig(targets=ADAPTABLE, rank=2), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    frozen_before = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    b = batch()

    @nnx.jit
    def step(model, optimizer, b):
        def loss(model):
            return jnp.mean((model(b["ids"]) - b["target"]) ** 2)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        with jax.numpy_dtype_promotion("standard"):
            optimizer.update(model, grads)

    for _ in range(2):
        step(model, optimizer, b)
    frozen_after = nnx.state(model, nnx.Not(nnx.LoRAParam))
    assert jax.tree.all(jax.tree.map(np.array_equal, frozen_before, frozen_after))
    assert float(jnp.abs(model.dense.default.lora_b[...]).max()) > 0


def test_two_adapters_add_and_switch():
    model = NnxNet(nnx.Rngs(0))
    x = _normal(5, (2, 3, 8))
    for name, seed in (("one", 1), ("two", 2)):
        peft_jax.nnx.attach(model, LoraConfig(targets=["dense"], rank=2, init=peft_jax.Gaussian(std=1.0)),
                            rngs=nnx.Rngs(seed), name=name)
    for name in ("one", "two"):
        adapter = getattr(model.dense, name)
        adapter.lora_b[...] = _normal(7, adapter.lora_b.shape)
    both = model.dense(x)
    peft_jax.nnx.set_active(model, "one")
    one = model.dense(x)
    peft_jax.nnx.set_active(model, "two")
    two = model.dense(x)
    with peft_jax.nnx.disabled(model):
        base = model.dense(x)
    np.testing.assert_allclose(both - base, (one - base) + (two - base), atol=1e-5)
    assert float(jnp.abs(one - two).max()) > 1e-3
    with pytest.raises(peft_jax.errors.AdapterNameError):
        peft_jax.nnx.set_active(model, "three")


def test_unload_returns_the_users_own_classes():
    model = NnxNet(nnx.Rngs(0))
    peft_jax.nnx.attach(model, LoraConfig(targets=ADAPTABLE, modules_to_save=["head"]), rngs=nnx.Rngs(1))
    peft_jax.nnx.unload(model)
    assert {type(m).__name__ for _, m in nnx.iter_modules(model)} == {
        "NnxNet", "Embed", "Linear", "LinearGeneral", "Einsum", "Conv", "LayerNorm"}
    assert not nnx.state(model, nnx.LoRAParam)


@pytest.mark.parametrize("front", ["nnx", "linen"])
def test_lora_on_an_einsum_layer_of_stacked_experts(front):
    """``nnx.Einsum("etd,edf->etf")``: each expert gets its own factors, on the thin path."""
    from flax import linen as nn

    e, d, f, t = 3, 8, 6, 5
    x = _normal(1, (e, t, d))
    if front == "nnx":
        model = nnx.Sequential(nnx.Einsum("etd,edf->etf", (e, d, f), rngs=nnx.Rngs(0)))
        peft_jax.nnx.attach(model, LoraConfig(targets=["0"], rank=2, alpha=4.0), rngs=nnx.Rngs(1))
        slot = model.layers[0].default
        assert slot.lora_a.shape == (e, d, 2) and slot.lora_b.shape == (e, 2, f)
        slot.lora_b[...] = _normal(2, slot.lora_b.shape)
        a, b = slot.lora_a[...], slot.lora_b[...]
        w = model.layers[0].kernel[...]
        y = model(x)
        peft_jax.nnx.merge(model)
        merged = model(x)
    else:
        wrapper = nn.Sequential([nn.Einsum((e, d, f), "etd,edf->etf", use_bias=False)])
        variables = wrapper.init(jax.random.key(0), x)
        peft = peft_jax.linen.attach(wrapper, LoraConfig(targets=["layers_0"], rank=2, alpha=4.0)).plan(variables, x)
        variables = peft.init(jax.random.key(1), variables)
        slot = variables["adapters"]["layers_0"]["default"]
        assert slot["lora_a"].shape == (e, d, 2) and slot["lora_b"].shape == (e, 2, f)
        slot["lora_b"] = _normal(2, slot["lora_b"].shape)
        a, b = slot["lora_a"], slot["lora_b"]
        w = variables["params"]["layers_0"]["kernel"]
        y = peft.apply(variables, x)
        merged = peft.apply(peft.merge(variables), x)
    want = jnp.einsum("etd,edf->etf", x, w + 2.0 * jnp.einsum("edr,erf->edf", a, b))
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(merged, y, atol=1e-5)


def test_other_methods_refuse_stacked_expert_kernels_by_name():
    model = nnx.Sequential(nnx.Einsum("etd,edf->etf", (3, 8, 6), rngs=nnx.Rngs(0)))
    with pytest.raises(peft_jax.errors.UnsupportedLayerError, match=r"IA3 cannot adapt 'layers/0'.*'e'"):
        peft_jax.nnx.attach(model, peft_jax.place(["0"], peft_jax.IA3()), rngs=nnx.Rngs(1))
    with pytest.raises(peft_jax.errors.UnsupportedLayerError, match="Dora"):
        peft_jax.nnx.attach(model, LoraConfig(targets=["0"], use_dora=True), rngs=nnx.Rngs(1))
