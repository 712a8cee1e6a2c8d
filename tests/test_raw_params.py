"""LoRA on raw params (HF ``target_parameters``): a small MoE block whose experts are raw kernels.

The block is written here, in NNX and Linen with the same names: a ``router`` Dense and an
``experts`` module holding ``w_up: (E, D, F)`` and ``w_down: (E, F, D)``, used by ``jnp.einsum``
on dispatched tokens ``(E, T, D)`` or by ``jax.lax.ragged_dot`` on tokens sorted by expert.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.methods import Context, Gaussian, Lora, LoraConfig, ModuleSite, PiSSA, compose
from peft_jax.methods.raw_params import RawParamLora, target_parameters

E, D, F, T = 4, 8, 12, 6  # experts, model width, expert width, tokens
RANK, ALPHA = 2, 4.0
SCALE = ALPHA / RANK
TARGETS = ["experts/w_up", "experts/w_down"]
MODES = ["einsum", "ragged"]


# --- the model (test-only) --------------------------------------------------------------------------
def expert_ffn(mode, x, w_up, w_down, group_sizes):
    if mode == "einsum":  # x: (E, T, D) dispatched tokens
        h = jax.nn.gelu(jnp.einsum("etd,edf->etf", x, w_up))
        return jnp.einsum("etf,efd->etd", h, w_down)
    if mode == "ragged":  # x: (T, D) sorted by expert
        h = jax.nn.gelu(jax.lax.ragged_dot(x, w_up, group_sizes))
        return jax.lax.ragged_dot(h, w_down, group_sizes)
    if mode == "matmul":  # the param never reaches an einsum: must be refused
        return jax.nn.gelu(x @ w_up) @ w_down
    if mode == "bad_spec":  # w_down's last axis contracted: breaks (experts, in, out)
        return jnp.einsum("etd,efd->etf", x, w_down) @ w_up.transpose(0, 2, 1)
    raise AssertionError(mode)


def moe(router, experts, x, ragged):
    gates = jax.nn.softmax(router(x), axis=-1)  # (T, E)
    if ragged:
        choice = jnp.argmax(gates, axis=-1)
        order = jnp.argsort(choice)
        sizes = jnp.bincount(choice, length=E).astype(jnp.int32)
        y = jnp.zeros_like(x).at[order].set(experts(x[order], sizes))
        return y * jnp.max(gates, axis=-1, keepdims=True)
    y = experts(jnp.broadcast_to(x, (E, T, D)))
    return jnp.einsum("etd,te->td", y, gates)


def init_kernel(key, shape):
    return jax.random.normal(key, shape) / math.sqrt(shape[-2])


class NnxExperts(nnx.Module):
    def __init__(self, mode, rngs):
        self.mode = mode
        self.w_up = nnx.Param(init_kernel(rngs.params(), (E, D, F)))
        self.w_down = nnx.Param(init_kernel(rngs.params(), (E, F, D)))

    def __call__(self, x, group_sizes=None):
        return expert_ffn(self.mode, x, self.w_up[...], self.w_down[...], group_sizes)


class NnxMoE(nnx.Module):
    def __init__(self, mode="einsum", seed=0):
        rngs = nnx.Rngs(seed)
        self.ragged = mode == "ragged"
        self.router = nnx.Linear(D, E, rngs=rngs)
        self.experts = NnxExperts(mode, rngs)

    def __call__(self, x):
        return moe(self.router, self.experts, x, self.ragged)


class LinenExperts(nn.Module):
    mode: str

    @nn.compact
    def __call__(self, x, group_sizes=None):
        w_up = self.param("w_up", init_kernel, (E, D, F))
        w_down = self.param("w_down", init_kernel, (E, F, D))
        return expert_ffn(self.mode, x, w_up, w_down, group_sizes)


class LinenMoE(nn.Module):
    mode: str = "einsum"

    @nn.compact
    def __call__(self, x):
        return moe(nn.Dense(E, name="router"), LinenExperts(self.mode, name="experts"), x,
                   self.mode == "ragged")


def batch(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(k1, (T, D)), "y": jax.random.normal(k2, (T, D))}


def mse(out, target):
    return jnp.mean((out - target) ** 2)


def config():
    return peft_jax.LoraConfig(target_parameters=TARGETS, rank=RANK, alpha=ALPHA)


# --- one harness per front-end --------------------------------------------------------------------
class Nnx:
    def __init__(self, mode, cfg=None):
        self.model = NnxMoE(mode)
        self.base_params = nnx.to_pure_dict(nnx.state(self.model, nnx.Param))
        peft_jax.nnx.attach(self.model, cfg or config(), rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.model(x)

    def split(self):
        graphdef, trainable, frozen = peft_jax.nnx.split(self.model)
        return trainable, frozen, peft_jax.nnx.make_loss(graphdef, lambda m, b: mse(m(b["x"]), b["y"]))

    def update(self, trainable):
        nnx.update(self.model, trainable)

    def state(self):
        return peft_jax.nnx.adapter_state(self.model)

    def merge(self):
        peft_jax.nnx.merge(self.model)

    def unmerge(self):
        peft_jax.nnx.unmerge(self.model)

    def params(self):
        """The base params (router, experts), laid out as the plain block's."""
        return {"router": nnx.to_pure_dict(nnx.state(self.model.router, nnx.Param)),
                "experts": nnx.to_pure_dict(nnx.state(self.model.experts.base_layer, nnx.Param))}


