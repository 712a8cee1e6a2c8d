"""One adapter directory holding several formats side by side, written as one atomic step.

peft_jax's own files (``peft_jax_adapter.*``) and HF PEFT's (``adapter_config.json`` +
``adapter_model.safetensors``) have distinct names, so one directory can serve both
`peft_jax.load_adapter` and ``PeftModel.from_pretrained``. `save_formats` writes each format
into the same temporary directory and publishes it whole: if any format refuses the adapter
(a method HF PEFT lacks, say), nothing is written.

Example:
    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> import peft_jax
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> _ = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1))
    >>> out = save_formats(model, pathlib.Path(tempfile.mkdtemp()) / "a", formats=("peft_jax",))
    >>> sorted(p.name for p in out.iterdir())
    ['peft_jax_adapter.json', 'peft_jax_adapter.safetensors']
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft_jax import errors
from peft_jax.io import saving
from peft_jax.io.atomic import atomic_directory

__all__ = ["save_formats"]

_KNOWN = ("peft_jax", "hf-peft")


def save_formats(model: Any, directory: str | os.PathLike, *, formats: Sequence[str] = _KNOWN,
                 name: str = "default", base_model: str | None = None, model_kwargs: dict | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 overwrite: bool = False) -> Path:
    """Writes adapter ``name`` of the NNX ``model`` in every one of ``formats`` to ``directory``.

    Args:
        formats: among ``"peft_jax"`` (`peft_jax.save_adapter`) and ``"hf-peft"``
            (`peft_jax.io.hf_peft.save_hf_peft`).
        base_model, model_kwargs: recorded in peft_jax's file (how to load the base again).
        base_model_name_or_path, task_type: written into HF PEFT's ``adapter_config.json``.

    Raises:
        InvalidConfigError: an unknown format, or an adapter a format cannot hold (nothing is
            written).
        CheckpointError: ``directory`` is not empty, without ``overwrite``.
    """
    unknown = [f for f in formats if f not in _KNOWN]
    if unknown or not formats:
        raise errors.InvalidConfigError(f"formats must be some of {list(_KNOWN)}, got {list(formats)}")
    directory = Path(directory)
    saving.refuse_non_empty(directory, overwrite)
    with atomic_directory(directory) as tmp:
        for fmt in formats:
            part = tmp / f".{fmt}"
            if fmt == "peft_jax":
                saving.save_adapter(model, part, name=name, base_model=base_model, model_kwargs=model_kwargs)
            else:
                from peft_jax.io.hf_peft import save_hf_peft  # noqa: PLC0415 (keeps import light)

                save_hf_peft(model, part, name=name, base_model_name_or_path=base_model_name_or_path,
                             task_type=task_type)
            for file in part.iterdir():
                if (tmp / file.name).exists():
                    raise errors.InvalidConfigError(f"formats {list(formats)} both write {file.name}")
                os.replace(file, tmp / file.name)
            shutil.rmtree(part)
    return directory
