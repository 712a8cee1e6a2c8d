"""LoHa, LoKr and OFT: single-layer math, merge round trips, typed errors, and (marked ``interop``)
outputs and trainable-parameter counts against the real HF PEFT layers."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.methods.base import Context, LinearSite, ModuleSite
from peft_jax.methods.loha import LoHa
from peft_jax.methods.lokr import LoKr, factorization
from peft_jax.methods.oft import OFT
from peft_jax.ops import ContractionOp, ConvOp, EinsumOp, EmbedOp, dense_op

TOL = 1e-5


def dense_site(i, o, path="lin"):
    return LinearSite(path=path, op=dense_op(i, o), layer="Linear", has_bias=True)


def rand(shape, seed, scale=1.0):
    """Test data from numpy (jax.random would compile a generator for every shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def make_base(site, seed=0):
    base = {"kernel": rand(site.op.kernel_shape, seed, 1 / math.sqrt(site.op.fan_in))}
    if site.has_bias:
        base["bias"] = rand(site.op.out_shape, seed + 1, 0.1)
    return base


def random_params(method, site, base, seed=1, scale=0.3):
    """Params of ``init``'s shapes, all random (so no factor is zero and comparisons mean something)."""
    shapes = method.param_shapes(site)
    return {name: rand(shape, seed + i, scale) for i, (name, shape) in enumerate(sorted(shapes.items()))}


def inputs(site, shape=(5,), seed=2):
    return rand((*shape, *site.op.in_shape), seed)


def n_params(params):
    return sum(int(np.prod(v.shape)) for v in params.values())


def close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def call_of(site, base):
    bias = base.get("bias")
    return lambda x: site.op.apply_kernel(x, base["kernel"]) + (0.0 if bias is None else bias)


base_call = call_of


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(method, site, params, base, x, key):
    return method.apply(params, {}, site, call_of(site, base), x, base, Context(key))


def run(method, params, site, base, x, ctx=Context()):
    return _run(method, site, params, base, x, ctx.key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def roundtrip(method, site, params, base, x):
    """``(base output, adapted output, merged output, unmerged kernel)``, in one compile."""
    y = method.apply(params, {}, site, call_of(site, base), x, base, Context())
    new, record = method.merge(params, {}, site, base)
    merged = {**base, **new}
    restored = method.unmerge(params, {}, site, merged, record)
    return call_of(site, base)(x), y, call_of(site, merged)(x), restored["kernel"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def merged_kernel(method, site, params, base):
    return method.merge(params, {}, site, base)[0]["kernel"]


# --- shared pure-JAX properties ----------------------------------------------------------------

METHODS = [
    LoHa(rank=4, alpha=8.0),
    LoKr(rank=2, alpha=4.0),
    LoKr(rank=2, alpha=4.0, decompose_both=True),
    LoKr(rank=8, alpha=4.0, decompose_factor=4, init_weights="lycoris"),
    OFT(oft_block_size=8),
    OFT(r=4, oft_block_size=0, coft=True, eps=0.5),
    OFT(oft_block_size=16, block_share=True, use_cayley_neumann=False),
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_initial_output_is_the_base(method):
    site = dense_site(64, 48)
    base = make_base(site)
    params, updates = method.init(jax.random.key(0), site, base, {})
    assert updates == {}
    assert method.param_shapes(site) == {k: v.shape for k, v in params.items()}
    out, y, merged_y, _ = roundtrip(method, site, params, base, inputs(site))
    close(y, out, 1e-6)
    close(merged_y, out, 1e-6)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_merge_equals_apply_and_unmerge_restores(method):
    site = dense_site(64, 48)
    base = make_base(site)
    params = random_params(method, site, base)
    out, y, merged_y, restored = roundtrip(method, site, params, base, inputs(site))
    assert float(jnp.max(jnp.abs(y - out))) > 1e-3  # the method does something
    close(merged_y, y)
    close(restored, base["kernel"])


OTHER_SITES = {
    "dense_general": LinearSite(path="dg", op=ContractionOp(in_shape=(4, 6), out_shape=(2, 5),
                                                            axis=(-2, -1)), layer="LinearGeneral",
                                has_bias=True),
    "einsum": LinearSite(path="e", op=EinsumOp.from_string("btd,dnh->btnh", (12, 2, 4)),
                         layer="Einsum", has_bias=False),
    "conv": LinearSite(path="c", op=ConvOp(in_shape=(3, 3, 6), out_shape=(8,), kernel_size=(3, 3)),
                       layer="Conv", has_bias=True),
    "embed": LinearSite(path="emb", op=EmbedOp(in_shape=(10,), out_shape=(6,)), layer="Embed",
                        has_bias=False),
}


def other_inputs(name, site):
    if name == "embed":
        return jnp.asarray(np.random.default_rng(3).integers(0, 10, (2, 5)), jnp.int32)
    shape = {"einsum": (2, 3, 12), "conv": (2, 5, 5, 6)}.get(name, (3, 4, 6))
    return rand(shape, 3)


@pytest.mark.parametrize("name", sorted(OTHER_SITES))
@pytest.mark.parametrize("method", [LoHa(rank=3), LoKr(rank=1, decompose_both=True)], ids=repr)
def test_weight_methods_on_every_op(method, name):
    site = OTHER_SITES[name]
    base = make_base(site)
    params = random_params(method, site, base)
    _, y, merged_y, restored = roundtrip(method, site, params, base, other_inputs(name, site))
    close(merged_y, y)
    close(restored, base["kernel"])


def test_oft_on_dense_general_trailing_axes():
    site = OTHER_SITES["dense_general"]
    method = OFT(oft_block_size=6)
    base = make_base(site)
    params = random_params(method, site, base)
    out, y, merged_y, restored = roundtrip(method, site, params, base,
                                           other_inputs("dense_general", site))
    assert float(jnp.max(jnp.abs(y - out))) > 1e-3
    close(merged_y, y)
    close(restored, base["kernel"])


# --- LoKr ----------------------------------------------------------------------------------------

def test_factorization_matches_hf_examples():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(48) == (6, 8)
    assert factorization(64, 32) == (32, 2)  # HF returns (factor, rest) unsorted


@pytest.mark.parametrize("method", [LoKr(rank=2), LoKr(rank=2, decompose_both=True), LoKr(rank=8),
                                    LoKr(rank=3, decompose_factor=4)], ids=repr)
def test_lokr_thin_path_equals_materialised(method):
    site = dense_site(64, 48)
    base = make_base(site)
    params = random_params(method, site, base)
    x = inputs(site, (2, 3))
    thin = method.kron_apply(params, x, jnp.float32)
    full = site.op.apply_kernel(x, method.kernel_delta(params, {}, site.op))
    close(thin, full)
    close(method.delta_matrix(params, site.op), jnp.kron(*method._w1_w2(params)))

    def loss(p, thin_path):
        d = (method.kron_apply(p, x, jnp.float32) if thin_path
             else site.op.apply_kernel(x, method.kernel_delta(p, {}, site.op)))
        return jnp.sum(jnp.sin(d))

    g_thin, g_full = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
    for k in params:
        close(g_thin[k], g_full[k], 1e-4)


def test_lokr_factor_shapes_follow_hf_rules():
    site = dense_site(64, 48)
    assert LoKr(rank=8).factors(site) == ((8, 8), (6, 8))
    assert set(LoKr(rank=8).param_shapes(site)) == {"lokr_w1", "lokr_w2"}
    assert set(LoKr(rank=2).param_shapes(site)) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert set(LoKr(rank=2, decompose_both=True).param_shapes(site)) == {
        "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert LoKr(rank=8, decompose_factor=4).factors(site) == ((4, 16), (4, 12))


# --- dropout (training only) --------------------------------------------------------------------

@pytest.mark.parametrize("method", [LoHa(rank=4, rank_dropout=0.5), LoKr(rank=2, rank_dropout=0.5),
                                    LoKr(rank=2, rank_dropout=0.5, rank_dropout_scale=True)],
                         ids=repr)
def test_rank_dropout_drops_output_features(method):
    site = dense_site(16, 12)
    base = make_base(site)
    params = random_params(method, site, base)
    x = inputs(site)
    out = base_call(site, base)(x)
    full = run(method, params, site, base, x) - out
    assert method.needs_rng
    d = run(method, params, site, base, x, Context(jax.random.key(7))) - out
    ratio = np.asarray(d / full)
    cols = ratio.mean(axis=0)
    np.testing.assert_allclose(ratio, np.broadcast_to(cols, ratio.shape), atol=1e-4)
    kept = cols > 1e-6
    assert 0 < kept.sum() < 12 and np.allclose(cols[~kept], 0.0, atol=1e-6)
    rescale = isinstance(method, LoHa) or method.rank_dropout_scale
    np.testing.assert_allclose(cols[kept], 12 / kept.sum() if rescale else 1.0, rtol=1e-4)


@pytest.mark.parametrize("method", [LoHa(rank=4, module_dropout=0.5),
                                    LoKr(rank=2, module_dropout=0.5)], ids=repr)
def test_module_dropout_skips_the_whole_update(method):
    site = dense_site(16, 12)
    base = make_base(site)
    params = random_params(method, site, base)
    x = inputs(site)
    out, full = base_call(site, base)(x), run(method, params, site, base, x)
    seen = set()
    for seed in range(12):
        y = run(method, params, site, base, x, Context(jax.random.key(seed)))
        if np.allclose(y, out, atol=1e-6):
            seen.add("skipped")
        else:
            close(y, full)
            seen.add("kept")
    assert seen == {"skipped", "kept"}


def test_oft_module_dropout_replaces_blocks_by_identity():
    method = OFT(oft_block_size=4, module_dropout=0.5)
    site = dense_site(16, 3)
    base = make_base(site)
    params = random_params(method, site, base)
    eye = np.eye(4, dtype=np.float32)
    rot = np.asarray(method.rotation_blocks(params, site, Context(jax.random.key(0))))
    assert sum(np.allclose(b, eye) for b in rot) == 2
    rot_eval = np.asarray(method.rotation_blocks(params, site))
    assert not any(np.allclose(b, eye) for b in rot_eval)


def test_oft_exact_cayley_is_orthogonal_and_coft_bounds_q():
    site = dense_site(32, 3)
    base = make_base(site)
    exact = OFT(oft_block_size=8, use_cayley_neumann=False)
    rot = exact.rotation_blocks(random_params(exact, site, base), site)
    close(jnp.einsum("rij,rkj->rik", rot, rot), jnp.broadcast_to(jnp.eye(8), rot.shape))
    coft = OFT(oft_block_size=8, coft=True, eps=1e-2)
    params = random_params(coft, site, base)
    from peft_jax.methods.oft import skew
    q = skew(coft.project(params["oft_r"], 8), 8)
    assert float(jnp.max(jnp.linalg.norm(q, axis=(1, 2)))) <= 1e-2 / 2 + 1e-7


# --- typed errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: LoHa(rank=0), lambda: LoHa(alpha=0.0), lambda: LoHa(rank_dropout=1.0),
    lambda: LoHa(module_dropout=-0.1), lambda: LoHa(init_weights="lycoris"),
    lambda: LoKr(rank=-1), lambda: LoKr(decompose_factor=0), lambda: LoKr(decompose_factor=-2),
    lambda: LoKr(init_weights="gaussian"), lambda: LoKr(init_weights=1), lambda: LoKr(rank_dropout=2),
    lambda: OFT(r=4), lambda: OFT(r=0, oft_block_size=0), lambda: OFT(r=-1, oft_block_size=0),
    lambda: OFT(eps=0.0), lambda: OFT(num_cayley_neumann_terms=0), lambda: OFT(module_dropout=1.0),
    lambda: OFT(init_weights="x"),
])
def test_bad_hyper_parameters(make):
    with pytest.raises(errors.InvalidConfigError):
        make()


def test_lokr_factor_must_divide_both_dimensions():
    with pytest.raises(errors.InvalidConfigError, match=r"64 input features of 'blk.q'"):
        LoKr(decompose_factor=5).check(dense_site(64, 48, path="blk.q"))
    with pytest.raises(errors.InvalidConfigError, match=r"48 output features of 'blk.q'"):
        LoKr(decompose_factor=32).check(dense_site(64, 48, path="blk.q"))
    with pytest.raises(errors.InvalidConfigError, match="6 input channels"):
        LoKr(decompose_factor=4).check(OTHER_SITES["conv"])
    LoKr(decompose_factor=4).check(dense_site(64, 48))


def test_oft_rejects_layers_and_sizes():
    for name in ("conv", "embed", "einsum"):
        with pytest.raises(errors.UnsupportedLayerError, match=r"OFT.*'(c|emb|e)'"):
            OFT(oft_block_size=2).check(OTHER_SITES[name])
    odd = LinearSite(path="odd", op=ContractionOp(in_shape=(4,), out_shape=(3,), axis=(-2,)),
                     layer="LinearGeneral", has_bias=False)
    with pytest.raises(errors.UnsupportedLayerError):
        OFT(oft_block_size=2).check(odd)
    with pytest.raises(errors.InvalidConfigError, match="oft_block_size=5 does not divide the 64"):
        OFT(oft_block_size=5).check(dense_site(64, 8))
    with pytest.raises(errors.InvalidConfigError, match="r=5 does not divide"):
        OFT(r=5, oft_block_size=0).check(dense_site(64, 8))
    with pytest.raises(errors.InvalidConfigError, match="1 x 1 blocks"):
        OFT(r=8, oft_block_size=0).check(dense_site(8, 8))
    OFT(oft_block_size=16).check(dense_site(64, 8))


@pytest.mark.parametrize("method", [LoHa(), LoKr(), OFT()], ids=repr)
def test_module_sites_are_rejected(method):
    site = ModuleSite(path="norm", layer="LayerNorm", param_shapes={"scale": (4,)})
    with pytest.raises(errors.UnsupportedLayerError):
        method.check(site)


# --- against HF PEFT ----------------------------------------------------------------------------

def _torch():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    return torch, peft


def hf_model(torch, peft, site, base, config, conv=False):
    """A one-layer torch module holding ``base`` (torch layout), wrapped by real HF PEFT."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if conv:
                kh, kw, i = site.op.in_shape
                self.lin = torch.nn.Conv2d(i, site.op.fan_out, (kh, kw), padding=kh // 2)
                w = np.asarray(base["kernel"]).transpose(3, 2, 0, 1)
            else:
                self.lin = torch.nn.Linear(site.op.fan_in, site.op.fan_out)
                w = np.asarray(base["kernel"]).T
            with torch.no_grad():
                self.lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
                self.lin.bias.copy_(torch.from_numpy(np.asarray(base["bias"])))

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Tiny(), config)
    model.eval()
    return model, model.base_model.model.lin


def to_torch_layout(name, value, conv_window=None):
    value = np.asarray(value)
    if conv_window is not None and name in ("lokr_w2", "lokr_w2_b", "hada_w1_b", "hada_w2_b"):
        if name.startswith("hada"):  # (kh*kw*in, r) -> (r, in*kh*kw)
            kh, kw = conv_window
            value = value.reshape(kh, kw, -1, value.shape[-1])
        value = value.transpose(3, 2, 0, 1)
        return value.reshape(value.shape[0], -1) if name != "lokr_w2" else value
    return value.T


def load_into(torch, layer, params, conv_window=None):
    with torch.no_grad():
        for name, value in params.items():
            target = getattr(layer, name)["default"]
            value = np.ascontiguousarray(to_torch_layout(name, value, conv_window))
            target.copy_(torch.from_numpy(value))


def compare(torch, model, method, params, site, base, x_np):
    with torch.no_grad():
        want = model(torch.from_numpy(x_np)).numpy()
    got = run(method, params, site, base, jnp.asarray(x_np))
    close(got, want)
    return want


LOHA_CASES = [(64, 48, dict(rank=4, alpha=8.0)), (32, 20, dict(rank=8, alpha=2.0)),
              (7, 5, dict(rank=3, alpha=3.0))]


@pytest.mark.interop
@pytest.mark.parametrize("i,o,kw", LOHA_CASES)
def test_loha_matches_hf(i, o, kw):
    torch, peft = _torch()
    site = dense_site(i, o)
    base = make_base(site)
    method = LoHa(**kw)
    model, layer = hf_model(torch, peft, site, base,
                            peft.LoHaConfig(target_modules=["lin"], r=kw["rank"], alpha=kw["alpha"]))
    params = random_params(method, site, base)
    assert model.get_nb_trainable_parameters()[0] == n_params(params)
    for name, value in params.items():
        assert tuple(getattr(layer, name)["default"].shape) == value.shape[::-1]
    load_into(torch, layer, params)
    compare(torch, model, method, params, site, base, np.asarray(inputs(site)))
    # merged HF weight == our merged kernel (transposed)
    with torch.no_grad():
        model.merge_adapter()
    close(np.asarray(merged_kernel(method, site, params, base)).T,
          layer.base_layer.weight.detach().numpy())


LOKR_CASES = [
    (64, 48, dict(rank=8, alpha=8.0)),
    (64, 48, dict(rank=2, alpha=4.0, check_init=True)),
    (64, 48, dict(rank=2, alpha=4.0, decompose_both=True, check_init=True)),
    (64, 48, dict(rank=3, alpha=6.0, decompose_factor=4)),
    (64, 48, dict(rank=1, alpha=1.0, decompose_factor=8, decompose_both=True)),
    (30, 14, dict(rank=2, alpha=2.0, decompose_both=True, init_weights="lycoris", check_init=True)),
    (17, 9, dict(rank=4, alpha=4.0, init_weights=False, check_init=True)),
]


@pytest.mark.interop
@pytest.mark.parametrize("i,o,kw", LOKR_CASES)
def test_lokr_matches_hf(i, o, kw):
    torch, peft = _torch()
    site = dense_site(i, o)
    base = make_base(site)
    method = LoKr(**{k: v for k, v in kw.items() if k != "check_init"})
    method.check(site)
    model, layer = hf_model(torch, peft, site, base, peft.LoKrConfig(
        target_modules=["lin"], r=kw["rank"], alpha=kw["alpha"],
        decompose_both=kw.get("decompose_both", False), decompose_factor=kw.get("decompose_factor", -1),
        init_weights=kw.get("init_weights", True)))
    shapes = method.param_shapes(site)
    assert model.get_nb_trainable_parameters()[0] == sum(math.prod(v) for v in shapes.values())
    hf_names = {n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
                if "default" in getattr(layer, n)}
    assert hf_names == set(shapes)
    if kw.get("check_init"):  # same zero pattern and Kaiming bound as HF's init
        params, _ = method.init(jax.random.key(0), site, base, {})
        for name, value in params.items():
            hf = getattr(layer, name)["default"].detach().numpy()
            assert hf.shape == value.shape[::-1]
            assert bool(jnp.all(value == 0)) == bool((hf == 0).all())
            bound = 1 / math.sqrt(hf.shape[1])
            for v in (np.asarray(value), hf):
                assert np.abs(v).max() <= bound and (np.abs(v).max() > bound / 2 or (v == 0).all())
    params = random_params(method, site, base)
    load_into(torch, layer, params)
    compare(torch, model, method, params, site, base, np.asarray(inputs(site, (2, 3))))


@pytest.mark.interop
@pytest.mark.parametrize("rank", [1, 4])
def test_lokr_conv_matches_hf(rank):
    torch, peft = _torch()
    site = OTHER_SITES["conv"]
    base = make_base(site)
    method = LoKr(rank=rank, alpha=2.0)
    model, layer = hf_model(torch, peft, site, base,
                            peft.LoKrConfig(target_modules=["lin"], r=rank, alpha=2.0), conv=True)
    params = random_params(method, site, base)
    assert model.get_nb_trainable_parameters()[0] == n_params(params)
    load_into(torch, layer, params, conv_window=(3, 3))
    x = np.asarray(other_inputs("conv", site))
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    close(run(method, params, site, base, jnp.asarray(x)), want)


@pytest.mark.interop
def test_loha_conv_plain_matrix_form_matches_hf():
    torch, peft = _torch()
    site = OTHER_SITES["conv"]
    base = make_base(site)
    method = LoHa(rank=2, alpha=4.0)
    model, layer = hf_model(torch, peft, site, base,
                            peft.LoHaConfig(target_modules=["lin"], r=2, alpha=4.0), conv=True)
    params = random_params(method, site, base)
    assert model.get_nb_trainable_parameters()[0] == n_params(params)
    load_into(torch, layer, params, conv_window=(3, 3))
    x = np.asarray(other_inputs("conv", site))
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    close(run(method, params, site, base, jnp.asarray(x)), want)


OFT_CASES = [
    (64, 48, dict(oft_block_size=8)),
    (64, 48, dict(oft_block_size=16, use_cayley_neumann=False)),
    (64, 24, dict(r=4, oft_block_size=0)),
    (32, 16, dict(r=2, oft_block_size=0, num_cayley_neumann_terms=3)),
    (32, 16, dict(oft_block_size=4, num_cayley_neumann_terms=7)),
    (32, 16, dict(oft_block_size=8, block_share=True)),
    (32, 16, dict(oft_block_size=8, coft=True, eps=0.05)),
    (48, 16, dict(r=3, oft_block_size=0, coft=True, eps=0.3, block_share=True,
                  use_cayley_neumann=False)),
]


@pytest.mark.interop
@pytest.mark.parametrize("i,o,kw", OFT_CASES)
def test_oft_matches_hf(i, o, kw):
    torch, peft = _torch()
    site = dense_site(i, o)
    base = make_base(site)
    method = OFT(**kw)
    method.check(site)
    model, layer = hf_model(torch, peft, site, base, peft.OFTConfig(target_modules=["lin"], **kw))
    hf_weight = layer.oft_R["default"].weight
    params = random_params(method, site, base, scale=0.1)
    assert model.get_nb_trainable_parameters()[0] == n_params(params)
    assert tuple(hf_weight.shape) == params["oft_r"].shape
    with torch.no_grad():
        hf_weight.copy_(torch.from_numpy(np.asarray(params["oft_r"])))
    compare(torch, model, method, params, site, base, np.asarray(inputs(site, (2, 3))))
    with torch.no_grad():
        model.merge_adapter()
    close(np.asarray(merged_kernel(method, site, params, base)).T,
          layer.base_layer.weight.detach().numpy())
