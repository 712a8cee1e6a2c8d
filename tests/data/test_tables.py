"""Tables as datasets: CSV / TSV / JSONL with any column names and 2 to 20 classes; every bad
table is refused with a DataError that names the file and row."""

from __future__ import annotations

import csv
import json

import pytest

from peft_jax import data, errors
from peft_jax.data.tables import load_table, read_rows


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("num_classes", [2, 7, 20])
def test_csv_with_arbitrary_columns_and_classes(tmp_path, num_classes):
    rows = [(f"id{i}", f"a review, with commas, number {i}", f"topic-{i % num_classes:02d}")
            for i in range(10 * num_classes)]
    path = _write_csv(tmp_path / "Some Table.csv", ["row id", "Review Body", "Topic Label"], rows)
    ds = load_table(path, text_column="Review Body", label_column="Topic Label", seed=1)
    assert ds.num_labels == num_classes
    assert ds.label_names == tuple(f"topic-{i:02d}" for i in range(num_classes))
    assert len(ds.train) + len(ds.test) == len(rows) and len(ds.test) == round(0.2 * len(rows))
    by_text = {text: label for _, text, label in rows}
    for text, label in ds.train + ds.test:  # texts keep their commas; ids follow sorted labels
        assert ds.label_names[label] == by_text[text]
    again = load_table(path, text_column="Review Body", label_column="Topic Label", seed=1)
    assert again.test == ds.test  # the carved split is seeded
    other = load_table(path, text_column="Review Body", label_column="Topic Label", seed=2)
    assert other.test != ds.test


def test_integer_labels_sort_numerically_and_tsv_jsonl_read_alike(tmp_path):
    rows = [(f"text {i}", str([1, 2, 10][i % 3])) for i in range(30)]
    tsv = _write_csv(tmp_path / "t.tsv", ["t", "stars"], rows, delimiter="\t")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"t": t, "stars": int(s)}) + "\n" for t, s in rows))
    a = load_table(tsv, text_column="t", label_column="stars")
    b = load_table(jsonl, text_column="t", label_column="stars")
    assert a.label_names == b.label_names == ("1", "2", "10")
    assert a.train == b.train and a.test == b.test


def test_directory_of_train_and_test_tables(tmp_path):
    for split, n in (("train", 12), ("test", 6)):
        _write_csv(tmp_path / f"{split}.csv", ["q", "y"], [(f"{split} {i}", "ab"[i % 2])
                                                           for i in range(n)])
    ds = data.load_dataset(tmp_path, text_column="q", label_column="y")
    assert (len(ds.train), len(ds.test), ds.label_names) == (12, 6, ("a", "b"))
    held = ds.with_validation(0.25, seed=0)
    assert (len(held.train), len(held.val)) == (9, 3)
    assert sorted(held.train + held.val) == sorted(ds.train) and held.test == ds.test


BAD_TABLES = {
    "missing column": (b"text,stars\nnice,1\nbad,0\n", "no column 'label'"),
    "empty file": (b"", "holds no rows"),
    "header only": (b"text,label\n", "holds no rows"),
    "one class": (b"text,label\na,x\nb,x\nc,x\nd,x\ne,x\n", "one class only"),
    "not utf-8": (b"text,label\nnice,1\ncaf\xe9 bad,0\n", "line 3 holds bytes that are not UTF-8"),
    "blank label": (b"text,label\nnice,1\nbad,\nok,0\n", "row 3 has a blank 'label'"),
    "extra field": (b"text,label\nnice,1,extra\n", "more fields than the header"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_tables_raise_data_errors(tmp_path, case):
    content, message = BAD_TABLES[case]
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(errors.DataError, match=message):
        load_table(path)


def test_bad_jsonl_and_directories(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(errors.DataError, match="line 2 is not a JSON object"):
        read_rows(bad, "text", "label")
    bad.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(errors.DataError, match="line 2 is not JSON"):
        read_rows(bad, "text", "label")
    with pytest.raises(errors.DataError, match="must end in"):
        read_rows(tmp_path / "x.xlsx", "text", "label")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,label\na,0\nb,1\n")
    with pytest.raises(errors.DataError, match="no test table"):
        load_table(tmp_path / "d")
    with pytest.raises(errors.UnknownNameError, match="neither a known dataset"):
        data.load_dataset(tmp_path / "missing.csv")
