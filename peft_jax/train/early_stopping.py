"""Early stopping on the validation split: stop when an evaluation metric has not improved for
``patience`` evaluations in a row.

`fit` asks the rule after every periodic evaluation (``should_stop=``); the run then saves its
state at that step and ends, keeping the parameters of the last step (not of the best one: the
best evaluation is reported in the record). The rule holds no hidden state a checkpoint would
lose: `EarlyStopping.replay` rebuilds it from the ``eval_*`` records of ``metrics.jsonl``, so a
resumed run stops exactly where an uninterrupted one does.

Example:
    >>> rule = EarlyStopping(patience=2)
    >>> [rule(step, {"loss": loss}) for step, loss in [(1, 0.9), (2, 0.8), (3, 0.85), (4, 0.81)]]
    [False, False, False, True]
    >>> rule.best_step, rule.best
    (2, 0.8)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from peft_jax.errors import InvalidConfigError

__all__ = ["EarlyStopping"]


@dataclasses.dataclass
class EarlyStopping:
    """Stops after ``patience`` evaluations without an improvement of ``metric`` by more than
    ``min_delta`` (lower is better with ``mode="min"``, higher with ``"max"``)."""

    patience: int
    metric: str = "loss"
    mode: str = "min"
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0
    stopped_at: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise InvalidConfigError(f"early-stopping patience must be an integer >= 1, got {self.patience!r}")
        if self.mode not in ("min", "max"):
            raise InvalidConfigError(f"early-stopping mode must be 'min' or 'max', got {self.mode!r}")

    def __call__(self, step: int, results: Mapping[str, Any]) -> bool:
        """Records the evaluation at ``step``; ``True`` when training should stop."""
        if self.metric not in results:
            raise InvalidConfigError(f"early stopping watches {self.metric!r}, which the evaluation "
                                     f"does not report (it reports {sorted(results)})")
        value = float(results[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or (math.isfinite(value) and sign * (self.best - value) > self.min_delta):
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            self.stopped_at = step
        return self.stopped_at is not None

    def replay(self, records: Iterable[Mapping[str, Any]], until: int) -> bool:
        """Feeds the ``eval_<metric>`` records up to step ``until`` (a resumed run's start);
        returns whether the run had already stopped."""
        key = f"eval_{self.metric}"
        for record in records:
            if key in record and record.get("step", 0) <= until and self.stopped_at is None:
                self(record["step"], {self.metric: record[key]})
        return self.stopped_at is not None
