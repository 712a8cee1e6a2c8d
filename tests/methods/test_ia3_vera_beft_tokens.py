"""IA3, VeRA, BEFT and trainable tokens on single layers: against the real HF PEFT, and on their own.

The ``interop`` tests wrap a tiny torch module with ``peft.get_peft_model``, copy random adapter
values between HF and us (torch weights are our kernels transposed) and compare outputs (1e-5,
fp32), trainable-parameter counts and merged weights. The pure-JAX tests check, on every layer kind
(Dense, DenseGeneral with permuted axes, Conv, Einsum with permuted output axes, Embed), that
merged == unmerged outputs, that unmerge restores the arrays, that each method starts at the base,
and every typed error the methods raise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import errors
from peft_jax.methods.base import Context, LinearSite, ModuleSite
from peft_jax.methods.beft import Beft, add_output
from peft_jax.methods.ia3 import IA3
from peft_jax.methods.trainable_tokens import TrainableTokens
from peft_jax.methods.vera import Vera
from peft_jax.ops import ContractionOp, ConvOp, EinsumOp, EmbedOp, dense_op

TOL = 1e-5


def interop(test):
    """Marks an HF PEFT comparison (peft 0.21 reads transformers 5's deprecated alias; not ours)."""
    ignore = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    return pytest.mark.interop(pytest.mark.filterwarnings(ignore)(test))


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def _rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * np.float32(scale)


def _call(op, base):
    def call(x):
        y = op.apply_kernel(x, base["kernel"])
        return add_output(op, y, base["bias"]) if "bias" in base else y
    return call


def _randomize(params, seed):
    """Every param to random values (1 + noise for scales, so nothing divides by ~0)."""
    out = {}
    for i, (name, v) in enumerate(sorted(params.items())):
        noise = jnp.asarray(_rand(seed + i, v.shape, 0.5))
        out[name] = (1.0 + noise if name == "ia3_l" else noise).astype(v.dtype)
    return out


# --- HF PEFT ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    return torch, peft


def _torch_linear(torch, fan_in, fan_out, bias, seed):
    lin = torch.nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(_rand(seed, (fan_out, fan_in))))
        if bias:
            lin.bias.copy_(torch.from_numpy(_rand(seed + 1, (fan_out,))))
    return lin


def _linear_base(lin, bias):
    base = {"kernel": jnp.asarray(lin.weight.detach().numpy().T)}
    if bias:
        base["bias"] = jnp.asarray(lin.bias.detach().numpy())
    return base


def _tiny(torch, **layers):
    module = torch.nn.Module()
    for name, layer in layers.items():
        setattr(module, name, layer)
    return module


def _set(torch, param, value, shape=None):
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.array(value).reshape(shape or tuple(param.shape))))


