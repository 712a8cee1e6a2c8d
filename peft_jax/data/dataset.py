"""The in-memory form of a text-classification dataset: (text, label) pairs and label names.

Example:
    >>> data = TextClassificationData("toy", train=[("good", 1), ("bad", 0), ("fine", 1)],
    ...                               test=[("meh", 0), ("yum", 1)], label_names=("neg", "pos"))
    >>> data.majority_label(), data.majority_accuracy()
    (1, 0.5)
"""

from __future__ import annotations

import dataclasses
from collections import Counter

__all__ = ["Example", "TextClassificationData"]

Example = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class TextClassificationData:
    """Train and test splits of ``(text, label)`` with integer labels ``0..len(label_names)-1``."""

    name: str
    train: list[Example]
    test: list[Example]
    label_names: tuple[str, ...]

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
