"""A lean GGUF file reader: metadata, tensor directory, and tensor data one (chunk of) tensor at a time.

``gguf.GGUFReader`` builds a numpy view per metadata array element, which for a 262k-token
vocabulary costs seconds and hundreds of MiB; this reader parses the same header with ``struct``
(strings become Python ``str``, numeric arrays numpy arrays), reads tensor bytes with plain file
reads (nothing stays mapped), and leaves dequantization to ``gguf.quants.dequantize``.
Only little-endian GGUF v2/v3 files are read (all llama.cpp writes today).

Example:
    >>> import tempfile, os, numpy as np, gguf
    >>> path = os.path.join(tempfile.mkdtemp(), "t.gguf")
    >>> w = gguf.GGUFWriter(path, "llama"); w.add_block_count(1)
    >>> w.add_tensor("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    >>> f = GGUFFile.open(path)
    >>> f.metadata["llama.block_count"], f.tensors["a.weight"].shape
    (1, (2, 3))
    >>> f.read("a.weight", np.float32).tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from peft_jax.errors import CheckpointError, MissingPackageError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_CHUNK_BYTES = 32 * 1024 * 1024  # float32 bytes dequantized at once


def gguf_package():
    """The PyPI ``gguf`` module (for dequantization), or a :class:`MissingPackageError`."""
    try:
        import gguf  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise MissingPackageError(
            "reading GGUF files needs the PyPI package gguf: pip install 'gguf>=0.10' "
            "(or pip install 'peft-jax[models]')") from e
    return gguf


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: GGUF tensor name (``blk.0.attn_q.weight``).
        shape: Numpy / torch order (rows first): the reverse of GGML's ``ne``.
        ggml_type: ``gguf.GGMLQuantizationType`` value.
        offset: Absolute byte offset of the data in the file.
        nbytes: Size of the stored (possibly quantized) data.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


class _Cursor:
    """Sequential little-endian reads from a file through a refillable buffer."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.buf, self.pos, self.base = f, size, b"", 0, f.tell()

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            self.base += self.pos
            self.buf = self.buf[self.pos:] + self.f.read(max(n, 1 << 20))
            self.pos = 0
            if n > len(self.buf):
                raise EOFError(f"needed {n} bytes at offset {self.base}, the file ends first")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def tell(self) -> int:
        return self.base + self.pos


def _value(cur: _Cursor, vtype: int) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        etype, count = cur.unpack("<I"), cur.unpack("<Q")
        if etype in _NUMPY:
            dtype = np.dtype(_NUMPY[etype])
            return np.frombuffer(cur.take(count * dtype.itemsize), dtype).copy()
        return [_value(cur, etype) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {vtype}")


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF header; tensor data is read on demand with :meth:`read`.

    Attributes:
        path: The file.
        version: GGUF version (2 or 3).
        metadata: Key -> value (``int``/``float``/``bool``/``str``; arrays as numpy arrays or
            lists of ``str``).
        tensors: Name -> :class:`TensorInfo`, in file order.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFFile:
        """Parse the header of ``path``.

        Raises:
            CheckpointError: Missing file, not GGUF, unsupported version/endianness, or truncated
                (header or tensor data).
        """
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"GGUF file {p} does not exist; pass the path of a .gguf file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise CheckpointError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
            try:
                return cls._parse(p, f, size)
            except (EOFError, struct.error, UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(
                    f"GGUF file {p} is truncated or corrupt ({e}); re-download or re-install the "
                    "package that ships it") from e

    @classmethod
    def _parse(cls, p: Path, f: BinaryIO, size: int) -> GGUFFile:
        gguf = gguf_package()
        cur = _Cursor(f, size)
        version = cur.unpack("<I")
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise CheckpointError(f"{p}: GGUF version {version} is not supported (2 or 3){hint}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = _value(cur, cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, dims, ggml_type, offset))
        align = int(metadata.get("general.alignment", 32))
        start = cur.tell() + (-cur.tell()) % align
        tensors = {}
        for name, dims, ggml_type, offset in infos:
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            except (KeyError, ValueError):
                raise CheckpointError(f"{p}: tensor {name!r} has unknown GGML type {ggml_type}") from None
            nbytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
            info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type, start + offset, nbytes)
            if info.offset + nbytes > size:
                raise CheckpointError(
                    f"GGUF file {p} is truncated: tensor {name!r} ends at byte {info.offset + nbytes} "
                    f"but the file has {size} bytes; re-download it")
            tensors[name] = info
        return cls(p, version, metadata, tensors)

    def read(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Dequantize tensor ``name`` into a new array of ``dtype`` (numpy order), in row chunks.

        Example:
            >>> # GGUFFile.open(path).read("token_embd.weight", np.float32).shape
        """
        gguf = gguf_package()
        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        cols = info.shape[-1]
        row_bytes = info.nbytes // rows
        out = np.empty((rows, cols), dtype)
        step = max(1, _CHUNK_BYTES // (4 * cols))
        with open(self.path, "rb") as f:
            for r in range(0, rows, step):
                n = min(step, rows - r)
                f.seek(info.offset + r * row_bytes)
                raw = np.frombuffer(f.read(n * row_bytes), np.uint8).reshape(n, row_bytes)
                out[r:r + n] = gguf.quants.dequantize(raw, qtype).reshape(n, cols)
        return out.reshape(info.shape)
