"""Merge rules on small arrays against hand-computed results, and `weighted_lora`'s own contract.

The rules (`peft_jax.arithmetic.rules`) are checked entry by entry against numbers worked out by
hand; `weighted_lora` against the algebra its types promise (``cat`` is exactly the weighted sum
of the updates, ``svd`` at full rank too, ``linear`` has HF's cross terms), against an NNX model
that runs the combined adapter, and for every typed error it promises. Parity with HF PEFT
itself is `tests/interop/test_hf_peft_weighted.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.arithmetic import rules, weighted_lora
from peft_jax.arithmetic.on_model import add_weighted_adapter, read_adapter
from peft_jax.methods import GatedLora

T1 = jnp.array([[1.0, -3.0], [2.0, 0.5]])
T2 = jnp.array([[-2.0, 1.0], [1.0, -4.0]])
T3 = jnp.array([[-0.5, 2.0], [0.25, 1.0]])


def _eq(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), rtol=1e-6, atol=0)


# --- the rules ---------------------------------------------------------------------------------------
def test_task_arithmetic():
    _eq(rules.task_arithmetic([T1, T2], [0.5, 2.0]), [[-3.5, 0.5], [3.0, -7.75]])


def test_magnitude_prune_keeps_the_largest_entries():
    # density 0.5 of 4 entries: T1 keeps -3, 2; T2 keeps -2, -4.
    _eq(rules.prune_magnitude(T1, 0.5), [[0.0, -3.0], [2.0, 0.0]])
    _eq(rules.magnitude_prune([T1, T2], [1.0, 0.5], 0.5), [[-1.0, -3.0], [2.0, -2.0]])
    _eq(rules.prune_magnitude(T1, 0.3), [[0.0, -3.0], [0.0, 0.0]])  # int(0.3 * 4) = 1 entry
    _eq(rules.prune_magnitude(T1, 1.0), T1)


def test_ties_total_and_frequency_elect_different_signs():
    # No pruning (density 1). Entry (0, 0): 1, -2, -0.5: sum -1.5 -> "-"; signs +, -, - -> "-".
    # Entry (0, 1): -3, 1, 2: sum 0 -> "+" (a tie counts as +); signs -, +, + -> "+".
    # Entry (1, 0): 2, 1, 0.25: all +.  Entry (1, 1): 0.5, -4, 1: sum -2.5 -> "-"; signs +, -, + -> "+".
    w = [1.0, 1.0, 2.0]
    total = rules.ties([T1, T2, T3], w, 1.0, "total")
    _eq(total, [[(-2.0 - 1.0) / 2, (1.0 + 4.0) / 2], [(2.0 + 1.0 + 0.5) / 3, -4.0]])
    freq = rules.ties([T1, T2, T3], w, 1.0, "frequency")
    _eq(freq, [[(-2.0 - 1.0) / 2, (1.0 + 4.0) / 2], [(2.0 + 1.0 + 0.5) / 3, (0.5 + 2.0) / 2]])


def test_ties_elects_signs_from_unweighted_tensors():
    # weights do not vote: T2's -4 outweighs T1's 0.5 even with T1 weighted 100x.
    _eq(rules.ties([T1, T2], [100.0, 1.0], 1.0)[1, 1], -4.0)


def test_ties_prunes_before_electing():
    # density 0.5: T1 -> [[0, -3], [2, 0]], T2 -> [[-2, 0], [0, -4]]; zeros never vote nor count.
    _eq(rules.ties([T1, T2], [1.0, 1.0], 0.5), [[-2.0, -3.0], [2.0, -4.0]])


def test_dare_with_given_masks():
    m1 = jnp.array([[True, False], [True, True]])
    m2 = jnp.array([[False, True], [True, False]])
    # T1 * m1 / 0.5 = [[2, 0], [4, 1]]; T2 * m2 / 0.5 = [[0, 2], [2, 0]]
    _eq(rules.dare_linear([T1, T2], [1.0, 0.5], 0.5, masks=[m1, m2]), [[2.0, 1.0], [5.0, 1.0]])
    # signs (total) of the rescaled tensors: (0,0) + -> 2; (0,1) + -> 2*0.5; (1,0): (4 + 1) / 2; (1,1): 1
    _eq(rules.dare_ties([T1, T2], [1.0, 0.5], 0.5, masks=[m1, m2]), [[2.0, 1.0], [2.5, 1.0]])


def test_dare_with_a_key_is_deterministic_and_keeps_about_density():
    big = [jnp.ones((100, 100)), jnp.ones((100, 100))]
    one = rules.dare_linear(big, [1.0, 1.0], 0.3, key=jax.random.key(0))
    again = rules.dare_linear(big, [1.0, 1.0], 0.3, key=jax.random.key(0))
    other = rules.dare_linear(big, [1.0, 1.0], 0.3, key=jax.random.key(1))
    _eq(one, again)
    assert not np.array_equal(np.asarray(one), np.asarray(other))
    # each entry is (m1 + m2) / 0.3; the mean stays 2 (DARE's rescale) and 30% +- 1% are kept
    assert abs(float(one.mean()) - 2.0) < 0.1
    kept = [rules.random_masks(jax.random.key(0), [(100, 100)] * 2, 0.3)[i].mean() for i in (0, 1)]
    assert all(abs(float(k) - 0.3) < 0.015 for k in kept)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, None, True])
def test_density_outside_range_is_refused(density):
    with pytest.raises(errors.InvalidConfigError, match="density"):
        rules.ties([T1, T2], [1.0, 1.0], density)


def test_rule_input_errors():
    with pytest.raises(errors.InvalidConfigError, match="majority_sign_method"):
        rules.ties([T1, T2], [1.0, 1.0], 0.5, "majority")
    with pytest.raises(errors.InvalidConfigError, match="2 weights for 3"):
        rules.task_arithmetic([T1, T2, T3], [1.0, 1.0])
    with pytest.raises(errors.InvalidConfigError, match="one shape"):
        rules.task_arithmetic([T1, jnp.ones(3)], [1.0, 1.0])
    with pytest.raises(errors.InvalidConfigError, match="key="):
        rules.dare_linear([T1, T2], [1.0, 1.0], 0.5)
    with pytest.raises(errors.InvalidConfigError, match="mask"):
        rules.dare_linear([T1, T2], [1.0, 1.0], 0.5, masks=[jnp.ones((3,), bool), jnp.ones((2, 2), bool)])


# --- weighted_lora -----------------------------------------------------------------------------------
def _adapter(name, seed, rank=2, alpha=4.0, paths=("q", "v"), method=None):
    keys = jax.random.split(jax.random.key(seed), 2 * len(paths))
    sites, state = {}, {}
    for i, p in enumerate(paths):
        sites[p] = method or peft_jax.Lora(rank=rank, alpha=alpha)
        state[f"{p}/{name}/lora_a"] = jax.random.normal(keys[2 * i], (6, rank))
        state[f"{p}/{name}/lora_b"] = jax.random.normal(keys[2 * i + 1], (rank, 5))
    return sites, state, name


def _delta(sites, state, name, path):
    lora = sites[path]
    return lora.scale * state[f"{path}/{name}/lora_a"] @ state[f"{path}/{name}/lora_b"]


def test_cat_is_the_exact_weighted_sum_of_updates():
    one, two = _adapter("a", 0, rank=2, alpha=4.0), _adapter("b", 1, rank=3, alpha=3.0, paths=("q",))
    sites, state = weighted_lora([one, two], [0.7, -1.5], "cat", name="ab")
    assert sites["q"].rank == 5 and sites["q"].scale == 1.0
    want_q = 0.7 * _delta(*one, "q") - 1.5 * _delta(*two, "q")
    np.testing.assert_allclose(state["q/ab/lora_a"] @ state["q/ab/lora_b"], want_q, atol=1e-5)
    # "v" has only adapter a: its rank-2 part, then zero components up to rank 5
    np.testing.assert_allclose(state["v/ab/lora_a"] @ state["v/ab/lora_b"], 0.7 * _delta(*one, "v"), atol=1e-5)
    assert not np.any(np.asarray(state["v/ab/lora_a"][:, 2:]))


def test_svd_at_full_rank_is_the_weighted_sum_and_truncation_loses():
    one, two = _adapter("a", 0), _adapter("b", 1)
    want = 0.7 * _delta(*one, "q") + 0.2 * _delta(*two, "q")
    _, full = weighted_lora([one, two], [0.7, 0.2], "svd", svd_rank=4, name="m")
    np.testing.assert_allclose(full["q/m/lora_a"] @ full["q/m/lora_b"], want, atol=1e-5)
    _, cut = weighted_lora([one, two], [0.7, 0.2], "svd", name="m")  # default: the largest rank, 2
    assert cut["q/m/lora_a"].shape == (6, 2)
    assert float(jnp.abs(cut["q/m/lora_a"] @ cut["q/m/lora_b"] - want).max()) > 1e-2


def test_linear_combines_factors_with_cross_terms():
    one, two = _adapter("a", 0), _adapter("b", 1)
    w1, w2 = 0.7, -0.2  # HF: A = sum sign * sqrt|w s| A_i, B = sum sqrt|w s| B_i (scale s = 2)
    _, state = weighted_lora([one, two], [w1, w2], "linear", name="m")
    a = np.sqrt(1.4) * one[1]["q/a/lora_a"] - np.sqrt(0.4) * two[1]["q/b/lora_a"]
    b = np.sqrt(1.4) * one[1]["q/a/lora_b"] + np.sqrt(0.4) * two[1]["q/b/lora_b"]
    np.testing.assert_allclose(state["q/m/lora_a"], a, atol=1e-6)
    np.testing.assert_allclose(state["q/m/lora_b"], b, atol=1e-6)
    exact = w1 * _delta(*one, "q") + w2 * _delta(*two, "q")
    assert float(jnp.abs(state["q/m/lora_a"] @ state["q/m/lora_b"] - exact).max()) > 1e-2  # not the sum


def test_single_adapter_forces_linear():
    one = _adapter("a", 0)
    _, state = weighted_lora([one], [0.5], "ties_svd", density=0.5, name="m")  # as HF: "linear"
    np.testing.assert_allclose(state["q/m/lora_a"] @ state["q/m/lora_b"], 0.5 * _delta(*one, "q"), atol=1e-5)


def test_dare_masks_from_a_key_or_given():
    one, two = _adapter("a", 0), _adapter("b", 1)
    kw = dict(density=0.5, name="m")
    _, k0 = weighted_lora([one, two], [1.0, 1.0], "dare_ties", key=jax.random.key(0), **kw)
    _, k0b = weighted_lora([one, two], [1.0, 1.0], "dare_ties", key=jax.random.key(0), **kw)
    _, k1 = weighted_lora([one, two], [1.0, 1.0], "dare_ties", key=jax.random.key(1), **kw)
    _eq(k0["q/m/lora_a"], k0b["q/m/lora_a"])
    assert not np.array_equal(np.asarray(k0["q/m/lora_a"]), np.asarray(k1["q/m/lora_a"]))
    ones = {f"{p}/{n}/delta": jnp.ones((6, 5), bool) for p in ("q", "v") for n in ("a", "b")}
    _, kept = weighted_lora([one, two], [1.0, 1.0], "dare_linear_svd", masks=ones, svd_rank=4, **kw)
    want = 2.0 * (_delta(*one, "q") + _delta(*two, "q"))  # everything kept, rescaled by 1 / 0.5
    np.testing.assert_allclose(kept["q/m/lora_a"] @ kept["q/m/lora_b"], want, atol=1e-4)


def test_the_combination_runs_on_an_nnx_model():
    """The (sites, state) result attached and loaded gives the merged kernel W + delta."""
    model = nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 5, rngs=nnx.Rngs(1)))
    for name, seed, rank in (("a", 2, 2), ("b", 3, 3)):
        peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0", "2"], rank=rank, alpha=4.0),
                            rngs=nnx.Rngs(seed), name=name)
        state = peft_jax.nnx.adapter_state(model, name)
        keys = jax.random.split(jax.random.key(seed), len(state))
        peft_jax.nnx.load_adapter_state(model, {k: jax.random.normal(kk, v.shape) for kk, (k, v) in
                                                zip(keys, sorted(state.items()))})
    src = [read_adapter(model, n) for n in ("a", "b")]
    want = {p: sum(w * r.sites[p][0].scale * r.state[f"{p}/{r.name}/lora_a"] @ r.state[f"{p}/{r.name}/lora_b"]
                   for r, w in zip(src, (0.6, -0.8))) for p in ("layers/0", "layers/2")}
    x = jax.random.normal(jax.random.key(9), (4, 6))
    with peft_jax.nnx.disabled(model):
        base = model(x)
    add_weighted_adapter(model, ["a", "b"], [0.6, -0.8], "ab", combination_type="cat")
    assert "ab" in peft_jax.nnx.adapter_names(model)
    peft_jax.nnx.set_active(model, "ab")
    got = model(x)
    h = jax.nn.relu(x @ (model.layers[0].kernel[...] + want["layers/0"]) + model.layers[0].base_layer.bias[...])
    ref = h @ (model.layers[2].kernel[...] + want["layers/2"]) + model.layers[2].base_layer.bias[...]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)  # logits up to ~100: float32 order
    assert float(jnp.abs(got - base).max()) > 1e-2  # the combined adapter does something
    with pytest.raises(errors.AdapterNameError):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")


@pytest.mark.parametrize("adapters,weights,kind,options,match", [
    ([_adapter("a", 0, rank=2), _adapter("b", 1, rank=3)], [1.0, 1.0], "ties", {"density": 0.5}, "one rank"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0], "svd", {}, "2 adapters"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "mean", {}, "unknown combination_type"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "ties", {}, "needs density"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "ties", {"density": 0.0}, "density"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "magnitude_prune_svd", {"density": 2.0}, "density"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "dare_linear", {"density": 0.5}, "key="),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "svd", {"masks": {}}, "DARE"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "ties", {"density": 0.5, "majority_sign_method": "x"},
     "majority_sign_method"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "svd", {"svd_clamp": 1.5}, "svd_clamp"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, 1.0], "svd", {"svd_rank": 0}, "svd_rank"),
    ([_adapter("a", 0), _adapter("b", 1)], [1.0, float("nan")], "svd", {}, "finite"),
    ([_adapter("a", 0, method=peft_jax.Dora(lora=peft_jax.Lora(rank=2))), _adapter("b", 1)], [1.0, 1.0], "svd",
     {}, "plain LoRA"),
    ([_adapter("a", 0, method=GatedLora(lora=peft_jax.Lora(rank=2))), _adapter("b", 1)], [1.0, 1.0],
     "cat", {}, "plain LoRA"),
    ([_adapter("a", 0, method=peft_jax.IA3()), _adapter("b", 1)], [1.0, 1.0], "cat", {}, "plain LoRA"),
    ([_adapter("a", 0, method=peft_jax.Lora(rank=2, lora_bias=True)), _adapter("b", 1)], [1.0, 1.0], "cat", {},
     "lora_bias"),
    ([], [], "svd", {}, "at least one"),
], ids=["ranks", "weights", "type", "no-density", "density-0", "density-2", "dare-no-key", "masks-not-dare",
        "sign-method", "clamp", "svd-rank", "nan-weight", "dora", "gated", "ia3", "lora-bias", "empty"])
def test_typed_errors(adapters, weights, kind, options, match):
    with pytest.raises(errors.InvalidConfigError, match=match):
        weighted_lora(adapters, weights, kind, **options)
