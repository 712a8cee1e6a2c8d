"""Configs and methods as JSON: ``to_dict`` / ``from_dict`` for every peft_jax config value.

Configs and methods are frozen dataclasses of plain values, so one exact encoding serves all of
them: a dataclass becomes ``{"type": "<module>.<class>", "fields": {...}}`` (only ``peft_jax``
classes are rebuilt, so a file cannot make the loader import anything else); tuples, sets,
non-string-keyed dicts and arrays get tagged forms so they come back with their types. A
callable (a selector function, a ``where=`` predicate) cannot be written: `to_dict` raises
`InvalidConfigError` naming the field. Rebuilding runs each class's own checks.

Example:
    >>> import peft_jax
    >>> cfg = peft_jax.LoraConfig(targets=["q_proj", "v_proj"], rank=4, alpha=8.0,
    ...                           rank_pattern={".*v_proj": 2}, init=peft_jax.PiSSA())
    >>> d = to_dict(cfg)
    >>> d["type"], d["fields"]["rank"]
    ('peft_jax.methods.config.LoraConfig', 4)
    >>> from_dict(d) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np

from peft_jax import errors

__all__ = ["from_dict", "to_dict"]

_PACKAGE = "peft_jax."


def to_dict(value: Any) -> dict[str, Any]:
    """The JSON-ready form of a config or method dataclass (see the module docstring).

    Raises:
        InvalidConfigError: ``value`` is not a dataclass, or a field holds a callable or an
            object JSON cannot hold; the message names the field.
    """
    if not _is_dataclass_value(value):
        raise errors.InvalidConfigError(
            f"to_dict takes a config or method dataclass (LoraConfig, compose(...), Lora(...)), "
            f"got {type(value).__name__}")
    return _encode(value, type(value).__name__)


def from_dict(data: dict[str, Any]) -> Any:
    """The config or method `to_dict` wrote.

    Raises:
        InvalidConfigError: an unknown or non-peft_jax type, a malformed entry, or a value the
            class's own checks refuse; the message names the entry.
    """
    if not isinstance(data, dict) or "type" not in data:
        raise errors.InvalidConfigError(
            f"a config dict has a 'type' and 'fields' (as to_dict writes), got {str(data)[:80]!r}")
    return _decode(data, "config")


def _is_dataclass_value(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    if _is_dataclass_value(value):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"type": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_encode(v, where) for v in value), key=repr)}
    if isinstance(value, dict) or hasattr(value, "items") and hasattr(value, "keys"):
        return {"dict": [[_encode(k, f"{where} key"), _encode(v, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        return {"array": array.tolist(), "dtype": str(array.dtype)}
    what = "a callable" if callable(value) else f"a {type(value).__name__}"
    raise errors.InvalidConfigError(
        f"{where} is {what}, which cannot be written to a file; use names or a regex string "
        "instead (or save with peft_jax.save_adapter, which falls back to the adapted sites)")


def _decode(data: Any, where: str) -> Any:
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise errors.InvalidConfigError(f"{where}: {str(data)[:80]!r} is not an encoded value")
    if "type" in data:
        cls = _class(data["type"], where)
        raw = data.get("fields", {})
        if not isinstance(raw, dict):
            raise errors.InvalidConfigError(f"{where}: 'fields' of {data['type']} must be a dict")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise errors.InvalidConfigError(
                f"{where}: {data['type']} has no field {unknown[0]!r} (it has {sorted(known)}); "
                "was the file written by a newer peft_jax?")
        fields = {k: _decode(v, f"{where}.{k}") for k, v in raw.items()}
        try:
            return cls(**fields)
        except errors.PeftError:
            raise
        except (TypeError, ValueError) as e:
            raise errors.InvalidConfigError(f"{where}: {data['type']} refused these fields ({e})") from e
    (tag, body), = data.items() if len(data) == 1 else [("array", data)]
    if tag == "tuple":
        return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(body))
    if tag == "set":
        return frozenset(_decode(v, where) for v in body)
    if tag == "dict":
        return {_hashable(_decode(k, f"{where} key")): _decode(v, f"{where}[{k!r}]") for k, v in body}
    if tag == "array" and "dtype" in data:
        return np.asarray(data["array"], dtype=np.dtype(data["dtype"]))
    raise errors.InvalidConfigError(f"{where}: unknown entry {tag!r}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _class(name: Any, where: str) -> type:
    if not isinstance(name, str) or not name.startswith(_PACKAGE) or "." not in name:
        raise errors.InvalidConfigError(
            f"{where}: type {name!r} is not a peft_jax class; only peft_jax configs and methods "
            "are rebuilt from files")
    module_name, _, qualname = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise errors.InvalidConfigError(f"{where}: no module {module_name!r} ({e})") from e
    cls = getattr(module, qualname, None)
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise errors.InvalidConfigError(
            f"{where}: {name!r} is not a config or method of this peft_jax version")
    return cls
