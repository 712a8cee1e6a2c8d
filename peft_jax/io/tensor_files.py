"""safetensors files read defensively and written whole.

`read_tensors` validates the header before any tensor is read: the 8-byte length must fit the
file (a hostile length cannot make it allocate), the header must be a JSON object of tensors
with known dtypes whose byte ranges lie inside the file, do not overlap, and match their shapes.
A truncated or corrupt file raises `CheckpointError` naming the file and what is wrong.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
    >>> write_tensors(f, {"a": np.arange(3, dtype=np.float32)})
    >>> read_tensors(f)["a"].tolist()
    [0.0, 1.0, 2.0]
    >>> _ = f.write_bytes(f.read_bytes()[:-4])
    >>> read_tensors(f)
    Traceback (most recent call last):
    ...
    peft_jax.errors.CheckpointError: ... tensor 'a' ends at byte 12 but the data holds 8; save it again
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from peft_jax import errors

__all__ = ["read_header", "read_tensors", "write_tensors"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
          "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (numpy-convertible) to ``path`` with ``metadata`` (strings)."""
    from safetensors.numpy import save_file  # noqa: PLC0415 (optional dependency)

    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    save_file(arrays, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The validated JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    path = Path(path)

    def bad(why: str) -> errors.CheckpointError:
        return errors.CheckpointError(f"{path} is truncated or corrupt: {why}; save it again")

    if not path.is_file():
        raise errors.CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it has {size} bytes, fewer than the 8 of a header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"its header length {n} does not fit a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_bytes, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} has a malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has malformed data offsets {offsets!r}")
        if offsets[1] > data_bytes:
            raise bad(f"tensor {name!r} ends at byte {offsets[1]} but the data holds {data_bytes}")
        if offsets[1] - offsets[0] != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype]:
            raise bad(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, not what {dtype}{shape} needs")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"tensors {first!r} and {second!r} overlap")
    return header


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy, after `read_header` validated it."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    read_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise errors.CheckpointError(f"{path} is not a readable safetensors file ({e}); save it again") from e
