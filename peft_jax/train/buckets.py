"""Length-bucketed batches: shuffled batches of similar-length texts, each trimmed to a bucket.

Tokenized text arrays are right-padded to ``max_length``, yet most reviews are far shorter. Sorting
examples by length inside small random pools and trimming each batch to its longest text (rounded
up to a multiple of ``bucket``) cuts the padded tokens a step computes on, while only
``max_length / bucket`` shapes ever compile. The order of epoch ``e`` depends only on
``(seed, e)``, so a `peft_jax.data.DataPosition` restores the exact next batch.

Example:
    >>> import numpy as np
    >>> mask = (np.arange(8)[None] < np.array([[2], [8], [3], [7]])).astype(np.int32)
    >>> arrays = {"input_ids": mask * 5, "attention_mask": mask, "labels": np.arange(4)}
    >>> it = LengthBucketedBatches(arrays, batch_size=2, bucket=4, seed=0)
    >>> sorted(next(it)["input_ids"].shape[1] for _ in range(2))
    [4, 8]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from peft_jax.data import DataPosition
from peft_jax.errors import BatchError, InvalidConfigError

__all__ = ["LengthBucketedBatches", "sorted_eval_batches"]


def _lengths_and_width(arrays: Mapping[str, np.ndarray], batch_size: int, bucket: int
                       ) -> tuple[np.ndarray, int, int]:
    if batch_size < 1 or bucket < 1:
        raise InvalidConfigError(f"batch_size and bucket must be >= 1, got {batch_size}, {bucket}")
    if "attention_mask" not in arrays:
        raise BatchError("length bucketing needs an 'attention_mask' array (int[N, max_length])")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise BatchError(f"arrays disagree on the number of examples: {sizes}")
    mask = np.asarray(arrays["attention_mask"])
    return mask.sum(axis=1), mask.shape[1], len(mask)


def _take(arrays: Mapping[str, np.ndarray], rows: np.ndarray, width: int, full: int
          ) -> dict[str, np.ndarray]:
    out = {}
    for key, value in arrays.items():
        value = value[rows]
        if value.ndim >= 2 and value.shape[1] == full:
            value = value[:, :width]
        out[key] = value
    return out


def _width(lengths: np.ndarray, bucket: int, full: int) -> int:
    longest = max(int(lengths.max()), 1)
    return int(min(full, -(-longest // bucket) * bucket))


class LengthBucketedBatches(Iterator[dict[str, np.ndarray]]):
    """An endless iterator of shuffled, length-bucketed batches of ``batch_size`` examples.

    Each epoch: a seeded permutation (the last ``N % batch_size`` examples of it are left out of
    that epoch), cut into pools of ``pool`` batches; each pool is sorted by length and cut into
    batches; the batches of the epoch are then shuffled. Arrays whose second axis is the padded
    length (``input_ids``, ``attention_mask``, ``token_type_ids``) are trimmed per batch.

    Args:
        arrays: equal-length arrays, including ``attention_mask: int[N, max_length]``.
        batch_size: examples per batch (at most N).
        seed: shuffling seed.
        bucket: trimmed widths are multiples of this (capped at ``max_length``).
        pool: batches per sorting pool (1: no sorting, larger: tighter buckets, less randomness).
        position: where to start (an `peft_jax.data.DataPosition`).

    Raises:
        InvalidConfigError, BatchError: bad sizes, no attention mask, or mismatched arrays.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 bucket: int = 32, pool: int = 16, position: DataPosition = DataPosition()):
        self.lengths, self.max_length, n = _lengths_and_width(arrays, batch_size, bucket)
        if batch_size > n:
            raise BatchError(f"batch_size {batch_size} exceeds the {n} examples available")
        if pool < 1:
            raise InvalidConfigError(f"pool must be >= 1, got {pool}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size, self.seed, self.bucket, self.pool = batch_size, seed, bucket, pool
        self.num_examples = n
        self.steps_per_epoch = n // batch_size
        self._position = position
        self._epoch, self._batches = -1, []

    @property
    def position(self) -> DataPosition:
        """The position of the next batch."""
        return self._position

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_examples)[: self.steps_per_epoch * self.batch_size]
        size = self.pool * self.batch_size
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def widths(self) -> list[int]:
        """The trimmed widths that can occur (one compiled program each)."""
        return sorted({min(self.max_length, k * self.bucket)
                       for k in range(1, -(-self.max_length // self.bucket) + 1)})

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, index = self._position.epoch, self._position.index
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
        rows = self._batches[index]
        index += 1
        self._position = DataPosition(epoch + index // self.steps_per_epoch,
                                      index % self.steps_per_epoch)
        return _take(self.arrays, rows, _width(self.lengths[rows], self.bucket, self.max_length),
                     self.max_length)

    def __iter__(self) -> LengthBucketedBatches:
        return self


def sorted_eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, bucket: int = 32
                        ) -> Iterator[dict[str, Any]]:
    """Every example once, sorted by length, in batches trimmed to a bucket width.

    The last batch is filled up by repeating its final example; each batch has a boolean
    ``"valid"`` field marking the real rows and an ``"index"`` field with their positions in
    ``arrays``.

    Example:
        >>> mask = (np.arange(6)[None] < np.array([[1], [6], [2]])).astype(np.int32)
        >>> [b["input_ids"].shape for b in sorted_eval_batches(
        ...     {"input_ids": mask, "attention_mask": mask}, 2, bucket=2)]
        [(2, 6), (2, 2)]
    """
    lengths, full, n = _lengths_and_width(arrays, batch_size, bucket)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        valid = np.arange(batch_size) < len(rows)
        rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
        batch = _take(arrays, rows, _width(lengths[rows], bucket, full), full)
        batch["valid"] = valid
        batch["index"] = rows
        yield batch
