"""Character vectors from an R package's lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``).

R stores a package's data sets as one file of zlib-compressed serialized objects (``.rdb``) and an
index (``.rdx``, itself a compressed serialized list) naming each object's offset and length. This
reader decodes the subset of R's XDR serialization (format 2 and 3) that such data uses: vectors
of strings, integers, doubles and logicals, lists, pairlists with attributes, symbols and
references; it needs nothing but the standard library.

Example:
    >>> import struct, zlib
    >>> def s(x): return struct.pack(">i", x)
    >>> body = b"X\\n" + s(2) + s(0) + s(0) + s(16) + s(2) + s(9) + s(1) + b"a" + s(9) + s(-1)
    >>> decode(body)
    ['a', None]
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from peft_jax.errors import DataError

__all__ = ["decode", "read_lazyload", "read_object"]

_NIL, _REF, _GLOBALENV, _EMPTYENV, _BASEENV = 254, 255, 253, 242, 241
_SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19
_NA_INT = -(2**31)


class _Reader:
    def __init__(self, raw: bytes):
        self.raw, self.pos, self.refs = raw, 0, []

    def ints(self, n: int) -> tuple[int, ...]:
        out = struct.unpack_from(f">{n}i", self.raw, self.pos)
        self.pos += 4 * n
        return out

    def take(self, n: int) -> bytes:
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def length(self) -> int:
        (n,) = self.ints(1)
        if n == -1:  # long vector: two more ints
            hi, lo = self.ints(2)
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        (flags,) = self.ints(1)
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind in (_NIL, _GLOBALENV, _EMPTYENV, _BASEENV):
            return None
        if kind == _REF:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHAR:
            (n,) = self.ints(1)
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if kind == _LIST:  # pairlist (attributes): {tag: value}
            out = {}
            while kind == _LIST:
                if has_attr:
                    self.item()  # a pairlist cell's own attributes are read past, not kept
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                (flags,) = self.ints(1)
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
            return out  # the terminating NILVALUE was read
        if kind in (_LGL, _INT):
            n = self.length()
            return [None if v == _NA_INT else v for v in self.ints(n)]
        if kind == _REAL:
            n = self.length()
            out = list(struct.unpack_from(f">{n}d", self.raw, self.pos))
            self.pos += 8 * n
            value: Any = out
        elif kind in (_STR, _VEC):
            value = [self.item() for _ in range(self.length())]
        else:
            raise DataError(f"R serialization type {kind} is not supported by this reader")
        if has_attr:
            names = self.item().get("names")
            if names is not None and kind == _VEC:
                return dict(zip(names, value, strict=True))
        return value


def decode(raw: bytes) -> Any:
    """One serialized R object (``X\\n`` XDR format 2 or 3) as Python lists, dicts and scalars.

    Raises:
        DataError: not XDR serialization, or a type this reader does not handle.
    """
    if raw[:2] != b"X\n":
        raise DataError("not an R object in XDR serialization (no 'X\\n' header)")
    reader = _Reader(raw)
    reader.pos = 2
    (version, _, _) = reader.ints(3)
    if version == 3:
        reader.take(reader.ints(1)[0])  # the native encoding's name
    return reader.item()


def read_object(rdb: bytes, offset: int, length: int) -> Any:
    """The object at ``offset`` (``length`` bytes: a 4-byte size, then zlib data) of an ``.rdb``."""
    blob = rdb[offset:offset + length]
    try:
        return decode(zlib.decompress(blob[4:]))
    except zlib.error as e:
        raise DataError(f"an R data base object at {offset} is not zlib-compressed ({e}); only "
                        "R's default (zlib) lazy-load compression is read here") from e


def read_lazyload(stem: str | os.PathLike) -> dict[str, Any]:
    """Every object of the database ``stem.rdx`` / ``stem.rdb``, by name.

    Raises:
        DataError: a missing or unreadable file.

    Example:
        >>> books = read_lazyload("/usr/lib/R/site-library/janeaustenr/data/Rdata")  # doctest: +SKIP
        >>> books["emma"][0]  # doctest: +SKIP
        'EMMA'
    """
    stem = Path(stem)
    index_path, data_path = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    try:
        index = decode(_read_index(index_path.read_bytes()))
        rdb = data_path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the R data base {stem}.rdx/.rdb: {e}") from e
    return {name: read_object(rdb, *where) for name, where in index["variables"].items()}


def _read_index(raw: bytes) -> bytes:
    """The serialized bytes of an ``.rdx``: gzip- or zlib-compressed (R's ``saveRDS``)."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return zlib.decompress(raw[4:])
