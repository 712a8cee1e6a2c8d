"""The baselines a tuned classifier is judged against: the majority class and a linear probe.

The linear probe is a logistic regression on the frozen encoder's mean-pooled, L2-normalised
features (`peft_jax.data.linear_probe_accuracy`). Features are computed with every adapter of the
model switched off (`peft_jax.nnx.disabled`), so they are exactly the base model's, and the raw
(unnormalised) training features are returned too, for `peft_jax.train.head_init`.

Example:
    >>> b = frozen_baselines(model, tokenizer, dataset, max_length=128)  # doctest: +SKIP
    >>> b.majority_accuracy, b.linear_probe_accuracy  # doctest: +SKIP
    (0.658, 0.78)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from peft_jax import data
from peft_jax import nnx as peft_nnx

__all__ = ["Baselines", "frozen_baselines"]


@dataclasses.dataclass(frozen=True)
class Baselines:
    """Majority-class and linear-probe test accuracies, and the frozen training features.

    Attributes:
        majority_accuracy: test accuracy of always predicting the most frequent training label.
        linear_probe_accuracy: test accuracy of the logistic regression on frozen features.
        train_features: ``float32[N, hidden]`` raw mean-pooled features of the training texts.
        seconds: wall time spent.
    """

    majority_accuracy: float
    linear_probe_accuracy: float
    train_features: np.ndarray
    seconds: float


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def frozen_baselines(model: Any, tokenizer: Any, dataset: data.TextClassificationData, *,
                     max_length: int = 128, batch_size: int = 64, bucket: int = 32,
                     seed: int = 0) -> Baselines:
    """Computes both baselines for ``dataset`` with the frozen backbone of ``model``.

    Args:
        model: an encoder classifier (adapters, if attached, are switched off meanwhile).
        tokenizer: a `peft_jax.models.TextTokenizer`.
        dataset: the train / test texts and labels.
        max_length: truncation length (use the one training uses).
        batch_size: texts per forward pass.
        bucket: padded widths are multiples of this.
        seed: seeds the probe's held-out split for choosing its L2 strength.

    Returns:
        `Baselines`.
    """
    t0 = time.perf_counter()
    train_texts = [text for text, _ in dataset.train]
    test_texts = [text for text, _ in dataset.test]
    train_labels = np.array([label for _, label in dataset.train], np.int32)
    test_labels = np.array([label for _, label in dataset.test], np.int32)
    kw = dict(batch_size=batch_size, max_length=max_length, bucket=bucket, normalize=False)
    with peft_nnx.disabled(model):
        train_feats = data.encode_features(model, tokenizer, train_texts, **kw)
        test_feats = data.encode_features(model, tokenizer, test_texts, **kw)
    probe = data.linear_probe_accuracy(_normalize(train_feats), train_labels,
                                       _normalize(test_feats), test_labels, seed=seed)
    return Baselines(majority_accuracy=dataset.majority_accuracy(),
                     linear_probe_accuracy=float(probe), train_features=train_feats,
                     seconds=time.perf_counter() - t0)