class Linen:
    def __init__(self, mode, cfg=None, params=None):
        self.module = LinenMoE(mode)
        x = batch()["x"]
        self.variables = {"params": params} if params is not None else self.module.init(jax.random.key(0), x)
        self.base_params = self.variables["params"]
        self.peft = peft_jax.linen.attach(self.module, cfg or config()).plan(self.variables, x)
        self.variables = self.peft.init(jax.random.key(1), self.variables)

    def __call__(self, x):
        return self.peft.apply(self.variables, x)

    def split(self):
        trainable, frozen = self.peft.partition(self.variables)

        def loss(trainable, frozen, b):
            return mse(self.peft.apply(peft_jax.combine(trainable, frozen), b["x"]), b["y"])

        return trainable, frozen, loss

    def update(self, trainable):
        _, frozen = self.peft.partition(self.variables)
        self.variables = peft_jax.combine(trainable, frozen)

    def state(self):
        return self.peft.adapter_state(self.variables)

    def merge(self):
        self.variables = self.peft.merge(self.variables)

    def unmerge(self):
        self.variables = self.peft.unmerge(self.variables)

    def params(self):
        return self.variables["params"]


FRONTENDS = {"nnx": Nnx, "linen": Linen}


def plain(mode, params, x):
    """The unadapted block (Linen, no peft_jax) on explicit params."""
    return LinenMoE(mode).apply({"params": params}, x)


def hand_merged(params, state):
    """``W + s * A @ B`` per expert, materialised by hand."""
    experts = dict(params["experts"])
    for name in ("w_up", "w_down"):
        a, b = state[f"experts/default/{name}/lora_a"], state[f"experts/default/{name}/lora_b"]
        experts[name] = experts[name] + SCALE * jnp.einsum("eir,ero->eio", a, b)
    return {**params, "experts": experts}


def snapshot(tree):
    return jax.tree.map(lambda v: np.array(v, copy=True), tree)


def train(h, steps=3):
    trainable, frozen, loss = h.split()
    before_t, before_f = snapshot(trainable), snapshot(frozen)
    tx = optax.adam(1e-2)
    step = peft_jax.make_train_step(loss, tx)
    opt_state = tx.init(trainable)
    for i in range(steps):
        trainable, opt_state, _ = step(trainable, opt_state, frozen, batch(i))
    h.update(trainable)
    return before_t, before_f


