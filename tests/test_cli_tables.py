"""`peft-jax train` on a CSV it has never seen: arbitrary column names, several classes, no code
changes; validation carved from the training rows; per-class scores. Bad tables: a typed error,
exit status 2, and no output directory."""

import csv
import json

import numpy as np
import pytest
from train import tiny

from peft_jax import cli

FAST = ["--max-length", "16", "--bucket", "16", "--batch-size", "8", "--eval-batch-size", "32",
        "--log-every", "2", "--rank", "2", "--alpha", "4", "--steps", "6", "--eval-every", "3"]
CLASSES = ("great", "bad", "meh", "odd", "nice")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.write_model(tmp_path_factory.mktemp("tiny-bert"))


def _write_table(path, n=100, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Opinion (free text)", "id", "Rating Class"])
        for i in range(n):
            words = " ".join(rng.choice(tiny.FILLER, size=4))
            writer.writerow([f"{words}, {tiny.GOOD[i % len(tiny.GOOD)]}", i,
                             CLASSES[i % len(CLASSES)]])
    return path


def test_unseen_csv_with_five_classes(tmp_path, model_dir, capsys):
    table = _write_table(tmp_path / "opinions.csv")
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(table), "--text-column",
            "Opinion (free text)", "--label-column", "Rating Class", "--val-fraction", "0.2",
            "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["label_names"] == sorted(CLASSES)
    assert (results["num_train"], results["num_val"], results["num_test"]) == (64, 16, 20)
    confusion = np.array(results["test_confusion_matrix"])
    assert confusion.shape == (5, 5) and confusion.sum() == 20
    assert results["test_accuracy"] == pytest.approx(np.trace(confusion) / 20, abs=1e-4)
    per_class = results["test_per_class"]
    assert sorted(per_class) == sorted(CLASSES)
    assert [per_class[c]["support"] for c in results["label_names"]] == list(confusion.sum(1))
    f1 = [per_class[c]["f1"] for c in results["label_names"]]
    assert results["test_macro_f1"] == pytest.approx(np.mean(f1), abs=1e-3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [3, 6]  # on the val split
    assert "macro-F1" in capsys.readouterr().out


BAD = {
    "missing column": (b"review,label\nnice,1\nbad,0\n", "DataError", "no column 'text'"),
    "empty": (b"", "DataError", "holds no rows"),
    "one class": (b"text,label\n" + b"good,1\n" * 10, "DataError", "one class only"),
    "not utf-8": (b"text,label\nnice,1\nna\xefve,0\n", "DataError", "not UTF-8"),
    "blank label": (b"text,label\nnice,1\nbad, \n", "DataError", "blank 'label'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tables_fail_before_anything_is_written(tmp_path, model_dir, capsys, case):
    content, kind, message = BAD[case]
    table = tmp_path / "table.csv"
    table.write_bytes(content)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(table), "--out", str(out), *FAST]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert kind in err and message in err and "table.csv" in err
    assert not out.exists()
