"""What ``peft-jax export``, ``import`` and ``merge`` run: load the base, put the adapter on it,
write it out in another form.

Every command checks its arguments and the output directory before the base model is loaded,
and writes atomically, so a bad call loses nothing.

Example:
    >>> export_command("runs/x/adapter", "onnx", "out")
    Traceback (most recent call last):
    ...
    peft_jax.errors.InvalidConfigError: --format must be one of ['hf-peft', 'adapterhub', 'peft_jax'], got 'onnx'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft_jax import errors
from peft_jax.io import formats, saving

__all__ = ["export_command", "import_command", "load_base", "merge_command"]

EXPORT_FORMATS = ("hf-peft", "adapterhub", "peft_jax")


def _refuse_non_empty(out: str | os.PathLike, overwrite: bool) -> Path:
    saving.refuse_non_empty(Path(out), overwrite)
    return Path(out)


def _base_source(adapter: str | os.PathLike, model: str | None) -> tuple[str, dict[str, Any]]:
    recorded, kwargs = formats.base_model_of(adapter)
    source = model or recorded
    if source is None:
        raise errors.InvalidConfigError(
            f"the adapter in {adapter} does not say which base it belongs to; pass --model NAME_OR_PATH")
    return source, kwargs


def load_base(name_or_path: str, kwargs: dict[str, Any] | None = None, dtype: str = "float32") -> Any:
    """The reference model ``name_or_path`` (a registered name, HF-layout dir or ``.gguf``).

    Raises:
        InvalidConfigError: a recorded base that cannot be found here (say --model).
        UnknownNameError, MissingPackageError, CheckpointError: as `peft_jax.models.load`.
    """
    from peft_jax import models  # noqa: PLC0415 (models import jax-heavy code)

    try:
        return models.load(name_or_path, dtype, **(kwargs or {}))
    except errors.UnknownNameError as e:
        raise errors.InvalidConfigError(
            f"the base {name_or_path!r} is neither a registered model nor a path here ({e}); "
            "pass --model NAME_OR_PATH") from e


def export_command(adapter: str | os.PathLike, format: str, out: str | os.PathLike, *,
                   model: str | None = None, overwrite: bool = False) -> str:
    """``peft-jax export``: the adapter in ``adapter`` (any format) written as ``format`` to ``out``.

    Args:
        adapter: a directory with an adapter (peft_jax's own, HF PEFT or AdapterHub files).
        format: ``hf-peft``, ``adapterhub`` or ``peft_jax``.
        out: the new directory.
        model: the base (default: the one the adapter records).

    Returns:
        A one-line summary.
    """
    if format not in EXPORT_FORMATS:
        raise errors.InvalidConfigError(f"--format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    formats.detect_format(adapter)
    out = _refuse_non_empty(out, overwrite)
    source, kwargs = _base_source(adapter, model)
    base = formats.load_any(load_base(source, kwargs), adapter, name="default")
    _write(base, out, format, source, kwargs, overwrite)
    return f"wrote the {format} adapter to {out}"


def _write(model: Any, out: Path, format: str, source: str, kwargs: dict[str, Any], overwrite: bool) -> None:
    if format == "peft_jax":
        saving.save_adapter(model, out, name="default", base_model=source, model_kwargs=kwargs, overwrite=overwrite)
    elif format == "hf-peft":
        from peft_jax.io.hf_peft import save_hf_peft  # noqa: PLC0415

        save_hf_peft(model, out, name="default", base_model_name_or_path=_hf_base_name(source), overwrite=overwrite)
    else:
        from peft_jax.io.adapterhub import save_adapterhub  # noqa: PLC0415

        save_adapterhub(model, out, name="default", overwrite=overwrite)


def _hf_base_name(source: str) -> str:
    """What HF PEFT should read as ``base_model_name_or_path``: a path HF can open, not a
    peft_jax registry name (the checkpoint behind it)."""
    from peft_jax.models.registry import resolve  # noqa: PLC0415

    return str(resolve(source).path)


def import_command(source: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                   num_labels: int | None = None, overwrite: bool = False) -> str:
    """``peft-jax import``: an HF PEFT or AdapterHub adapter as peft_jax's own format in ``out``.

    The base (``model``, default the adapter's ``base_model_name_or_path``) is loaded so that
    the adapter is checked against it and its identity recorded. ``num_labels`` builds an
    encoder classifier.
    """
    fmt = formats.detect_format(source)
    out = _refuse_non_empty(out, overwrite)
    base_name, kwargs = _base_source(source, model)
    if num_labels is not None:
        kwargs = {**kwargs, "num_labels": num_labels}
    adapted = formats.load_any(load_base(base_name, kwargs), source, name="default")
    saving.save_adapter(adapted, out, name="default", base_model=base_name, model_kwargs=kwargs, overwrite=overwrite)
    return f"imported the {fmt} adapter from {source} to {out} (peft_jax format)"


def merge_command(model: str, adapter: str | os.PathLike, out: str | os.PathLike, *,
                  max_shard_size: str = "2GB", overwrite: bool = False) -> str:
    """``peft-jax merge``: the base with the adapter merged in, as an HF-layout checkpoint in ``out``.

    Raises:
        NotMergeableError: the adapter holds a method that cannot merge (named), before anything
            is written; convert it first (`peft_jax.arithmetic.convert_to_lora`) or export it.
    """
    formats.detect_format(adapter)
    out = _refuse_non_empty(out, overwrite)
    from peft_jax.io.merged_export import export_merged  # noqa: PLC0415
    from peft_jax.models.registry import resolve  # noqa: PLC0415

    _, kwargs = formats.base_model_of(adapter)
    adapted = formats.load_any(load_base(model, kwargs), adapter, name="default")
    export_merged(adapted, out, source=resolve(model).path, max_shard_size=max_shard_size, overwrite=overwrite)
    return f"wrote {model} with the adapter merged in to {out}"