# --- behaviour -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fe", FRONTENDS)
def test_initial_output_is_base_and_layout(fe, mode):
    h = FRONTENDS[fe](mode)
    x = batch()["x"]
    np.testing.assert_array_equal(np.asarray(h(x)), np.asarray(plain(mode, h.base_params, x)))
    shapes = {k: tuple(v.shape) for k, v in h.state().items()}
    assert shapes == {"experts/default/w_up/lora_a": (E, D, RANK),
                      "experts/default/w_up/lora_b": (E, RANK, F),
                      "experts/default/w_down/lora_a": (E, F, RANK),
                      "experts/default/w_down/lora_b": (E, RANK, D)}
    a = h.state()["experts/default/w_up/lora_a"]
    assert float(jnp.max(jnp.abs(a))) <= 1 / math.sqrt(D) and float(jnp.std(a)) > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fe", FRONTENDS)
def test_train_reference_merge(fe, mode):
    h = FRONTENDS[fe](mode)
    before_t, before_f = train(h)
    trainable, frozen, _ = h.split()
    jax.tree.map(np.testing.assert_array_equal, snapshot(frozen), before_f)  # frozen bitwise
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         snapshot(trainable), before_t))
    assert moved and all(moved)

    x = batch(7)["x"]
    adapted = h(x)
    params = snapshot(h.params())
    reference = plain(mode, hand_merged(h.params(), h.state()), x)
    assert float(jnp.max(jnp.abs(adapted - plain(mode, h.params(), x)))) > 1e-4  # it did change
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(reference), atol=1e-5, rtol=0)

    h.merge()
    np.testing.assert_allclose(np.asarray(h(x)), np.asarray(adapted), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(h.params()["experts"]["w_up"]),
                               np.asarray(hand_merged(params, h.state())["experts"]["w_up"]), atol=1e-6)
    h.unmerge()
    jax.tree.map(np.testing.assert_array_equal, snapshot(h.params()), params)
    np.testing.assert_allclose(np.asarray(h(x)), np.asarray(adapted), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_nnx_state_loads_into_linen(mode):
    n = Nnx(mode)
    train(n)
    linen = Linen(mode, params=n.params())
    assert sorted(linen.state()) == sorted(n.state())
    linen.variables = linen.peft.load_adapter_state(linen.variables, n.state())
    x = batch(3)["x"]
    np.testing.assert_allclose(np.asarray(linen(x)), np.asarray(n(x)), atol=1e-6, rtol=0)


def _outvar_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _outvar_shapes(inner)
    return shapes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fe", FRONTENDS)
def test_gradient_never_forms_an_expert_delta(fe, mode):
    kernels = {(E, D, F), (E, F, D)}
    h = FRONTENDS[fe](mode)
    trainable, frozen, loss = h.split()
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, frozen, batch())
    assert not kernels & _outvar_shapes(jaxpr.jaxpr)

    # The check can fail: full fine-tuning of the same block has the kernel gradients.
    if fe == "nnx":
        graphdef, params, rest = nnx.split(NnxMoE(mode), nnx.Param, ...)
        full = lambda p, b: mse(nnx.merge(graphdef, p, rest)(b["x"]), b["y"])  # noqa: E731
    else:
        params = h.base_params
        full = lambda p, b: mse(plain(mode, p, b["x"]), b["y"])  # noqa: E731
    assert kernels <= _outvar_shapes(jax.make_jaxpr(jax.grad(full))(params, batch()).jaxpr)


def test_composes_with_layer_lora():
    cfg = compose(config(), LoraConfig(targets=["router"], rank=2))
    h = Nnx("einsum", cfg)
    assert sorted(h.state()) == sorted(
        [f"experts/default/{p}/{f}" for p in ("w_up", "w_down") for f in ("lora_a", "lora_b")]
        + ["router/default/lora_a", "router/default/lora_b"])
    before_t, _ = train(h, steps=2)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                            snapshot(h.split()[0]), before_t)))


