"""One call each way for HF PEFT files: `save_hf_peft` (NNX model or planned Linen handle) and `load_hf_peft`.

Example:
    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> import peft_jax
    >>> from peft_jax.io.hf_peft.keys import KeyMap
    >>> def base():
    ...     return nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> model = peft_jax.nnx.attach(base(), peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(2))
    >>> out = save_hf_peft(model, pathlib.Path(tempfile.mkdtemp()) / "a", key_map=KeyMap())
    >>> load_hf_peft(base(), out, key_map=KeyMap(), name="mine").layers[0].mine.lora_a.shape
    (4, 2)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft_jax import errors
from peft_jax.io import saving
from peft_jax.io.hf_peft.files import export_hf_peft, import_hf_peft
from peft_jax.io.hf_peft.keys import for_architecture

__all__ = ["load_hf_peft", "save_hf_peft"]


def save_hf_peft(target: Any, out_dir: str | os.PathLike, *, name: str = "default", variables: dict | None = None,
                 key_map: Any = None, task_type: str | None = None, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Writes adapter ``name`` of ``target`` as HF PEFT files (see `export_hf_peft`).

    Raises:
        InvalidConfigError: a method the format cannot hold, or an encoder classifier whose head
            transformers computes otherwise (HF's BERT classifier pools through the pooler).
    """
    parts = saving.adapter_parts(target, variables, name)
    model = getattr(target, "module", target)
    pooling = getattr(model, "pooling", None)
    if parts.architecture.endswith("EncoderForSequenceClassification") and pooling not in (None, "pooler"):
        raise errors.InvalidConfigError(
            f"this classifier pools by {pooling!r}, but transformers' BertForSequenceClassification pools "
            "through the pooler, so HF PEFT would compute other logits; build it with pooling='pooler' to "
            "export to HF PEFT, or save it with peft_jax.save_adapter")
    key_map = key_map or for_architecture(parts.architecture)
    return export_hf_peft(parts, out_dir, key_map=key_map, task_type=task_type,
                          base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)


def load_hf_peft(target: Any, in_dir: str | os.PathLike, *, name: str = "default", variables: dict | None = None,
                 key_map: Any = None, rngs: Any = None, sample: tuple | None = None) -> Any:
    """Attaches the HF PEFT adapter in ``in_dir`` as ``name``: the NNX model, or ``(handle, variables)``.

    Raises:
        CheckpointError: bad files, or a tensor whose shape does not fit the model (named).
        InvalidConfigError: an unsupported ``peft_type`` / field, or no key map for the model.
    """
    architecture, base = saving.target_base(target, variables)
    key_map = key_map or for_architecture(architecture)
    config, state = import_hf_peft(in_dir, architecture=architecture, base=base, key_map=key_map, name=name)
    return saving.attach_state(target, config, state, name, variables=variables, sample=sample or (), rngs=rngs)
