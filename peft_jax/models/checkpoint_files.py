"""Read Hugging Face-layout checkpoint directories into numpy, tensor by tensor.

A directory holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (whose ``weight_map`` names the shard of every tensor). Files are
read with ``safetensors.safe_open`` (memory-mapped), one tensor at a time, and floating tensors are
cast to the target dtype in row chunks, so peak host memory stays near the model's size in the
target dtype (plus one chunk), never the source size plus the target size. ``bfloat16`` comes from
``ml_dtypes``. Neither torch nor transformers is needed.

Example:
    >>> import json, pathlib, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    >>> save_file({"w": np.ones((2, 3), np.float32)}, str(d / "model.safetensors"))
    >>> config, tensors = load_hf_dir(d, dtype="bfloat16")
    >>> config["model_type"], tensors["w"].dtype.name, tensors["w"].shape
    ('bert', 'bfloat16', (2, 3))
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from peft_jax.errors import CheckpointError

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "iter_tensors",
    "load_hf_dir",
    "read_config",
    "resolve_dtype",
    "safetensors_files",
    "tensor_specs",
]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Floating tensors bigger than this are cast in row chunks of about this many bytes.
_CHUNK_BYTES = 16 * 1024 * 1024

_DTYPE_ALIASES = {
    "fp32": np.float32,
    "float32": np.float32,
    "f32": np.float32,
    "fp16": np.float16,
    "float16": np.float16,
    "f16": np.float16,
    "half": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "bfloat16": ml_dtypes.bfloat16,
}

PathLike = str | os.PathLike


def resolve_dtype(dtype: Any) -> np.dtype | None:
    """Turns ``None``, a name ("bf16", "float32", ...) or a numpy/jax dtype into a numpy dtype.

    Args:
      dtype: ``None`` (keep the stored dtype), a name, or anything ``np.dtype`` accepts
        (``jnp.bfloat16`` included).

    Returns:
      The numpy dtype, or ``None`` when ``dtype`` is ``None``.

    Raises:
      CheckpointError: for a name or a non-floating dtype that cannot hold weights.

    Example:
      >>> resolve_dtype("bf16").name
      'bfloat16'
    """
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_ALIASES:
        return np.dtype(_DTYPE_ALIASES[dtype.lower()])
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not _is_float(resolved):
        raise CheckpointError(
            f"cannot load weights as dtype {dtype!r}; pass one of "
            f"{sorted(set(_DTYPE_ALIASES))}, a numpy/jax floating dtype, or None to keep the "
            "stored dtype"
        )
    return resolved


def read_config(path: PathLike) -> dict[str, Any]:
    """Reads ``config.json`` of an HF-layout directory.

    Args:
      path: the model directory.

    Returns:
      The parsed config.

    Raises:
      CheckpointError: the directory or its ``config.json`` is missing or not valid JSON.

    Example:
      >>> import json, pathlib, tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
      >>> read_config(d)["hidden_size"]
      8
    """
    directory = _check_dir(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise CheckpointError(
            f"{directory} has no {CONFIG_FILE}; an HF-layout model directory needs "
            f"{CONFIG_FILE} plus {SINGLE_FILE} (or {INDEX_FILE} and its shards). "
            f"Found: {present or 'an empty directory'}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); re-export the model") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def safetensors_files(path: PathLike) -> list[Path]:
    """Lists the safetensors files of an HF-layout directory, in load order.

    Args:
      path: the model directory.

    Returns:
      ``[dir/model.safetensors]``, or the shards named by ``model.safetensors.index.json``.

    Raises:
      CheckpointError: no weights file, a bad index, or a shard the index names is missing.

    Example:
      >>> import pathlib, tempfile, numpy as np
      >>> from safetensors.numpy import save_file
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> save_file({"w": np.zeros(2, np.float32)}, str(d / "model.safetensors"))
      >>> [p.name for p in safetensors_files(d)]
      ['model.safetensors']
    """
    directory = _check_dir(path)
    single = directory / SINGLE_FILE
    index = directory / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))  # first-seen order, deduplicated
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index (need a JSON object with a "
                f"'weight_map' of tensor name -> shard file): {e!r}"
            ) from e
        files = [directory / name for name in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names shards that are not in {directory}: {missing}; copy the "
                "complete checkpoint"
            )
        return files
    hint = ""
    if (directory / "pytorch_model.bin").is_file():
        hint = (" It has pytorch_model.bin: convert it once with transformers "
                "(`model.save_pretrained(dir, safe_serialization=True)`).")
    raise CheckpointError(
        f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are "
        f"read.{hint}"
    )


def iter_tensors(path: PathLike, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Streams ``(name, array)`` pairs from an HF-layout directory or one safetensors file.

    Only one tensor (and, while casting, one chunk of its source) is alive at a time beyond what
    the caller keeps. Floating tensors are cast to ``dtype``; integer tensors keep their dtype.

    Args:
      path: a model directory, or a single ``.safetensors`` file.
      dtype: target floating dtype (see :func:`resolve_dtype`); ``None`` keeps the stored dtype.

    Yields:
      ``(tensor name, numpy array)`` in file order.

    Raises:
      CheckpointError: missing files, or a truncated/corrupt safetensors file (named).

    Example:
      >>> import pathlib, tempfile, numpy as np
      >>> from safetensors.numpy import save_file
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
      >>> save_file({"a": np.ones(3, np.float32)}, str(f))
      >>> [(n, a.dtype.name) for n, a in iter_tensors(f, "fp16")]
      [('a', 'float16')]
    """
    target = resolve_dtype(dtype)
    p = Path(path)
    files = [p] if p.is_file() else safetensors_files(p)
    for file in files:
        yield from _iter_file(file, target)


