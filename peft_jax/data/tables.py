"""Text-classification data from any table: CSV, TSV or JSONL with named text and label columns.

``--data`` may be one file (``.csv``, ``.tsv``, ``.jsonl``; the test split is then carved from
it, seeded) or a directory holding ``train.<ext>`` and ``test.<ext>``. Labels may be strings or
integers, two classes or more; ids follow the sorted label values (numerically when every label
is an integer). Every problem is found while reading, before any model is loaded: a missing
column, an empty table, blanks in the label column, bytes that are not UTF-8, a single class.

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.csv"
    >>> rows = ["stars,body"] + [f"{1 + i % 3},text {i}" for i in range(30)]
    >>> _ = path.write_text("\\n".join(rows) + "\\n")
    >>> data = load_table(path, text_column="body", label_column="stars", test_fraction=0.2)
    >>> data.label_names, len(data.train), len(data.test)
    (('1', '2', '3'), 24, 6)
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from peft_jax.data.dataset import TextClassificationData, carve
from peft_jax.errors import DataError

__all__ = ["TABLE_SUFFIXES", "jsonl_records", "load_table", "read_rows", "read_utf8"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


def read_rows(path: str | os.PathLike, text_column: str, label_column: str
              ) -> list[tuple[str, str]]:
    """The ``(text, label)`` string pairs of one table file, checked.

    Raises:
        DataError: an unknown suffix, bytes that are not UTF-8, a malformed JSONL line,
            a missing column, no rows, or a row whose label is blank (file and row named).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: a table must end in {', '.join(TABLE_SUFFIXES)}, "
                                 f"not {suffix or 'no suffix'!r}")
    text = read_utf8(path)
    records = jsonl_records(path, text) if suffix == ".jsonl" else _delimited_records(
        path, text, "\t" if suffix == ".tsv" else ",")
    if not records:
        raise DataError(f"{path} holds no rows; a table needs a header and at least "
                                 "one row per class")
    rows = []
    for number, record in records:
        for column in (text_column, label_column):
            if column not in record:
                raise DataError(
                    f"{path}: row {number} has no column {column!r}; its columns are "
                    f"{sorted(record)}. Name them with --text-column / --label-column")
        label = record[label_column]
        label = "" if label is None else str(label).strip()
        if not label:
            raise DataError(f"{path}: row {number} has a blank {label_column!r}; every "
                                     "row needs a label (drop or fill the blank ones)")
        value = record[text_column]
        rows.append(("" if value is None else str(value), label))
    return rows


def _delimited_records(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if reader.fieldnames is None:
        return []
    records = []
    for record in reader:
        if None in record:  # more fields than the header names
            raise DataError(f"{path}: row {reader.line_num} has more fields than the "
                                     f"header's {len(reader.fieldnames)}")
        if any(v for v in record.values()):
            records.append((reader.line_num, {k: v for k, v in record.items() if v is not None}))
    return records


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a file, which must be UTF-8 (a byte-order mark is dropped).

    Raises:
        DataError: bytes that are not UTF-8 (the line is named), or an unreadable file.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} holds bytes that are not UTF-8 (byte "
                        f"{e.start}); save the file as UTF-8") from None


def jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of JSONL ``text`` read from ``path``.

    Raises:
        DataError: a line that is not a JSON object (file and line named).
    """
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} is not JSON ({e})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        records.append((number, record))
    return records


def _label_names(labels: set[str]) -> tuple[str, ...]:
    """Sorted label values: numerically when all are integers."""
    try:
        return tuple(sorted(labels, key=int))
    except ValueError:
        return tuple(sorted(labels))


def load_table(path: str | os.PathLike, *, text_column: str = "text", label_column: str = "label",
               test_fraction: float = 0.2, seed: int = 0) -> TextClassificationData:
    """Loads a table file (its test split carved) or a directory of ``train`` / ``test`` tables.

    Args:
        path: a ``.csv`` / ``.tsv`` / ``.jsonl`` file, or a directory with ``train.<ext>`` and
            ``test.<ext>`` (the same suffix).
        text_column, label_column: the columns holding the text and the class.
        test_fraction: for a single file, the seeded share of rows held out as the test split.
        seed: seeds that split.

    Raises:
        DataError: every problem `read_rows` finds, a directory without the two
            tables, fewer than two classes, or an empty split.
    """
    path = Path(path)
    if path.is_dir():
        splits = {split: _find_split(path, split) for split in ("train", "test")}
        train, test = (read_rows(p, text_column, label_column) for p in splits.values())
    else:
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        train, test = carve(read_rows(path, text_column, label_column), test_fraction, seed)
    names = _label_names({label for _, label in train + test})
    if len(names) < 2:
        raise DataError(f"{path}: column {label_column!r} holds one class only "
                                 f"({names[0]!r}); classification needs two or more")
    if not train or not test:
        raise DataError(f"{path}: too few rows to split ({len(train)} train / "
                                 f"{len(test)} test); add rows or give train and test tables")
    ids = {name: i for i, name in enumerate(names)}
    encode = lambda rows: [(text, ids[label]) for text, label in rows]  # noqa: E731
    return TextClassificationData(path.stem, encode(train), encode(test), names)


def _find_split(directory: Path, split: str) -> Path:
    found = [directory / f"{split}{s}" for s in TABLE_SUFFIXES if (directory / f"{split}{s}").is_file()]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataError(
            f"{directory} has {what} {split} table; a dataset directory needs exactly one of "
            f"{', '.join(split + s for s in TABLE_SUFFIXES)} for train and for test")
    return found[0]
