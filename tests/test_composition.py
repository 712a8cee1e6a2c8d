"""Composition blocks (Stack, Parallel, Average) over named adapters, on both front-ends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from frontends import HARNESSES, batch
from peft_jax import errors

CONFIG = peft_jax.LoraConfig(targets=["dense", "general", "einsum"], rank=2, alpha=4.0)


def _randomize(harness):
    """Nonzero values in every adapter param (LoRA starts at B = 0, which would hide bugs)."""
    if harness.name == "nnx":
        state = peft_jax.nnx.adapter_state(harness.model)
    else:
        state = harness.peft.adapter_state(harness.variables)
    keys = jax.random.split(jax.random.key(7), len(state))
    new = {k: 0.3 * jax.random.normal(key, v.shape) for key, (k, v) in zip(keys, sorted(state.items()))}
    if harness.name == "nnx":
        peft_jax.nnx.load_adapter_state(harness.model, new)
    else:
        harness.variables = harness.peft.load_adapter_state(harness.variables, new)


def _two_adapters(front):
    harness = HARNESSES[front]()
    harness.attach(CONFIG, "a")
    harness.attach(CONFIG, "b")
    _randomize(harness)
    return harness


def _run(harness, ids, active):
    if harness.name == "nnx":
        peft_jax.nnx.set_active(harness.model, active)
        return nnx.jit(lambda m, x: m(x))(harness.model, ids)
    return jax.jit(lambda v, x: harness.peft.apply(v, x, active=active))(harness.variables, ids)


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_stack_parallel_average(front):
    harness = _two_adapters(front)
    ids = batch()["ids"]
    only_a, only_b, both = _run(harness, ids, ["a"]), _run(harness, ids, ["b"]), _run(harness, ids, None)
    assert float(jnp.max(jnp.abs(only_a - only_b))) > 1e-2  # the two adapters differ
    np.testing.assert_allclose(_run(harness, ids, peft_jax.Stack("a", "b")), both, atol=1e-5)
    # LoRA deltas add, so the order of a stack does not change the sum.
    np.testing.assert_allclose(_run(harness, ids, peft_jax.Stack("b", "a")), both, atol=1e-5)
    # Parallel: copy i of the batch goes through adapter i only.
    out = _run(harness, peft_jax.replicate(ids, 2), peft_jax.Parallel("a", "b"))
    np.testing.assert_allclose(out[: ids.shape[0]], only_a, atol=1e-5)
    np.testing.assert_allclose(out[ids.shape[0]:], only_b, atol=1e-5)
    # Average differs from both and from the sum.
    avg = _run(harness, ids, peft_jax.Average("a", "b", weights=(0.25, 0.75)))
    assert float(jnp.max(jnp.abs(avg - both))) > 1e-3
    with pytest.raises(errors.AdapterNameError, match="'c'"):
        _run(harness, ids, peft_jax.Average("a", "c"))


def test_average_is_the_weighted_mean_on_one_layer():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    wrapper = nnx.Sequential(model)
    for name in ("a", "b"):
        peft_jax.nnx.attach(wrapper, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1), name=name)
    state = peft_jax.nnx.adapter_state(wrapper)
    keys = jax.random.split(jax.random.key(3), len(state))
    peft_jax.nnx.load_adapter_state(wrapper, {k: jax.random.normal(key, v.shape)
                                              for key, (k, v) in zip(keys, sorted(state.items()))})
    x = jax.random.normal(jax.random.key(4), (2, 4))
    outs = {}
    for name in ("a", "b"):
        peft_jax.nnx.set_active(wrapper, name)
        outs[name] = wrapper(x)
    peft_jax.nnx.set_active(wrapper, peft_jax.Average("a", "b", weights=(0.3, 0.7)))
    np.testing.assert_allclose(wrapper(x), 0.3 * outs["a"] + 0.7 * outs["b"], atol=1e-5)
    with pytest.raises(errors.NotMergeableError, match="Average"):
        peft_jax.nnx.merge(wrapper)
    peft_jax.nnx.set_active(wrapper, None)
    peft_jax.nnx.merge(wrapper)  # names (not a block) merge as before


def test_bad_blocks():
    with pytest.raises(errors.InvalidConfigError, match="twice"):
        peft_jax.Stack("a", "a")
    with pytest.raises(errors.InvalidConfigError, match="2 weights"):
        peft_jax.Average("a", "b", "c", weights=(0.5, 0.5))
    harness = _two_adapters("nnx")
    with pytest.raises(errors.AdapterNameError, match=r"Stack\('a', 'missing'\)"):
        peft_jax.nnx.set_active(harness.model, peft_jax.Stack("a", "missing"))
    ids = batch()["ids"]
    with pytest.raises(errors.BatchError, match="copies"):
        _run(harness, ids[:1], peft_jax.Parallel("a", "b"))
