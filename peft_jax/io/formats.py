"""Which adapter format a directory holds, and loading any of them onto a model in one call.

Three formats are read: peft_jax's own (``peft_jax_adapter.json`` + ``.safetensors``, written by
`peft_jax.save_adapter`), HF PEFT's (``adapter_config.json`` with a ``peft_type`` +
``adapter_model.safetensors``) and AdapterHub's (``adapter_config.json`` with ``config`` and
``model_class`` + its weights file). A directory `peft-jax train` writes holds the first two;
`load_any` prefers peft_jax's own, which also checks the base's identity.

Example:
    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> detect_format(d)
    Traceback (most recent call last):
    ...
    peft_jax.errors.CheckpointError: ... holds no adapter: ...
    >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    >>> _ = (d / "adapter_model.safetensors").write_bytes(b"")
    >>> detect_format(d)
    'hf-peft'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from peft_jax import errors
from peft_jax.io import saving

__all__ = ["FORMATS", "Format", "base_model_of", "detect_format", "load_any"]

Format = Literal["peft_jax", "hf-peft", "adapterhub"]
FORMATS: tuple[Format, ...] = ("peft_jax", "hf-peft", "adapterhub")
_HF_CONFIG = "adapter_config.json"


def _hf_config(directory: Path) -> dict[str, Any] | None:
    path = directory / _HF_CONFIG
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.CheckpointError(f"{path} is not valid JSON ({e}); export the adapter again") from e
    if not isinstance(value, dict):
        raise errors.CheckpointError(f"{path} is not a JSON object; export the adapter again")
    return value


def detect_format(directory: str | os.PathLike) -> Format:
    """The format of the adapter in ``directory`` (peft_jax's own first, when several are there).

    Raises:
        CheckpointError: no known adapter files are there (the message lists what was looked for).
    """
    d = Path(directory)
    if saving.has_native_adapter(d):
        return "peft_jax"
    config = _hf_config(d)
    if config is not None and "peft_type" in config:
        return "hf-peft"
    if config is not None and "config" in config and "model_class" in config:
        return "adapterhub"
    raise errors.CheckpointError(
        f"{d} holds no adapter: looked for {saving.NATIVE_CONFIG} (peft_jax), {_HF_CONFIG} with a peft_type "
        f"(HF PEFT) or with config and model_class (AdapterHub); pass the directory the adapter was saved to")


def base_model_of(directory: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """``(name_or_path, loader kwargs)`` of the base the adapter records, or ``(None, {})``."""
    d = Path(directory)
    fmt = detect_format(d)
    if fmt == "peft_jax":
        record, _ = saving.read_native(d)
        base = record.get("base_model") or {}
        return base.get("name_or_path"), dict(base.get("kwargs") or {})
    config = _hf_config(d) or {}
    if fmt == "hf-peft":
        return config.get("base_model_name_or_path"), {}
    return config.get("model_name"), {}


def load_any(model: Any, directory: str | os.PathLike, *, name: str | None = None, **kwargs: Any) -> Any:
    """Attaches the adapter in ``directory``, whatever its format, to the NNX ``model``.

    ``kwargs`` go to the format's loader (``allow_different_weights=`` for peft_jax's own,
    ``key_map=`` for a user model in the HF PEFT format). Returns the model.

    Raises:
        CheckpointError, InvalidConfigError: as the format's loader (unknown files, fields,
            damaged weights, another base), before the model changes.
    """
    fmt = detect_format(directory)
    if fmt == "peft_jax":
        return saving.load_adapter(model, directory, name=name, **kwargs)
    if fmt == "hf-peft":
        from peft_jax.io.hf_peft import load_hf_peft  # noqa: PLC0415 (keeps this module light)

        return load_hf_peft(model, directory, name=name or "default", **kwargs)
    from peft_jax.io.adapterhub import load_adapterhub  # noqa: PLC0415

    return load_adapterhub(model, directory, name=name or "default", **kwargs)
