"""Every tap case's trainable count is split exactly among its methods (shared params included)."""

from __future__ import annotations

import pytest
from test_contract import TAP_CASES

import peft_jax
from frontends import HARNESSES


@pytest.mark.parametrize("front", sorted(HARNESSES))
@pytest.mark.parametrize("case", sorted(TAP_CASES))
def test_by_method_adds_up(case, front):
    harness = HARNESSES[front](taps=True)
    harness.attach(TAP_CASES[case][0])
    summary = (peft_jax.nnx.summary(harness.model) if front == "nnx"
               else harness.peft.summary(harness.variables))
    assert summary.trainable > 0
    assert sum(summary.by_method.values()) == summary.trainable, summary.by_method