def tensor_specs(path: PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Reads only the headers: tensor name -> (shape, stored numpy dtype), in file order.

    Use it to check shapes against a config before any tensor data is read.

    Args:
      path: a model directory, or a single ``.safetensors`` file.

    Returns:
      A dict of tensor name -> ``(shape, dtype)``.

    Raises:
      CheckpointError: missing files, or a truncated/corrupt header (the file is named).

    Example:
      >>> import pathlib, tempfile, numpy as np
      >>> from safetensors.numpy import save_file
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
      >>> save_file({"a": np.ones((2, 5), np.float32)}, str(f))
      >>> tensor_specs(f)
      {'a': ((2, 5), dtype('float32'))}
    """
    p = Path(path)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for file in [p] if p.is_file() else safetensors_files(p):
        try:
            with safe_open(str(file), framework="np") as f:
                for name in f.keys():
                    sliced = f.get_slice(name)
                    dtype = np.dtype(_SAFETENSORS_DTYPES.get(sliced.get_dtype(), np.uint8))
                    specs[name] = (tuple(sliced.get_shape()), dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(file, e) from e
    return specs


def load_hf_dir(path: PathLike, dtype: Any = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Loads ``config.json`` and every tensor of an HF-layout directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: target floating dtype ("float32", "bfloat16", ``jnp.bfloat16``, ...); ``None`` keeps
        the stored dtype.

    Returns:
      ``(config, tensors)``: the parsed config and a dict of HF tensor name -> numpy array.

    Raises:
      CheckpointError: the directory, its config or its weights are missing, or a safetensors
        file is truncated or corrupt (the message names the file).

    Example:
      >>> import json, pathlib, tempfile, numpy as np
      >>> from safetensors.numpy import save_file
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (d / "config.json").write_text("{}")
      >>> save_file({"b": np.zeros(4, np.float32)}, str(d / "model.safetensors"))
      >>> sorted(load_hf_dir(d)[1])
      ['b']
    """
    config = read_config(path)
    tensors: dict[str, np.ndarray] = {}
    for name, array in iter_tensors(path, dtype):
        if name in tensors:
            raise CheckpointError(f"tensor {name!r} appears in more than one shard of {path}")
        tensors[name] = array
    return config, tensors


# --- internals -------------------------------------------------------------------------------
def _check_dir(path: PathLike) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(
            f"model directory {directory} does not exist; pass a directory holding "
            f"{CONFIG_FILE} and {SINGLE_FILE}, or a known model name"
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file, not a model directory; pass the directory that holds "
            f"{CONFIG_FILE} and {SINGLE_FILE}"
        )
    return directory


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


def _corrupt(file: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"safetensors file {file} is truncated or corrupt ({e}); re-download or re-export it"
    )


def _iter_file(file: Path, target: np.dtype | None) -> Iterator[tuple[str, np.ndarray]]:
    try:
        handle = safe_open(str(file), framework="np")
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(file, e) from e
    with handle as f:
        for name in f.keys():
            try:
                yield name, _read(f, name, target)
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise _corrupt(file, e) from e


def _read(f: Any, name: str, target: np.dtype | None) -> np.ndarray:
    """Reads one tensor, casting floating data to ``target`` in row chunks."""
    sliced = f.get_slice(name)
    shape = tuple(sliced.get_shape())
    source = np.dtype(_SAFETENSORS_DTYPES.get(sliced.get_dtype(), np.uint8))
    cast = target is not None and _is_float(source) and source != target
    row_bytes = source.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    if not cast or not shape or row_bytes * shape[0] <= _CHUNK_BYTES:
        array = f.get_tensor(name)
        return array.astype(target) if cast else array
    out = np.empty(shape, target)
    rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])  # safetensors slices do not clamp
        out[start:stop] = sliced[start:stop]
    return out


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