def _run(torch, layer, x):
    with torch.no_grad():
        return layer(torch.from_numpy(np.array(x))).numpy()


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@interop
def test_ia3_linear_matches_hf(hf, feedforward, bias):
    torch, peft = hf
    lin = _torch_linear(torch, 6, 5, bias, seed=1)
    base = _linear_base(lin, bias)
    model = peft.get_peft_model(_tiny(torch, lin=lin), peft.IA3Config(
        target_modules=["lin"], feedforward_modules=["lin"] if feedforward else []))
    layer = model.base_model.model.lin
    site = LinearSite(path="lin", op=dense_op(6, 5), layer="Linear", has_bias=bias)
    method = IA3(feedforward=feedforward)
    method.check(site)
    params, updates = method.init(jax.random.key(0), site, base, {})
    assert updates == {}
    hf_l = layer.ia3_l["default"]
    assert tuple(hf_l.shape) == ((1, 6) if feedforward else (5, 1))  # HF: a row / a column
    assert params["ia3_l"].shape == ((6,) if feedforward else (5,))
    _close(params["ia3_l"], hf_l.detach().numpy().reshape(-1))  # both start at ones
    n_hf, _ = model.get_nb_trainable_parameters()
    assert n_hf == params["ia3_l"].size == sum(np.prod(s) for s in method.param_shapes(site).values())

    params = _randomize(params, 10)
    _set(torch, hf_l, params["ia3_l"])
    x = _rand(2, (3, 4, 6))
    y = method.apply(params, {}, site, _call(site.op, base), jnp.asarray(x), base, Context())
    _close(y, _run(torch, layer, x))

    merged, record = method.merge(params, {}, site, base)
    layer.merge()
    _close(merged["kernel"], layer.base_layer.weight.detach().numpy().T)
    if bias:  # input scaling leaves the bias alone
        assert ("bias" in merged) != feedforward
        _close(merged.get("bias", base.get("bias")), layer.base_layer.bias.detach().numpy())
    else:
        assert "bias" not in merged


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@interop
def test_ia3_conv_matches_hf(hf, feedforward):
    torch, peft = hf
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(_rand(3, (6, 4, 3, 3))))
        conv.bias.copy_(torch.from_numpy(_rand(4, (6,))))
    base = {"kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(conv.bias.detach().numpy())}
    model = peft.get_peft_model(_tiny(torch, conv=conv), peft.IA3Config(
        target_modules=["conv"], feedforward_modules=["conv"] if feedforward else []))
    layer = model.base_model.model.conv
    op = ConvOp(in_shape=(3, 3, 4), out_shape=(6,), kernel_size=(3, 3))
    site = LinearSite(path="conv", op=op, layer="Conv", has_bias=True)
    method = IA3(feedforward=feedforward)
    params = _randomize(method.init(jax.random.key(0), site, base, {})[0], 20)
    assert model.get_nb_trainable_parameters()[0] == params["ia3_l"].size == (4 if feedforward else 6)
    _set(torch, layer.ia3_l["default"], params["ia3_l"])
    x = _rand(5, (2, 5, 5, 4))
    y = method.apply(params, {}, site, _call(op, base), jnp.asarray(x), base, Context())
    _close(y, _run(torch, layer, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1))
    merged, _ = method.merge(params, {}, site, base)
    layer.merge()
    _close(merged["kernel"], layer.base_layer.weight.detach().numpy().transpose(2, 3, 1, 0))
    _close(merged.get("bias", base["bias"]), layer.base_layer.bias.detach().numpy())


@interop
def test_vera_matches_hf(hf):
    torch, peft = hf
    rank = 4
    sizes = {"lin1": (6, 5), "lin2": (5, 7)}  # max_in 6 (lin1), max_out 7 (lin2): both slice
    lins = {p: _torch_linear(torch, i, o, p == "lin1", seed=30 + k)
            for k, (p, (i, o)) in enumerate(sizes.items())}
    bases = {p: _linear_base(lin, p == "lin1") for p, lin in lins.items()}
    model = peft.get_peft_model(_tiny(torch, **lins), peft.VeraConfig(
        r=rank, target_modules=list(sizes), d_initial=0.1, projection_prng_key=0))
    sites = [LinearSite(path=p, op=dense_op(i, o), layer="Linear", has_bias=p == "lin1")
             for p, (i, o) in sizes.items()]
    method = Vera(rank=rank, d_initial=0.1)

    shared = method.init_shared(jax.random.key(0), sites, jnp.float32)
    hf_a = model.base_model.vera_A["default"].numpy()
    hf_b = model.base_model.vera_B["default"].numpy()
    assert shared["vera_A"].shape == hf_a.shape == (rank, 6)
    assert shared["vera_B"].shape == hf_b.shape == (7, rank)
    for ours, theirs, fan in ((shared["vera_A"], hf_a, 6), (shared["vera_B"], hf_b, rank)):
        bound = np.sqrt(6.0 / fan)  # the same kaiming-uniform bound as HF's, other random draws
        assert np.abs(np.asarray(ours)).max() <= bound and np.abs(theirs).max() <= bound
    shared = {"vera_A": jnp.asarray(hf_a), "vera_B": jnp.asarray(hf_b)}  # HF's projections

    n_ours = 0
    for k, site in enumerate(sites):
        layer = getattr(model.base_model.model, site.path)
        base = bases[site.path]
        method.check(site)
        params, updates = method.init(jax.random.key(1), site, base, shared)
        assert updates == {}
        _close(params["vera_lambda_d"], layer.vera_lambda_d["default"].detach().numpy())  # d_initial
        _close(params["vera_lambda_b"], layer.vera_lambda_b["default"].detach().numpy())  # zeros
        n_ours += sum(p.size for p in params.values())
        x = _rand(40 + k, (3, site.op.fan_in))
        call = _call(site.op, base)
        y0 = method.apply(params, shared, site, call, jnp.asarray(x), base, Context())
        _close(y0, call(jnp.asarray(x)), 0)  # lambda_b = 0: exactly the base
        params = _randomize(params, 50 + 2 * k)
        for name in params:
            _set(torch, getattr(layer, name)["default"], params[name])
        y = method.apply(params, shared, site, call, jnp.asarray(x), base, Context())
        _close(y, _run(torch, layer, x))
        merged, _ = method.merge(params, shared, site, base)
        layer.merge()
        _close(merged["kernel"], layer.base_layer.weight.detach().numpy().T)
    assert model.get_nb_trainable_parameters()[0] == n_ours == (rank + 5) + (rank + 7)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@interop
def test_beft_matches_hf(hf, bias):
    torch, peft = hf
    lin = _torch_linear(torch, 6, 5, bias, seed=60)
    base = _linear_base(lin, bias)
    if bias:
        model = peft.get_peft_model(_tiny(torch, lin=lin), peft.BeftConfig(target_modules=["lin"]))
    else:
        with pytest.warns(UserWarning, match="no bias"):  # HF warns on attach, raises on merge
            model = peft.get_peft_model(_tiny(torch, lin=lin), peft.BeftConfig(target_modules=["lin"]))
    layer = model.base_model.model.lin
    site = LinearSite(path="lin", op=dense_op(6, 5), layer="Linear", has_bias=bias)
    method = Beft()
    method.check(site)
    params, _ = method.init(jax.random.key(0), site, base, {})
    _close(params["beft_bias"], layer.beft_bias["default"].detach().numpy().reshape(-1))  # zeros
    assert model.get_nb_trainable_parameters()[0] == params["beft_bias"].size == 5
    params = _randomize(params, 70)
    _set(torch, layer.beft_bias["default"], params["beft_bias"])
    x = _rand(71, (2, 3, 6))
    y = method.apply(params, {}, site, _call(site.op, base), jnp.asarray(x), base, Context())
    _close(y, _run(torch, layer, x))
    if bias:
        merged, _ = method.merge(params, {}, site, base)
        assert set(merged) == {"bias"}
        layer.merge()
        _close(merged["bias"], layer.base_layer.bias.detach().numpy())
    else:
        with pytest.raises(ValueError, match="no bias"):
            layer.merge()
        with pytest.raises(errors.NotMergeableError, match="no bias"):
            method.merge(params, {}, site, base)


@interop
def test_trainable_tokens_matches_hf(hf):
    torch, peft = hf
    vocab, dim, indices = 11, 4, (7, 2, 9)
    emb = torch.nn.Embedding(vocab, dim)
    _set(torch, emb.weight, _rand(80, (vocab, dim)))
    table = jnp.asarray(emb.weight.detach().numpy())
    model = peft.get_peft_model(_tiny(torch, emb=emb), peft.TrainableTokensConfig(
        target_modules=["emb"], token_indices=list(indices)))
    layer = model.base_model.model.emb
    site = LinearSite(path="emb", op=EmbedOp(in_shape=(vocab,), out_shape=(dim,)), layer="Embed",
                      has_bias=False)
    method = TrainableTokens(indices=indices)
    method.check(site)
    base = {"kernel": table}
    params, _ = method.init(jax.random.key(0), site, base, {})
    hf_delta = layer.trainable_tokens_delta["default"]
    _close(params["trainable_tokens_delta"], hf_delta.detach().numpy())  # copies of the rows
    assert model.get_nb_trainable_parameters()[0] == params["trainable_tokens_delta"].size == 3 * dim

    params = _randomize(params, 81)
    _set(torch, hf_delta, params["trainable_tokens_delta"])
    ids = np.array([[0, 7, 2, 3], [9, 9, 10, 2]], np.int64)
    call = _call(site.op, base)
    y = method.apply(params, {}, site, call, jnp.asarray(ids, jnp.int32), base, Context())
    _close(y, _run(torch, layer, ids))
    query = _rand(82, (2, 3, dim))
    out = jnp.asarray(query) @ table.T
    with torch.no_grad():
        w_hf = layer.get_merged_weights(["default"]).numpy()
    _close(method.attend(params, {}, site, jnp.asarray(query), out, base), query @ w_hf.T)
    merged, record = method.merge(params, {}, site, base)
    layer.merge()
    _close(merged["kernel"], layer.base_layer.weight.detach().numpy())
    _close(method.unmerge(params, {}, site, merged, record)["kernel"], table, 0)


# --- pure JAX, every layer kind --------------------------------------------------------------------
def _ops():
    return {
        "dense": (dense_op(6, 5), (3, 6)),
        # in axes permuted: kernel axis 0 is x's last axis, kernel axis 1 is x's axis -3
        "dense_general": (ContractionOp(in_shape=(3, 4), out_shape=(2, 5), axis=(-1, -3)), (2, 4, 6, 3)),
        "conv": (ConvOp(in_shape=(3, 3, 4), out_shape=(6,), kernel_size=(3, 3)), (2, 5, 5, 4)),
        # output axes in another order than the kernel's ("bhtk" vs kernel "hdk")
        "einsum": (EinsumOp.from_string("btd,hdk->bhtk", (3, 8, 2)), (2, 5, 8)),
        "embed": (EmbedOp(in_shape=(10,), out_shape=(4,)), (2, 5)),
    }


OPS = _ops()


def _setup(kind, bias, seed=0):
    op, x_shape = OPS[kind]
    base = {"kernel": jnp.asarray(_rand(seed, op.kernel_shape))}
    if bias:
        base["bias"] = jnp.asarray(_rand(seed + 1, op.out_shape))
    if kind == "embed":
        x = jnp.asarray(np.random.default_rng(seed + 2).integers(0, op.in_shape[0], x_shape), jnp.int32)
    else:
        x = jnp.asarray(_rand(seed + 2, x_shape))
    site = LinearSite(path=f"layers/{kind}", op=op, layer=kind.title(), has_bias=bias)
    return site, base, x


def _methods(kind):
    out = [IA3(), Vera(rank=3), Beft()]
    if kind != "embed":
        out.append(IA3(feedforward=True))
    else:
        out.append(TrainableTokens(indices=(1, 4, 8)))
    return out


# a bias matters to IA3's output scaling (it is rescaled too) and to BEFT (merged into it)
def _wants_bias(kind, m):
    return kind != "embed" and isinstance(m, (IA3, Beft)) and not getattr(m, "feedforward", False)


CASES = [(kind, m, bias) for kind in OPS for m in _methods(kind) for bias in (False, True)
         if (not bias or _wants_bias(kind, m)) and not (isinstance(m, Beft) and not bias)]


def _id(case):
    kind, m, bias = case
    name = m.name + ("_ff" if getattr(m, "feedforward", False) else "")
    return f"{kind}-{name}-{'bias' if bias else 'nobias'}"


def _noise(shapes, seed):
    """Random values for every param (1 + noise for scales, so nothing divides by ~0)."""
    return {name: _rand(seed + i, shape, 0.5) + np.float32(name == "ia3_l")
            for i, (name, shape) in enumerate(sorted(shapes.items()))}


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_start_merge_unmerge(case):
    kind, method, bias = case
    site, base, x = _setup(kind, bias)
    method.check(site)
    shapes = method.param_shapes(site)
    query = jnp.asarray(_rand(9, (3, site.op.fan_out)))
    tied = kind == "embed" and not isinstance(method, IA3)  # a tied head sees the same table

    # frozen shared state (VeRA's projections) from numpy: threefry is slow to compile on CPU
    shared_shapes = jax.eval_shape(lambda: method.init_shared(jax.random.key(5), [site], jnp.float32))
    shared = {k: _rand(11, v.shape) for k, v in shared_shapes.items()}

    @jax.jit  # one compile per case instead of one per eager op
    def run(base, x, noise, query, shared):
        params, updates = method.init(jax.random.key(6), site, base, shared)
        assert updates == {}
        assert {k: tuple(v.shape) for k, v in params.items()} == shapes
        call = _call(site.op, base)
        out = {"ref": call(x), "start": method.apply(params, shared, site, call, x, base, Context())}
        out["y"] = method.apply(noise, shared, site, call, x, base, Context())
        merged, record = method.merge(noise, shared, site, base)
        assert set(merged) <= set(base)
        merged_base = {**base, **merged}
        out["merged"] = _call(site.op, merged_base)(x)
        out["restored"] = {**merged_base, **method.unmerge(noise, shared, site, merged_base, record)}
        if tied:
            out["attend"] = method.attend(noise, shared, site, query, query @ base["kernel"].T, base)
            out["attend_ref"] = query @ merged_base["kernel"].T
        return out

    out = run(base, x, _noise(shapes, 7), query, shared)
    _close(out["start"], out["ref"], 0)  # every method here starts exactly at the base
    assert out["y"].shape == out["ref"].shape and out["y"].dtype == out["ref"].dtype
    assert float(jnp.abs(out["y"] - out["ref"]).max()) > 1e-3  # the method does something
    _close(out["merged"], out["y"])
    for name in base:
        _close(out["restored"][name], base[name])
    if tied:
        _close(out["attend"], out["attend_ref"])


def test_ia3_feedforward_scales_the_input():
    site, base, x = _setup("dense_general", False)
    method = IA3(feedforward=True)
    params = _randomize(method.init(jax.random.key(0), site, base, {})[0], 1)
    y = method.apply(params, {}, site, _call(site.op, base), x, base, Context())
    l = params["ia3_l"]  # (3, 4): kernel in-axes, i.e. x's axes (-1, -3)
    _close(y, site.op.apply_kernel(x * l.T[None, :, None, :], base["kernel"]))


def test_vera_thin_path_and_dropout():
    site, base, x = _setup("dense", True)
    method = Vera(rank=4, dropout=0.5)
    assert method.needs_rng and not Vera(rank=4).needs_rng
    shared = method.init_shared(jax.random.key(0), [site], jnp.float32)
    # the projections come from projection_prng_key, whatever key the front-end passes
    again = method.init_shared(jax.random.key(1), [site], jnp.float32)
    _close(shared["vera_A"], again["vera_A"], 0)
    other = Vera(rank=4, projection_prng_key=1).init_shared(jax.random.key(0), [site], jnp.float32)
    assert not np.allclose(shared["vera_A"], other["vera_A"])
    params = _randomize(method.init(jax.random.key(0), site, base, shared)[0], 3)
    call = _call(site.op, base)
    y_eval = method.apply(params, shared, site, call, x, base, Context())
    a, b = shared["vera_A"], shared["vera_B"]
    manual = call(x) + params["vera_lambda_b"] * ((x @ a.T * params["vera_lambda_d"]) @ b.T)
    _close(y_eval, manual)
    y_train = method.apply(params, shared, site, call, x, base, Context(jax.random.key(4)))
    assert bool(jnp.isfinite(y_train).all()) and float(jnp.abs(y_train - y_eval).max()) > 1e-3
    # projections larger than needed (a second adapter's, HF allows that) are sliced
    big = {"vera_A": jnp.asarray(_rand(5, (8, 9))), "vera_B": jnp.asarray(_rand(6, (11, 8)))}
    y_big = Vera(rank=4).apply(params, big, site, call, x, base, Context())
    a, b = big["vera_A"][:4, :6], big["vera_B"][:5, :4]
    _close(y_big, call(x) + params["vera_lambda_b"] * ((x @ a.T * params["vera_lambda_d"]) @ b.T))


def test_trainable_tokens_gradient_reaches_only_its_rows():
    site, base, _ = _setup("embed", False)
    method = TrainableTokens(indices=[4, 1])  # a list is kept as a tuple
    assert method.indices == (4, 1)
    params, _ = method.init(jax.random.key(0), site, base, {})
    _close(params["trainable_tokens_delta"], base["kernel"][jnp.array([4, 1])], 0)
    ids = jnp.array([[4, 0, 4, 3]], jnp.int32)

    def loss(p):
        return method.apply(p, {}, site, _call(site.op, base), ids, base, Context()).sum()

    g = jax.jit(jax.grad(loss))(params)["trainable_tokens_delta"]
    _close(g, np.array([[2.0] * 4, [0.0] * 4], np.float32), 0)  # id 4 twice, id 1 never


# --- typed errors ----------------------------------------------------------------------------------
def test_config_errors():
    for bad in (dict(feedforward="yes"), dict(feedforward=1)):
        with pytest.raises(errors.InvalidConfigError, match="feedforward"):
            IA3(**bad)
    for bad, what in ((dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(dropout=1.0), "dropout"),
                      (dict(d_initial=float("nan")), "d_initial"),
                      (dict(projection_prng_key="0"), "prng"),
                      (dict(save_projection="yes"), "save_projection")):
        with pytest.raises(errors.InvalidConfigError, match=what):
            Vera(**bad)
    for bad, what in (((), "empty"), ((3, 1, 3), "more than once"), ((2, -1), "non-negative"),
                      ((1.5,), "integer"), ("12", "tuple"), ((True,), "integer")):
        with pytest.raises(errors.InvalidConfigError, match=what):
            TrainableTokens(indices=bad)


def test_site_errors():
    embed, _, _ = _setup("embed", False)
    dense, dense_base, x = _setup("dense", False)
    module = ModuleSite(path="norm", layer="LayerNorm", param_shapes={"scale": (6,)})
    for method in (IA3(), IA3(feedforward=True), Vera(rank=2), Beft(), TrainableTokens(indices=(1,))):
        with pytest.raises(errors.UnsupportedLayerError, match="'norm'"):
            method.check(module)
    embed_ff = r"'layers/embed' \(Embed\).*feedforward=False"
    with pytest.raises(errors.UnsupportedLayerError, match=embed_ff):
        IA3(feedforward=True).check(embed)
    with pytest.raises(errors.UnsupportedLayerError, match=r"'layers/dense' \(Dense\).*Embed"):
        TrainableTokens(indices=(1,)).check(dense)
    with pytest.raises(errors.InvalidConfigError, match=r"\[10, 12\] are out of range.*10 rows"):
        TrainableTokens(indices=(3, 10, 12)).check(embed)
    TrainableTokens(indices=(9,)).check(embed)
    # VeRA: a rank (or layer) larger than the shared projections allow
    small = Vera(rank=2).init_shared(jax.random.key(0), [dense], jnp.float32)
    with pytest.raises(errors.InvalidConfigError, match="rank"):
        Vera(rank=4).init(jax.random.key(0), dense, dense_base, small)
    params = Vera(rank=4).init(jax.random.key(0), dense, dense_base, {})[0]
    with pytest.raises(errors.InvalidConfigError, match="larger than its shared projections"):
        Vera(rank=4).apply(params, small, dense, _call(dense.op, dense_base), x, dense_base, Context())
    wide = LinearSite(path="wide", op=dense_op(6, 9), layer="Linear", has_bias=False)
    with pytest.raises(errors.InvalidConfigError, match="vera_B rows"):
        Vera(rank=2).check_shared(small, wide)
    with pytest.raises(errors.InvalidConfigError, match="no linear layers"):
        Vera(rank=2).init_shared(jax.random.key(0), [module], jnp.float32)
    # BEFT folds into the layer's own bias only
    params = Beft().init(jax.random.key(0), dense, dense_base, {})[0]
    with pytest.raises(errors.NotMergeableError, match=r"'layers/dense'.*no bias"):
        Beft().merge(params, {}, dense, dense_base)
    with pytest.raises(errors.NotMergeableError, match="no bias"):
        Beft().unmerge(params, {}, dense, dense_base, None)
    # IA3 has no tied-head form
    params = IA3().init(jax.random.key(0), embed, {"kernel": jnp.zeros((10, 4))}, {})[0]
    with pytest.raises(errors.UnsupportedLayerError, match="attend"):
        IA3().attend(params, {}, embed, jnp.ones((1, 4)), jnp.ones((1, 10)), {})
