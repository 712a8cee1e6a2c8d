"""Classification scores from a confusion matrix: per-class precision, recall and F1, macro-F1.

Example:
    >>> scores = classification_scores([[3, 1], [0, 4]], ("neg", "pos"), digits=3)
    >>> scores["macro_f1"], scores["per_class"]["neg"]
    (0.873, {'precision': 1.0, 'recall': 0.75, 'f1': 0.857, 'support': 4})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["classification_scores"]


def classification_scores(confusion: Any, label_names: Sequence[str], digits: int = 4
                          ) -> dict[str, Any]:
    """Scores of a confusion matrix (rows: true class, columns: predicted class).

    A class never predicted has precision 0; one with no examples has recall 0 (both as
    scikit-learn's ``zero_division=0``). Values are rounded to ``digits``.

    Returns:
        ``{"accuracy", "macro_f1", "per_class": {name: {precision, recall, f1, support}},
        "confusion_matrix": [[int]], "labels": [name]}``.
    """
    counts = np.asarray(confusion, np.int64)
    hits = np.diag(counts).astype(np.float64)
    predicted, actual = counts.sum(0), counts.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    r = lambda x: round(float(x), digits)  # noqa: E731
    return {
        "accuracy": r(hits.sum() / max(counts.sum(), 1)),
        "macro_f1": r(f1.mean()),
        "per_class": {name: {"precision": r(p), "recall": r(q), "f1": r(f), "support": int(n)}
                      for name, p, q, f, n in zip(label_names, precision, recall, f1, actual)},
        "confusion_matrix": counts.tolist(),
        "labels": list(label_names),
    }
