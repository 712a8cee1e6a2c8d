"""Reading and writing HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

Example:
    >>> import pathlib, tempfile
    >>> from peft_jax.methods.lora import Lora
    >>> from peft_jax.io.frontends import AdapterParts
    >>> from peft_jax.io.hf_peft.keys import KeyMap
    >>> km, base = KeyMap(prefix="model."), {"q/kernel": np.ones((3, 4), np.float32)}
    >>> state = {"q/default/lora_a": np.ones((3, 2), np.float32), "q/default/lora_b": np.ones((2, 4), np.float32)}
    >>> parts = AdapterParts("default", "Toy", (("q", "linear", (Lora(rank=2),)),), state, base)
    >>> out = export_hf_peft(parts, pathlib.Path(tempfile.mkdtemp()) / "a", key_map=km)
    >>> config, again = import_hf_peft(out, architecture="Toy", base=base, key_map=km)
    >>> sorted((k, v.shape) for k, v in again.items())
    [('q/default/lora_a', (3, 2)), ('q/default/lora_b', (2, 4))]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from peft_jax import errors
from peft_jax.io.atomic import atomic_directory
from peft_jax.io.frontends import AdapterParts
from peft_jax.io.hf_peft.adalora import export_adalora, import_adalora, is_adalora
from peft_jax.io.hf_peft.keys import ROOT
from peft_jax.io.hf_peft.lora import export_lora, import_lora, is_lora_family
from peft_jax.io.hf_peft.per_module import FAMILIES, export_per_module, family_of, import_per_module
from peft_jax.io.saving import refuse_non_empty
from peft_jax.io.tensor_files import read_tensors, write_tensors

__all__ = ["HF_CONFIG", "HF_WEIGHTS", "ROOT", "export_hf_peft", "import_hf_peft"]

HF_CONFIG = "adapter_config.json"
HF_WEIGHTS = "adapter_model.safetensors"
#: the HF PEFT release whose file layout and parameterizations (OFT's Cayley-Neumann series since
#: 0.18) these files follow: the interop tests load them with it.
PEFT_VERSION = "0.21.2"


def export_hf_peft(parts: AdapterParts, out_dir: str | os.PathLike, *, key_map: Any,
                   task_type: str | None = None, base_model_name_or_path: str | None = None,
                   overwrite: bool = False) -> Path:
    """Writes one adapter (`peft_jax.io.frontends.AdapterParts`) in HF PEFT's format: the LoRA
    family (`peft_jax.io.hf_peft.lora`), AdaLoRA (`~.adalora`), the per-module families
    (`~.per_module`) or the prompt family (`~.virtual_tokens`).

    Raises:
        InvalidConfigError: a method HF PEFT's format cannot hold here (named).
        CheckpointError: ``out_dir`` is not empty, without ``overwrite``.
    """
    from peft_jax.io.hf_peft import virtual_tokens  # noqa: PLC0415 (the prompt family's own module)

    out_dir = Path(out_dir)
    refuse_non_empty(out_dir, overwrite)
    if virtual_tokens.is_virtual_token(parts):
        fields, tensors = virtual_tokens.export_virtual_tokens(parts)
    elif is_lora_family(parts.sites):
        fields, tensors = export_lora(parts.sites, parts.state, parts.base, parts.name, key_map)
        tensors = {ROOT + k: v for k, v in tensors.items()}
    elif is_adalora(parts.sites):
        fields, tensors = export_adalora(parts.sites, parts.state, parts.name, key_map)
    elif family_of(parts.sites) is not None:
        fields, tensors = export_per_module(parts.sites, parts.state, parts.name, key_map)
    else:
        methods = sorted({type(m).__name__ for _, _, ms in parts.sites for m in ms})
        raise errors.InvalidConfigError(
            f"the HF PEFT export holds the LoRA family (LoRA, rsLoRA, DoRA, modules_to_save), AdaLoRA, IA3, VeRA, "
            f"LoHa, LoKr, OFT, LN tuning, BEFT, trainable tokens and the prompt family so far, one kind per adapter; "
            f"this adapter has {methods}. "
            f"Save it with peft_jax.save_adapter (bottleneck "
            "adapters and Compacter also as AdapterHub files: peft_jax.io.adapterhub)")
    config = {**fields, "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "inference_mode": True, "peft_version": PEFT_VERSION}
    text = json.dumps(config, indent=2) + "\n"
    with atomic_directory(out_dir) as tmp:
        write_tensors(tmp / HF_WEIGHTS, tensors, {"format": "pt"})
        (tmp / HF_CONFIG).write_text(text, encoding="utf-8")
    return out_dir


def read_hf_peft(in_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config.json as a dict, tensors without the base_model.model. prefix)``."""
    config, tensors = _read(Path(in_dir))
    return config, {k[len(ROOT):] if k.startswith(ROOT) else k: v for k, v in tensors.items()}


def _read(in_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config.json, tensors by their keys in the file)``, both checked."""
    if not (in_dir / HF_CONFIG).is_file() or not (in_dir / HF_WEIGHTS).is_file():
        raise errors.CheckpointError(f"{in_dir} holds no HF PEFT adapter ({HF_CONFIG} and {HF_WEIGHTS})")
    try:
        config = json.loads((in_dir / HF_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.CheckpointError(f"{in_dir / HF_CONFIG} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise errors.CheckpointError(f"{in_dir / HF_CONFIG} is not a JSON object")
    return config, read_tensors(in_dir / HF_WEIGHTS)


def import_hf_peft(in_dir: str | os.PathLike, *, architecture: str, base: dict[str, Any], key_map: Any,
                   name: str = "default") -> tuple[Any, dict[str, np.ndarray]]:
    """``(peft_jax config, canonical state)`` of the HF PEFT adapter in ``in_dir`` for a model of
    class ``architecture`` whose frozen leaves are ``base`` (by path).

    Raises:
        InvalidConfigError: a ``peft_type`` or a field this import does not support (named).
        CheckpointError: a missing, truncated or hostile file, or tensors that do not fit (named).
    """
    from peft_jax.io.hf_peft import virtual_tokens  # noqa: PLC0415

    config, tensors = _read(Path(in_dir))  # keys as in the file: each codec knows its prefixes
    peft_type = config.get("peft_type")
    if peft_type in virtual_tokens.VIRTUAL_TOKEN_TYPES:
        return virtual_tokens.import_virtual_tokens(config, tensors, architecture, name)
    if peft_type in FAMILIES:
        return import_per_module(config, tensors, base, name, key_map)
    if peft_type == "ADALORA":
        return import_adalora(config, tensors, base, name, key_map)
    if peft_type != "LORA":
        known = ["LORA", "ADALORA", *sorted(FAMILIES), *sorted(virtual_tokens.VIRTUAL_TOKEN_TYPES)]
        raise errors.InvalidConfigError(
            f"peft_type {peft_type!r} is not supported by the HF PEFT import yet (supported: {known})")
    return import_lora(config, tensors, base, name, key_map)
