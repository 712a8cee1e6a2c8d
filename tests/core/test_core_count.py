"""Parameter counts and the HF PEFT summary line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.core import ParamSummary, count_params, partition, summarize


def test_count_mixed_leaves():
    tree = {
        "np": np.zeros((3, 4)),
        "jax": jnp.zeros((2,), jnp.bfloat16),
        "abstract": jax.ShapeDtypeStruct((5, 5), jnp.float32),
        "scalar": np.float32(1.0),
        "placeholder": None,
        "python": 3.0,  # not an array: counts zero
    }
    assert count_params(tree) == 12 + 2 + 25 + 1


def test_count_nnx_variables_state_and_abstract_model():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    assert count_params(nnx.state(model)) == 15
    assert count_params([model.kernel, model.bias]) == 15  # Variables as leaves
    abstract = jax.eval_shape(lambda: nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0))))
    assert count_params(abstract) == 15


def test_summary_line_matches_hf_peft():
    summary = ParamSummary(trainable=630_784, total=25_000_000)
    assert str(summary) == (
        "trainable params: 630,784 || all params: 25,000,000 || trainable%: 2.5231")
    assert summary.percent == pytest.approx(2.523136)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.total = 1
    assert ParamSummary(0, 0).percent == 0.0


def test_summarize_partition():
    params = {"kernel": np.zeros((8, 8)), "lora_a": np.zeros((8, 2)), "lora_b": np.zeros((2, 8))}
    summary = summarize(*partition(params, r"lora_.*"))
    assert (summary.trainable, summary.total) == (32, 96)
    assert str(summary).endswith("trainable%: 33.3333")
