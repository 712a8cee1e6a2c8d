"""Gate values (UniPELT-style gated methods) can be read out after a call, in both front-ends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import peft_jax
from frontends import HARNESSES, TAP_ROLES, batch

CONFIG = peft_jax.compose(peft_jax.prefix_tuning(2, use_gating=True, count_positions=False),
                          peft_jax.adapters("seq_bn", roles=TAP_ROLES, reduction_factor=2, use_gating=True))
NAMES = ["attention_tap/default/prefix_gate", "ffn_residual/default/bottleneck_gate"]


def test_nnx_gates_read_out_after_a_jitted_call():
    harness = HARNESSES["nnx"](taps=True)
    harness.attach(CONFIG)
    ids = batch()["ids"]
    before = harness.forward(ids, jit=True)
    assert peft_jax.nnx.recorded(harness.model) == {}  # off by default: no state is added
    peft_jax.nnx.record(harness.model)
    out = nnx.jit(lambda m, x: m(x))(harness.model, ids)
    np.testing.assert_allclose(out, before, atol=1e-6)  # recording changes nothing
    gates = peft_jax.nnx.recorded(harness.model)
    assert sorted(gates) == NAMES
    assert gates[NAMES[0]].shape == (ids.shape[0], 1)
    assert bool(jnp.all((gates[NAMES[0]] > 0) & (gates[NAMES[0]] < 1)))
    assert peft_jax.nnx.recorded(harness.model) == {}  # cleared


def test_linen_gates_in_intermediates():
    harness = HARNESSES["linen"](taps=True)
    harness.attach(CONFIG)
    ids = batch()["ids"]
    out, state = jax.jit(lambda v, x: harness.peft.apply(v, x, mutable=["intermediates"]))(
        harness.variables, ids)
    np.testing.assert_allclose(out, harness.forward(ids, jit=True), atol=1e-6)
    found = {f"{site}/{k}" for site, values in state["intermediates"].items() for k in _flat(values)}
    assert found == set(NAMES)


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"
