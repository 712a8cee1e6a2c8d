"""Parity of our LoRA on convolutions with the real HF PEFT (torch CPU).

The cases follow HF PEFT's custom-model tests (``tests/test_custom_models.py``): Conv1d, Conv2d
and Conv3d with windows > 1, a stride and padding; a grouped Conv2d (``groups=2``, rank a
multiple of it); ``lora_bias=True`` on a conv and a linear; rsLoRA on a conv. Each wraps a tiny
torch module with ``peft.get_peft_model``, sets HF's ``lora_B`` (and its bias) to random values,
builds the same layers in flax NNX (channels-last), copies base and adapter weights, and checks
outputs (1e-4, fp32), trainable counts, and merging (ours vs ``merge_and_unload``; both sides
refuse the grouped conv). The Linen front-end is checked once against NNX on the 2-D case.

Layouts: torch conv weights are ``(out, in / groups, *window)``, ours ``(*window, in / groups,
out)``. HF's ``lora_A`` is a conv ``(r, in, *window)`` over all inputs -> ours ``(*window, in,
r)``; HF's ``lora_B`` a (grouped) 1x1 conv ``(out, r / groups, 1...)`` -> ours ``(r / groups,
out)``; the linear ``lora_B`` ``(out, r)`` -> ``(r, out)``; ``lora_B.bias`` -> ``lora_bias``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peft_jax  # noqa: E402
from peft_jax import errors  # noqa: E402

pytestmark = pytest.mark.interop

TOL = 1e-4
MERGE_TOL = 1e-5
IN, OUT, HIDDEN = 4, 6, 5

# name: (spatial dims, window, stride, padding, groups, rank, alpha, lora_bias, rslora, with linear)
CASES = {
    "conv1d": (1, 3, 2, 1, 1, 4, 8.0, False, False, False),
    "conv2d": (2, 3, 2, 1, 1, 4, 8.0, False, False, False),
    "conv3d": (3, 3, 2, 1, 1, 2, 6.0, False, False, False),
    "conv2d_groups": (2, 3, 1, 1, 2, 4, 8.0, False, False, False),
    "conv2d_lora_bias": (2, 3, 2, 1, 1, 4, 8.0, True, False, True),
    "conv2d_rslora": (2, 3, 2, 1, 1, 4, 8.0, False, True, False),
}
SPATIAL = {1: (11,), 2: (9, 8), 3: (7, 6, 5)}
TORCH_CONV = {1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}


class TorchNet(torch.nn.Module):
    """``conv`` (channels-first in), output moved channels-last, then ``lin`` after a ReLU."""

    def __init__(self, nd, window, stride, padding, groups, with_linear):
        super().__init__()
        self.conv = getattr(torch.nn, TORCH_CONV[nd])(IN, OUT, window, stride=stride,
                                                      padding=padding, groups=groups)
        self.lin = torch.nn.Linear(OUT, HIDDEN) if with_linear else None

    def forward(self, x):
        y = self.conv(x).movedim(1, -1)
        return y if self.lin is None else self.lin(torch.relu(y))


class NnxNet(nnx.Module):
    def __init__(self, nd, window, stride, padding, groups, with_linear, rngs):
        self.conv = nnx.Conv(IN, OUT, kernel_size=(window,) * nd, strides=(stride,) * nd,
                             padding=[(padding, padding)] * nd, feature_group_count=groups, rngs=rngs)
        self.lin = nnx.Linear(OUT, HIDDEN, rngs=rngs) if with_linear else nnx.data(None)

    def __call__(self, x):
        y = self.conv(x)
        return y if self.lin is None else self.lin(jax.nn.relu(y))


class LinenNet(nn.Module):
    nd: int
    window: int
    stride: int
    padding: int
    groups: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(OUT, kernel_size=(self.window,) * self.nd, strides=(self.stride,) * self.nd,
                       padding=[(self.padding, self.padding)] * self.nd,
                       feature_group_count=self.groups, name="conv")(x)


def _np(t) -> np.ndarray:
    return t.detach().numpy()


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch ``(out, in, *window)`` -> ours ``(*window, in, out)``."""
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def _hf_adapter(layer, is_conv: bool) -> dict[str, np.ndarray]:
    a = _np(layer.lora_A["default"].weight)
    b = _np(layer.lora_B["default"].weight)
    if is_conv:
        a, b = _conv_kernel(a), b.reshape(b.shape[:2])
    else:
        a = a.T
    out = {"lora_a": a, "lora_b": b.T}
    if layer.lora_B["default"].bias is not None:
        out["lora_bias"] = _np(layer.lora_B["default"].bias)
    return out


def _set(var, value: np.ndarray) -> None:
    assert tuple(var.shape) == value.shape, (var.shape, value.shape)
    var[...] = jnp.asarray(value, var[...].dtype)


