"""`to_lora` / `convert_to_lora`: any mergeable adapter as a LoRA of a chosen rank.

On a small NNX model (Dense, Conv with biases) each adapter gets random non-zero params, then is
converted at ranks 1, 3 and 8 (8 caps at every layer's full rank). Checked: the per-layer
error falls (and the kept energy rises) with the rank and is ~0 at full rank; the full-rank LoRA
attached to the model gives the original adapter's outputs (1e-5), while the rank-1 one clearly
does not (a negative control, as is the adapter's distance from the base model).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.arithmetic import convert_to_lora, to_lora
from peft_jax.methods import GatedLora

RANKS = (1, 3, 8)
ALL = ["up", "conv", "down"]


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(6, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.down = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        return self.down(self.norm(self.conv(nnx.relu(self.up(x)))))


# id: (method, targets)
CASES = {
    "loha": (peft_jax.LoHa(rank=2, alpha=4.0), ALL),
    "dora": (peft_jax.Dora(lora=peft_jax.Lora(rank=2, alpha=4.0)), ALL),
    "ia3": (peft_jax.IA3(), ALL),  # output scaling: the biases change too (kept as lora_bias)
    "ia3_ff": (peft_jax.IA3(feedforward=True), ALL),
    "lokr": (peft_jax.LoKr(rank=2, alpha=4.0), ["up", "down"]),
    "oft": (peft_jax.OFT(oft_block_size=2), ["up", "down"]),
    "vera": (peft_jax.Vera(rank=4), ["up", "down"]),
}
X = jax.random.normal(jax.random.key(7), (2, 7, 6))


def _model(method, targets):
    model = Net(nnx.Rngs(0))
    for i, layer in enumerate((model.up, model.conv, model.down)):  # non-zero biases (IA3 scales them)
        layer.bias[...] = jax.random.normal(jax.random.key(10 + i), layer.bias.shape)
    peft_jax.nnx.attach(model, peft_jax.place(targets, method), rngs=nnx.Rngs(1))
    state = peft_jax.nnx.adapter_state(model, "default")
    keys = jax.random.split(jax.random.key(2), len(state))
    peft_jax.nnx.load_adapter_state(model, {k: v + 0.4 * jax.random.normal(kk, v.shape, v.dtype)
                                            for kk, (k, v) in zip(keys, sorted(state.items()))})
    return model


def _outputs(model, name):
    peft_jax.nnx.set_active(model, name)
    return np.asarray(model(X))


@pytest.mark.parametrize("case", list(CASES))
def test_converted_lora_reproduces_the_adapter(case):
    method, targets = CASES[case]
    model = _model(method, targets)
    want = _outputs(model, "default")
    with peft_jax.nnx.disabled(model):
        base = np.asarray(model(X))
    assert np.abs(want - base).max() > 1e-2  # the adapter matters

    reports = {r: convert_to_lora(model, "default", r, new_name=f"r{r}") for r in RANKS}
    for path in reports[1].layers:
        fits = [reports[r].layers[path] for r in RANKS]
        errs, energies = [f.error for f in fits], [f.energy for f in fits]
        assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])), (path, errs)
        assert all(a <= b + 1e-6 for a, b in zip(energies, energies[1:])), (path, energies)
        assert fits[-1].exact and fits[-1].error < 1e-5 and fits[-1].energy > 1 - 1e-6, (path, fits[-1])
        assert fits[-1].bias == (case == "ia3")
    assert max(reports[1].layers[p].error for p in reports[1].layers) > 1e-2  # rank 1 is lossy

    full = _outputs(model, "r8")
    diff = float(np.abs(full - want).max())
    assert diff < 1e-5, diff
    assert np.abs(_outputs(model, "r1") - want).max() > 1e-3  # a low rank shows
    layer = dict(peft_jax.nnx.adapted_layers(model))["up"]
    lora = dict(layer.slots())["r8"].methods[0]
    assert (type(lora).__name__, lora.rank, lora.scale) == ("Lora", 6, 1.0)


def test_to_lora_on_values():
    """The pure function: a 2-D kernel needs no op; other kernels do; ranks are checked."""
    kernel = jax.random.normal(jax.random.key(0), (5, 4))
    sites = {"q": peft_jax.LoHa(rank=1, alpha=1.0)}
    keys = jax.random.split(jax.random.key(1), 4)
    state = {f"q/t/{k}": jax.random.normal(kk, s) for kk, (k, s) in zip(keys, [
        ("hada_w1_a", (1, 4)), ("hada_w1_b", (5, 1)), ("hada_w2_a", (1, 4)), ("hada_w2_b", (5, 1))])}
    new_sites, new_state, report = to_lora(sites, state, {"q": 1}, base={"q": {"kernel": kernel}}, name="n")
    delta = (state["q/t/hada_w1_b"] @ state["q/t/hada_w1_a"]) * (state["q/t/hada_w2_b"] @ state["q/t/hada_w2_a"])
    np.testing.assert_allclose(new_state["q/n/lora_a"] @ new_state["q/n/lora_b"], delta, atol=1e-5)  # rank 1
    assert new_sites["q"].rank == 1 and report.layers["q"].error < 1e-5 and "q" in str(report)
    with pytest.raises(errors.InvalidConfigError, match="ops="):
        to_lora(sites, state, 1, base={"q": {"kernel": kernel.reshape(5, 2, 2)}})
    with pytest.raises(errors.InvalidConfigError, match="rank"):
        to_lora(sites, state, 0, base={"q": {"kernel": kernel}})
    with pytest.raises(errors.StateError, match="base="):
        to_lora(sites, state, 1, base={})


@pytest.mark.parametrize("config,name", [
    (peft_jax.place(["up"], GatedLora(lora=peft_jax.Lora(rank=2))), "GatedLora"),
    (peft_jax.place(["norm"], peft_jax.LnTuning()), "LnTuning"),
])
def test_unconvertible_methods_raise_not_mergeable(config, name):
    model = Net(nnx.Rngs(0))
    peft_jax.nnx.attach(model, config, rngs=nnx.Rngs(1))
    with pytest.raises(errors.NotMergeableError, match=name):
        convert_to_lora(model, "default", 4)
    assert peft_jax.nnx.adapter_names(model) == {"default"}  # nothing attached


def test_merged_or_missing_adapters_are_refused():
    model = _model(peft_jax.LoHa(rank=2, alpha=4.0), ["up"])
    with pytest.raises(errors.AdapterNameError, match="nope"):
        convert_to_lora(model, "nope", 2)
    peft_jax.nnx.merge(model)
    with pytest.raises(errors.StateError, match="unmerge"):
        convert_to_lora(model, "default", 2)
    peft_jax.nnx.unmerge(model)
    convert_to_lora(model, "default", 2, new_name="ok")
    with pytest.raises(errors.AdapterNameError, match="ok"):
        convert_to_lora(model, "default", 2, new_name="ok")
    assert jnp.all(jnp.isfinite(peft_jax.nnx.adapter_state(model, "ok")["up/ok/lora_a"]))