def test_target_parameters_names():
    lora = Lora(rank=3, alpha=6.0)
    cfg = target_parameters(["mlp.experts.gate_up_proj", ("experts", "sub/w"), "experts/w_down"], lora)
    assert [(p.targets, p.method_for("x").param) for p in cfg.placements()] == [
        (["mlp/experts"], "gate_up_proj"), ("experts", "sub/w"), (["experts"], "w_down")]
    per_path = target_parameters(["experts/w_up"], lambda path: Lora(rank=len(path)))
    assert per_path[0].method_for("a/experts").lora.rank == 9
    with pytest.raises(errors.InvalidConfigError, match="owner module"):
        target_parameters(["w_up"], lora)
    with pytest.raises(errors.InvalidConfigError, match="PiSSA"):
        peft_jax.LoraConfig(target_parameters=TARGETS, init=PiSSA())
    with pytest.raises(errors.InvalidConfigError, match="lora_bias"):
        RawParamLora(param="w", lora=Lora(lora_bias=True))


def test_dropout_on_the_low_rank_path_and_gaussian_init():
    site = ModuleSite(path="experts", layer="Experts", param_shapes={"w": (E, D, F)})
    method = RawParamLora(param="w", lora=Lora(rank=RANK, dropout=0.5, init_weights=Gaussian()))
    base = {"w": jnp.ones((E, D, F))}
    params, _ = method.init(jax.random.key(0), site, base, {})
    params = {"w": {**params["w"], "lora_b": jnp.ones((E, RANK, F))}}
    call = lambda x: jnp.einsum("etd,edf->etf", x, base["w"])  # noqa: E731
    x = jnp.ones((E, T, D))
    run = lambda ctx: method.apply(params, {}, site, call, x, base, ctx)  # noqa: E731
    assert method.needs_rng
    np.testing.assert_array_equal(run(Context()), run(Context()))
    assert not np.array_equal(run(Context(jax.random.key(1))), run(Context()))
    a = params["w"]["lora_a"]
    delta = run(Context()) - call(x)
    manual = method.scale * jnp.einsum("etd,edr,erf->etf", x, a, params["w"]["lora_b"])
    np.testing.assert_allclose(np.asarray(delta), np.asarray(manual), atol=1e-5, rtol=1e-5)
    assert jnp.einsum is not None and jax.lax.ragged_dot.__name__ == "ragged_dot"  # restored


# --- typed errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fe", FRONTENDS)
def test_missing_param(fe):
    with pytest.raises(errors.InvalidConfigError, match=r"'w_gate'.*'experts'.*w_down, w_up"):
        FRONTENDS[fe]("einsum", peft_jax.LoraConfig(target_parameters=["experts/w_gate"]))


@pytest.mark.parametrize("fe", FRONTENDS)
def test_one_dim_param(fe):
    with pytest.raises(errors.InvalidConfigError, match=r"'bias'.*at least 2 dims"):
        FRONTENDS[fe]("einsum", peft_jax.LoraConfig(target_parameters=["router/bias"]))


@pytest.mark.parametrize("fe", FRONTENDS)
def test_spec_breaking_the_layout(fe):
    h = FRONTENDS[fe]("bad_spec", peft_jax.LoraConfig(target_parameters=["experts/w_down"]))
    with pytest.raises(errors.UnsupportedLayerError, match=r"w_down.*etd,efd->etf"):
        h(batch()["x"])


@pytest.mark.parametrize("fe", FRONTENDS)
def test_param_never_seen_by_an_einsum(fe):
    h = FRONTENDS[fe]("matmul", config())
    with pytest.raises(errors.UnsupportedLayerError, match="as-is by jnp.einsum"):
        h(batch()["x"])
    assert jnp.einsum.__module__.startswith("jax")  # the interception was undone