def _build(name):
    nd, window, stride, padding, groups, rank, alpha, lora_bias, rslora, with_linear = CASES[name]
    torch.manual_seed(0)
    base = TorchNet(nd, window, stride, padding, groups, with_linear).eval()
    ours = NnxNet(nd, window, stride, padding, groups, with_linear, nnx.Rngs(0))
    _set(ours.conv.kernel, _conv_kernel(_np(base.conv.weight)))
    _set(ours.conv.bias, _np(base.conv.bias))
    if with_linear:
        _set(ours.lin.kernel, _np(base.lin.weight).T)
        _set(ours.lin.bias, _np(base.lin.bias))
    x = np.random.default_rng(1).standard_normal((2, *SPATIAL[nd], IN)).astype(np.float32)
    ref_base = _run_torch(base, x)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), ref_base, atol=TOL, rtol=0)

    targets = ["conv", "lin"] if with_linear else ["conv"]
    hf_cfg = peft.LoraConfig(target_modules=targets, r=rank, lora_alpha=alpha, lora_bias=lora_bias,
                             use_rslora=rslora)
    if groups > 1:  # HF warns at wrap time that the grouped conv cannot merge
        with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
            hf = peft.get_peft_model(base, hf_cfg)
    else:
        hf = peft.get_peft_model(base, hf_cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in targets:
            lora_b = getattr(hf.base_model.model, t).lora_B["default"]
            lora_b.weight.copy_(torch.randn(lora_b.weight.shape, generator=gen) * 0.3)
            if lora_bias:
                lora_b.bias.copy_(torch.randn(lora_b.bias.shape, generator=gen) * 0.3)

    cfg = peft_jax.LoraConfig(targets=targets, rank=rank, alpha=alpha, lora_bias=lora_bias,
                              use_rslora=rslora)
    peft_jax.nnx.attach(ours, cfg, rngs=nnx.Rngs(0))
    for t in targets:
        slot = getattr(ours, t).default
        values = _hf_adapter(getattr(hf.base_model.model, t), is_conv=t == "conv")
        names = {"lora_a", "lora_b"} | ({"lora_bias"} if lora_bias else set())
        assert set(values) == names
        for key, value in values.items():
            _set(getattr(slot, key), value)
    return hf, ours, x, ref_base


def _run_torch(model, x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    with torch.no_grad():
        return model(xt).numpy()


def _run_ours(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x)))


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("name", list(CASES))
def test_conv_lora_matches_hf(name):
    groups = CASES[name][4]
    hf, ours, x, ref_base = _build(name)
    ref = _run_torch(hf, x)
    got = _run_ours(ours, x)
    assert _maxdiff(got, ref) < TOL
    assert _maxdiff(ref, ref_base) > 100 * TOL  # the adapter clearly changes the output
    assert peft_jax.nnx.summary(ours).trainable == hf.get_nb_trainable_parameters()[0]

    if groups > 1:
        with pytest.raises(errors.NotMergeableError, match="grouped"):
            peft_jax.nnx.merge(ours)
        assert _maxdiff(_run_ours(ours, x), got) == 0.0  # nothing changed
        with pytest.raises(NotImplementedError, match="groups > 1"):
            hf.merge_and_unload()
        return
    peft_jax.nnx.merge(ours)
    merged = _run_ours(ours, x)
    assert _maxdiff(merged, got) < MERGE_TOL
    hf_merged = _run_torch(hf.merge_and_unload(), x)
    assert _maxdiff(hf_merged, ref) < MERGE_TOL
    assert _maxdiff(merged, hf_merged) < TOL


def test_linen_conv2d_matches_nnx():
    nd, window, stride, padding, groups, rank, alpha, *_ = CASES["conv2d"]
    hf, ours, x, _ = _build("conv2d")
    expected = _run_ours(ours, x)
    module = LinenNet(nd, window, stride, padding, groups)
    xj = jnp.asarray(x)
    conv = ours.conv.base_layer
    variables = {"params": {"conv": {"kernel": conv.kernel[...], "bias": conv.bias[...]}}}
    cfg = peft_jax.LoraConfig(targets=["conv"], rank=rank, alpha=alpha)
    handle = peft_jax.linen.attach(module, cfg).plan(variables, xj)
    variables = handle.init(jax.random.key(1), variables)
    slot = variables["adapters"]["conv"]["default"]
    assert set(slot) == {"lora_a", "lora_b"}
    values = _hf_adapter(hf.base_model.model.conv, is_conv=True)
    for key, value in values.items():
        assert tuple(slot[key].shape) == value.shape, (key, slot[key].shape, value.shape)
    variables["adapters"]["conv"]["default"] = {k: jnp.asarray(v) for k, v in values.items()}
    got = np.asarray(handle.apply(variables, xj))
    assert _maxdiff(got, expected) < MERGE_TOL
    assert _maxdiff(got, _run_torch(hf, x)) < TOL
    assert handle.summary(variables).trainable == hf.get_nb_trainable_parameters()[0]
