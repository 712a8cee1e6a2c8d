"""The contract every weight method keeps, on both front-ends, with and without jit.

One row per method config x {nnx, linen} x {jit, no jit}: zero initial delta where promised,
merged == unmerged, unmerge restores the base bitwise, disabled == base, frozen leaves bitwise
unchanged and trainable leaves moved after training, and no recompilation on the second step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax
from frontends import ADAPTABLE, HARNESSES, batch, train

METHODS = {
    "lora": dict(rank=2, alpha=4.0),
    "rslora": dict(rank=4, alpha=4.0, use_rslora=True),
    "patterns": dict(rank=2, alpha=2.0, rank_pattern={".*dense": 3}, alpha_pattern={".*conv": 8.0}),
    "gaussian": dict(rank=2, init=peft_jax.Gaussian()),
    "pissa": dict(rank=2, init=peft_jax.PiSSA()),
    "olora": dict(rank=2, init=peft_jax.OLoRA()),
    "dora": dict(rank=2, alpha=4.0, use_dora=True),
    "dora_pissa": dict(rank=2, use_dora=True, init=peft_jax.PiSSA()),
    "dropout": dict(rank=2, dropout=0.2),
    "bias_and_head": dict(rank=2, bias="lora_only", modules_to_save=["head"]),
}


def _leaves(tree):
    def host(x):
        is_key = jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
        return np.array(jax.random.key_data(x) if is_key else x)
    return [host(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("front", sorted(HARNESSES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract(method, front, jit):
    harness = HARNESSES[front]()
    ids = batch()["ids"]
    before = harness.forward(ids, jit)
    harness.attach(peft_jax.LoraConfig(targets=ADAPTABLE, **METHODS[method]))
    assert harness.adapted_paths() == sorted(ADAPTABLE)

    # Every method here promises to start where the base model was (PiSSA/OLoRA up to rounding).
    np.testing.assert_allclose(harness.forward(ids, jit), before, atol=1e-5)

    trainable0, frozen0, _ = harness.split()
    trainable0, frozen0 = _leaves(trainable0), _leaves(frozen0)
    step, frozen_after, _ = train(harness, steps=4, jit=jit)
    trainable1, frozen1, _ = harness.split()
    for old, new in zip(frozen0, _leaves(frozen1)):
        assert np.array_equal(old, new), "a frozen leaf changed during training"
    moved = [not np.array_equal(old, new) for old, new in zip(trainable0, _leaves(trainable1))]
    assert moved and all(moved), f"trainable leaves that did not move: {moved}"
    if jit:
        assert step._cache_size() == 1, "the second step recompiled"

    harness.eval()
    adapted = harness.forward(ids, jit)
    assert float(jnp.max(jnp.abs(adapted - before))) > 1e-4, "training did not change the outputs"
    with harness.disabled():
        np.testing.assert_allclose(harness.forward(ids, jit), harness.base_forward(ids), atol=1e-6)

    kernels = harness.base_kernels()
    harness.merge(keep_original=True)
    assert float(jnp.max(jnp.abs(harness.forward(ids, jit) - adapted))) <= 1e-5
    harness.unmerge()
    for path, kernel in harness.base_kernels().items():
        assert np.array_equal(np.asarray(kernel), np.asarray(kernels[path])), path
    np.testing.assert_allclose(harness.forward(ids, jit), adapted, atol=1e-6)

    harness.merge(keep_original=False)
    harness.unmerge()
    for path, kernel in harness.base_kernels().items():
        np.testing.assert_allclose(kernel, kernels[path], atol=1e-5, err_msg=path)
