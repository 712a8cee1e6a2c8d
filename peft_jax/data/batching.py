"""Fixed-shape numpy batches with seeded shuffling and a resumable data position.

Examples are tokenized once into arrays (``input_ids``, ``attention_mask`` of
``int32[N, max_length]`` and ``labels`` of ``int32[N]``). :class:`ShuffledBatches` walks them in a
permutation that depends only on ``(seed, epoch)``, so a :class:`DataPosition` (epoch, batch
index) saved in a checkpoint restores exactly the batches that would have come next.

Example:
    >>> import numpy as np
    >>> arrays = {"x": np.arange(10), "labels": np.arange(10) % 2}
    >>> it = ShuffledBatches(arrays, batch_size=4, seed=0)
    >>> first = next(it); saved = it.position
    >>> second = next(it)
    >>> resumed = ShuffledBatches(arrays, batch_size=4, seed=0, position=saved)
    >>> bool((next(resumed)["x"] == second["x"]).all()), saved
    (True, DataPosition(epoch=0, index=1))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from peft_jax.data.dataset import Example
from peft_jax.errors import BatchError, InvalidConfigError

__all__ = [
    "DataPosition",
    "ShuffledBatches",
    "eval_batches",
    "tokenize_examples",
]


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the next batch comes from: ``epoch`` and batch ``index`` within that epoch."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        """A JSON-friendly form for checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        """The inverse of :meth:`to_dict`."""
        return cls(int(d["epoch"]), int(d["index"]))


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], max_length: int = 128
                      ) -> dict[str, np.ndarray]:
    """Tokenizes ``(text, label)`` pairs into fixed-length arrays.

    Args:
      tokenizer: a :class:`peft_jax.models.TextTokenizer` (anything with a compatible
        ``encode(texts, max_length=...)``).
      examples: the pairs.
      max_length: every sequence is truncated / padded to this length.

    Returns:
      ``{"input_ids": int32[N, L], "attention_mask": int32[N, L], "labels": int32[N]}``.

    Example:
      >>> class Toy:
      ...     def encode(self, texts, max_length):
      ...         ids = np.ones((len(texts), max_length), np.int32)
      ...         return {"input_ids": ids, "attention_mask": ids}
      >>> tokenize_examples(Toy(), [("a", 0), ("b", 1)], 4)["labels"].tolist()
      [0, 1]
    """
    encoded = tokenizer.encode([text for text, _ in examples], max_length=max_length)
    return {"input_ids": np.asarray(encoded["input_ids"], np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"], np.int32),
            "labels": np.array([label for _, label in examples], np.int32)}


def _check(arrays: Mapping[str, np.ndarray], batch_size: int) -> int:
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not arrays:
        raise BatchError("no arrays to batch; pass e.g. the output of tokenize_examples")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise BatchError(f"arrays disagree on the number of examples: {sizes}")
    return next(iter(sizes.values()))


class ShuffledBatches(Iterator[dict[str, np.ndarray]]):
    """An endless iterator of shuffled fixed-size batches, epoch after epoch.

    The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)``; the last
    ``N % batch_size`` examples of each epoch's order are dropped so every batch has one shape
    (one compiled step).

    Args:
      arrays: equal-length arrays (first axis = examples).
      batch_size: examples per batch; must not exceed N.
      seed: shuffling seed.
      shuffle: ``False`` keeps the stored order every epoch.
      position: where to start (a saved :attr:`position`).

    Raises:
      InvalidConfigError, BatchError: a bad batch size, or arrays of different lengths.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, position: DataPosition = DataPosition()):
        n = _check(arrays, batch_size)
        if batch_size > n:
            raise BatchError(f"batch_size {batch_size} exceeds the {n} examples available")
        self.arrays = dict(arrays)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_examples = n
        self.steps_per_epoch = n // batch_size
        self._position = position
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def position(self) -> DataPosition:
        """The position of the next batch (save it with the training state)."""
        return self._position

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def batch_at(self, position: DataPosition) -> dict[str, np.ndarray]:
        """The batch at ``position`` (pure: depends only on seed and position)."""
        if not 0 <= position.index < self.steps_per_epoch:
            raise BatchError(f"batch index {position.index} is outside an epoch of "
                             f"{self.steps_per_epoch} batches")
        if self._order_epoch != position.epoch:
            self._order_epoch, self._order = position.epoch, self.order(position.epoch)
        start = position.index * self.batch_size
        take = self._order[start:start + self.batch_size]
        return {k: v[take] for k, v in self.arrays.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self._position)
        epoch, index = self._position.epoch, self._position.index + 1
        if index == self.steps_per_epoch:
            epoch, index = epoch + 1, 0
        self._position = DataPosition(epoch, index)
        return batch

    def __iter__(self) -> ShuffledBatches:
        return self


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in fixed-size batches.

    The last batch is padded by repeating its final example, and each batch carries a boolean
    ``"valid"`` field (``bool[B]``) marking the real examples: weight metrics with it.

    Example:
      >>> [b["valid"].tolist() for b in eval_batches({"x": np.arange(5)}, 3)]
      [[True, True, True], [True, True, False]]
    """
    n = _check(arrays, batch_size)
    for start in range(0, n, batch_size):
        take = np.minimum(np.arange(start, start + batch_size), n - 1)
        batch = {k: v[take] for k, v in arrays.items()}
        batch["valid"] = np.arange(start, start + batch_size) < n
        yield batch
