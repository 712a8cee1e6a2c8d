"""Length-bucketed training batches and sorted evaluation batches."""

import numpy as np
import pytest

from peft_jax import errors
from peft_jax.data import DataPosition
from peft_jax.train.buckets import LengthBucketedBatches, sorted_eval_batches


def _arrays(n=37, full=24, seed=0):
    lengths = np.random.default_rng(seed).integers(1, full + 1, size=n)
    mask = (np.arange(full)[None] < lengths[:, None]).astype(np.int32)
    ids = mask * (np.arange(n)[:, None] + 1)  # row i holds i + 1 on its real tokens
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask,
            "labels": np.arange(n, dtype=np.int32)}


def test_epoch_covers_examples_once_with_bucketed_widths():
    arrays = _arrays()
    it = LengthBucketedBatches(arrays, batch_size=5, bucket=8, pool=3, seed=1)
    assert it.steps_per_epoch == 7 and it.widths() == [8, 16, 24]
    seen = []
    for _ in range(it.steps_per_epoch):
        b = next(it)
        width = b["input_ids"].shape[1]
        assert width in it.widths() and b["attention_mask"].shape == (5, width)
        assert b["attention_mask"].sum(1).max() > width - 8  # trimmed to the longest, rounded up
        np.testing.assert_array_equal(b["input_ids"][:, 0] - 1, b["labels"])  # rows stay aligned
        seen += b["labels"].tolist()
    assert len(seen) == len(set(seen)) == 35
    assert it.position == DataPosition(1, 0)


def test_deterministic_and_resumable():
    arrays = _arrays()
    reference = LengthBucketedBatches(arrays, 4, seed=3, bucket=8)
    expected = [next(reference)["labels"] for _ in range(20)]
    first = LengthBucketedBatches(arrays, 4, seed=3, bucket=8)
    for _ in range(11):
        next(first)
    resumed = LengthBucketedBatches(arrays, 4, seed=3, bucket=8, position=first.position)
    for want in expected[11:]:
        np.testing.assert_array_equal(next(resumed)["labels"], want)
    other = LengthBucketedBatches(arrays, 4, seed=4, bucket=8)
    assert any(not np.array_equal(next(other)["labels"], e) for e in expected[:9])


def test_eval_batches_cover_all_sorted():
    arrays = _arrays(n=13)
    batches = list(sorted_eval_batches(arrays, 5, bucket=8))
    assert [int(b["valid"].sum()) for b in batches] == [5, 5, 3]
    assert all(b["labels"].shape == (5,) for b in batches)
    got = np.concatenate([b["index"][b["valid"]] for b in batches])
    assert sorted(got.tolist()) == list(range(13))
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)


def test_errors():
    with pytest.raises(errors.BatchError, match="attention_mask"):
        LengthBucketedBatches({"input_ids": np.zeros((4, 3))}, 2)
    with pytest.raises(errors.BatchError, match="exceeds"):
        LengthBucketedBatches(_arrays(n=3), 5)
    with pytest.raises(errors.BatchError, match="disagree"):
        LengthBucketedBatches({"attention_mask": np.ones((4, 3)), "labels": np.zeros(3)}, 2)
    with pytest.raises(errors.InvalidConfigError):
        LengthBucketedBatches(_arrays(), 0)
