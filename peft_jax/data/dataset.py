"""The in-memory form of a text-classification dataset: (text, label) pairs and label names.

Example:
    >>> data = TextClassificationData("toy", train=[("good", 1), ("bad", 0), ("fine", 1)],
    ...                               test=[("meh", 0), ("yum", 1)], label_names=("neg", "pos"))
    >>> data.majority_label(), data.majority_accuracy()
    (1, 0.5)
    >>> held = data.with_validation(1 / 3, seed=0)
    >>> len(held.train), len(held.val), held.test == data.test
    (2, 1, True)
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from peft_jax.errors import DataError, InvalidConfigError

__all__ = ["Example", "TextClassificationData", "carve"]

Example = tuple[str, int]


def carve(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Splits ``items`` into ``(kept, carved)``, ``carved`` a seeded ``fraction`` of them.

    The carved rows keep their original order; so do the kept ones.

    Example:
        >>> carve(list(range(10)), 0.3, seed=0)
        ([0, 1, 3, 5, 7, 8, 9], [2, 4, 6])
    """
    if not 0 <= fraction < 1:
        raise InvalidConfigError(f"a split fraction must be in [0, 1), got {fraction!r}")
    count = int(round(fraction * len(items)))
    chosen = set(np.random.default_rng(seed).permutation(len(items))[:count].tolist())
    return ([x for i, x in enumerate(items) if i not in chosen],
            [x for i, x in enumerate(items) if i in chosen])


@dataclasses.dataclass(frozen=True)
class TextClassificationData:
    """Train, test and (optional) validation splits of ``(text, label)`` with integer labels
    ``0..len(label_names)-1``."""

    name: str
    train: list[Example]
    test: list[Example]
    label_names: tuple[str, ...]
    val: list[Example] = dataclasses.field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_label(self) -> int:
        """The most frequent training label."""
        return Counter(label for _, label in self.train).most_common(1)[0][0]

    def majority_accuracy(self) -> float:
        """Test accuracy of always predicting the most frequent training label."""
        majority = self.majority_label()
        return sum(label == majority for _, label in self.test) / max(len(self.test), 1)

    def with_validation(self, fraction: float, seed: int) -> TextClassificationData:
        """A copy whose ``val`` split is a seeded ``fraction`` of the training examples (taken
        out of ``train``); ``test`` is left alone. ``fraction=0`` leaves ``val`` empty."""
        train, val = carve(list(self.train), fraction, seed)
        if fraction > 0 and (not val or not train):
            raise DataError(f"{self.name}: {len(self.train)} training examples are too few to "
                            f"carve a {fraction:g} validation split; lower --val-fraction")
        return dataclasses.replace(self, train=train, val=val)
