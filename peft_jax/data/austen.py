"""Jane Austen's six novels (public domain), as the Debian package ``r-cran-janeaustenr`` ships them.

The package holds the R data base ``janeaustenr/data/Rdata.{rdx,rdb}``: one character vector of
lines per novel (73,422 lines in all), read here by `peft_jax.data.r_lazyload` without R. It is
found, in this order, under ``$PEFT_JAX_AUSTEN_DIR``, the virtual environment's
``share/r-cran-janeaustenr`` (where ``scripts/setup.sh`` unpacks it, no root needed) and the
system's ``/usr/lib/R/site-library``.

Example:
    >>> novels = load_novels()  # doctest: +SKIP
    >>> sorted(novels)[:2], novels["emma"][0]  # doctest: +SKIP
    (['emma', 'mansfieldpark'], 'EMMA')
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from peft_jax.data.r_lazyload import read_lazyload
from peft_jax.errors import MissingPackageError

__all__ = ["PACKAGE", "data_stem", "install_command", "load_novels"]

PACKAGE = "r-cran-janeaustenr"
_RELATIVE = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")


def install_command() -> str:
    """The shell commands that unpack the package into the virtual environment (no root).

    Example:
        >>> install_command().startswith("apt-get download r-cran-janeaustenr")
        True
    """
    return (f"apt-get download {PACKAGE} && dpkg-deb -x {PACKAGE}_*.deb "
            f"{Path(sys.prefix) / 'share' / PACKAGE}")


def _candidates() -> list[Path]:
    roots = [Path(os.environ["PEFT_JAX_AUSTEN_DIR"])] if os.environ.get("PEFT_JAX_AUSTEN_DIR") else []
    return [r / _RELATIVE for r in [*roots, Path(sys.prefix) / "share" / PACKAGE, Path("/")]]


def data_stem() -> Path:
    """The path of ``Rdata`` (without ``.rdx`` / ``.rdb``) of the first install found.

    Raises:
        MissingPackageError: none found; the message holds the commands that install it.
    """
    for stem in _candidates():
        if stem.with_suffix(".rdx").is_file() and stem.with_suffix(".rdb").is_file():
            return stem
    raise MissingPackageError(
        f"the Jane Austen novels ship in the Debian package {PACKAGE}, which was not found "
        f"(looked for {', '.join(str(s) + '.rdx' for s in _candidates())}). Install with:\n"
        f"    {install_command()}\nor set PEFT_JAX_AUSTEN_DIR to the directory it was unpacked in")


def load_novels() -> dict[str, list[str]]:
    """Each novel's lines (``""`` between paragraphs), by the package's names (``"emma"``, ...).

    Raises:
        MissingPackageError: the package is not installed.
        DataError: its files are unreadable.
    """
    return {name: [line or "" for line in lines] for name, lines in read_lazyload(data_stem()).items()}
