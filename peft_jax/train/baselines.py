"""The baselines a tuned classifier is judged against: the majority class and a linear probe.

The linear probe is a logistic regression (`peft_jax.data.linear_probe_accuracy`) on the frozen
base model's pooled, L2-normalised features, computed by `peft_jax.train.classify.frozen_features`
with every adapter switched off.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(120, 4)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
    >>> b = baselines(x[:80], y[:80], x[80:], y[80:])
    >>> b.linear_probe_accuracy > 0.85, b.majority_accuracy < 0.7
    (True, True)
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from peft_jax import data

__all__ = ["Baselines", "baselines"]


@dataclasses.dataclass(frozen=True)
class Baselines:
    """Majority-class and linear-probe test accuracies.

    Attributes:
        majority_accuracy: test accuracy of always predicting the most frequent training label.
        linear_probe_accuracy: test accuracy of the logistic regression on frozen features.
        seconds: wall time the probe took (feature extraction not included).
    """

    majority_accuracy: float
    linear_probe_accuracy: float
    seconds: float


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def baselines(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
              test_labels: np.ndarray, *, seed: int = 0) -> Baselines:
    """Both baselines from frozen features (``float[N, D]``) and integer labels.

    Args:
        train_features, train_labels: the training split.
        test_features, test_labels: the test split.
        seed: seeds the probe's held-out split for choosing its L2 strength.
    """
    t0 = time.perf_counter()
    probe = data.linear_probe_accuracy(_normalize(train_features), train_labels,
                                       _normalize(test_features), test_labels, seed=seed)
    return Baselines(majority_accuracy=data.majority_accuracy(train_labels, test_labels),
                     linear_probe_accuracy=float(probe), seconds=time.perf_counter() - t0)
