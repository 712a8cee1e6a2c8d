"""The method interface's optional hooks, through both front-ends: a method written outside the
library (one small class), a regularizer added to the loss, and shared state stored once."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft_jax
from frontends import HARNESSES, batch
from peft_jax.methods import Mergeable, Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputShift(Method, Mergeable):
    """A user's own method: ``call(x) + shift`` with an L2 penalty ``weight * |shift|^2``."""

    name: ClassVar[str] = "output_shift"
    weight: float = 0.5

    def init(self, key, site, base, shared):
        return {"shift": jax.random.normal(key, site.op.out_shape)}, {}

    def apply(self, params, shared, site, call, x, base, ctx):
        return call(x) + params["shift"]

    def regularizer(self, params, shared, site):
        return self.weight * jnp.sum(params["shift"] ** 2)

    def merge(self, params, shared, site, base):
        return {"bias": base["bias"] + params["shift"]}, None

    def unmerge(self, params, shared, site, base, record):
        return {"bias": base["bias"] - params["shift"]}


@pytest.mark.parametrize("front", sorted(HARNESSES))
def test_a_method_written_outside_the_library_attaches_regularizes_and_merges(front):
    harness = HARNESSES[front]()
    ids = batch()["ids"]
    base = harness.forward(ids, jit=False)
    harness.attach(peft_jax.compose(peft_jax.place(["dense", "head"], OutputShift()),
                                    peft_jax.LoraConfig(targets=["conv"], rank=2)))
    adapted = harness.forward(ids, jit=False)
    assert float(jnp.abs(adapted - base).max()) > 1e-3
    if front == "nnx":
        shifts = [m.default.shift[...] for p, m in peft_jax.nnx.adapted_layers(harness.model) if p != "conv"]
        got = peft_jax.nnx.regularizer(harness.model)
    else:
        shifts = [harness.variables["adapters"][p]["default"]["shift"] for p in ("dense", "head")]
        got = harness.peft.regularizer(harness.variables)
    np.testing.assert_allclose(got, sum(0.5 * float(jnp.sum(s ** 2)) for s in shifts), rtol=1e-6)
    harness.merge()
    np.testing.assert_allclose(harness.forward(ids, jit=False), adapted, atol=1e-5)


def test_regularizer_is_zero_without_such_methods():
    harness = HARNESSES["nnx"]()
    harness.attach(peft_jax.LoraConfig(targets=["dense"], rank=2))
    assert float(peft_jax.nnx.regularizer(harness.model)) == 0.0


def test_shared_state_is_stored_once_and_frozen():
    harness = HARNESSES["nnx"]()
    harness.attach(peft_jax.place(["dense", "conv", "general"], peft_jax.Vera(rank=4)))
    _, trainable, frozen = peft_jax.nnx.split(harness.model)
    shared = [p for p, _ in nnx.to_flat_state(frozen) if p[-1] in ("vera_A", "vera_B")]
    assert len(shared) == 2, shared  # one vera_A and one vera_B for the three layers
    assert not [p for p, _ in nnx.to_flat_state(trainable) if p[-1] in ("vera_A", "vera_B")]
    state = peft_jax.nnx.adapter_state(harness.model)
    assert state["default/shared/vera_A"].shape == (4, 8 * 3)  # conv fan_in = window 3 x 8 channels
