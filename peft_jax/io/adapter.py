"""The adapter directory: trainable parameters as safetensors plus a JSON config.

Layout of ``DIR``::

    DIR/adapter_model.safetensors   tensors keyed by "/"-joined parameter paths
    DIR/adapter_config.json         the method's settings (peft_type, r, lora_alpha, targets, ...)

The keys are this library's own paths (e.g.
``bert/encoder/layer/0/attention/self/query/default/lora_a``), so the directory round-trips
exactly into the trainable state it came from. The directory is written atomically
(`peft_jax.io.atomic_directory`): an interrupted save leaves the previous adapter in place.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "adapter"
    >>> _ = write_adapter_files(out, {"q/lora_a": np.ones((3, 2), np.float32)}, {"peft_type": "LORA"})
    >>> sorted(p.name for p in out.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from peft_jax import errors
from peft_jax.core.paths import map_with_path, tree_items
from peft_jax.io.atomic import atomic_directory

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "flatten_params", "read_adapter_files",
           "lora_config_dict", "restore_params", "write_adapter_files"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "peft_jax"


def flatten_params(tree: Any) -> dict[str, np.ndarray]:
    """``{"/"-joined path: numpy array}`` for every array leaf of a pytree (an NNX ``State``...).

    Example:
        >>> flatten_params({"q": {"lora_a": np.zeros((2, 1))}})["q/lora_a"].shape
        (2, 1)
    """
    flat = {}
    for path, leaf in tree_items(tree):
        if leaf is None:
            continue
        if not hasattr(leaf, "shape"):
            raise errors.InvalidConfigError(
                f"parameter {path!r} is a {type(leaf).__name__}, not an array; pass the trainable "
                "state only (e.g. the second value of peft_jax.nnx.split(model))")
        flat[path] = np.asarray(jax.device_get(leaf))
    return flat


def restore_params(template: Any, params: Mapping[str, np.ndarray]) -> Any:
    """Fills a pytree shaped like ``template`` with the arrays of ``params`` (by path).

    Raises:
        CheckpointError: a path of the template is missing from ``params``, ``params`` holds a
            path the template lacks, or a shape / dtype differs.

    Example:
        >>> restore_params({"a": np.zeros(2)}, {"a": np.ones(2)})["a"].tolist()
        [1.0, 1.0]
    """
    wanted = dict(tree_items(template))
    extra = sorted(set(params) - set(wanted))
    missing = sorted(set(wanted) - set(params))
    if missing or extra:
        raise errors.CheckpointError(
            f"the adapter does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}; "
            "attach the same method config (targets, modules_to_save) before loading")

    def fill(path: str, leaf: Any) -> Any:
        value = params[path]
        if tuple(value.shape) != tuple(leaf.shape) or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise errors.CheckpointError(
                f"adapter tensor {path!r} is {value.dtype}{list(value.shape)} but the model "
                f"expects {np.dtype(leaf.dtype)}{list(leaf.shape)}; was it saved with another rank "
                "or model?")
        return jax.numpy.asarray(value)

    return map_with_path(fill, template)


def lora_config_dict(config: Any, **extra: Any) -> dict[str, Any]:
    """The JSON form of a `peft_jax.LoraConfig`, with HF PEFT field names where they exist.

    Args:
        config: a `peft_jax.LoraConfig`.
        **extra: more fields (``base_model_name_or_path``, ``task_type``, ...).

    Raises:
        InvalidConfigError: a selector is a callable, which JSON cannot hold.

    Example:
        >>> from peft_jax import LoraConfig
        >>> d = lora_config_dict(LoraConfig(targets=["query", "value"], rank=4, alpha=8))
        >>> d["peft_type"], d["r"], d["target_modules"]
        ('LORA', 4, ['query', 'value'])
    """

    def selector(value: Any, name: str) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (list, tuple, set, frozenset)) and all(
                isinstance(v, str) for v in value):
            return list(value)
        raise errors.InvalidConfigError(
            f"{name} is a {type(value).__name__}, which cannot be written to JSON; use a regex "
            "string or a list of names to save this adapter")

    if getattr(config, "use_gating", False):
        raise errors.InvalidConfigError(
            "a gated LoRA (use_gating=True, UniPELT's) has no HF PEFT file format; save it with "
            "the orbax checkpoint (peft_jax.train.checkpoint) instead")
    return {
        "format": FORMAT,
        "peft_type": "DORA" if config.use_dora else "LORA",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": config.bias,
        "init_lora_weights": type(config.init).__name__,
        "target_modules": selector(config.targets, "targets"),
        "modules_to_save": selector(config.modules_to_save, "modules_to_save"),
        "rank_pattern": {str(k): v for k, v in dict(config.rank_pattern).items()},
        "alpha_pattern": {str(k): v for k, v in dict(config.alpha_pattern).items()},
        **extra,
    }


def write_adapter_files(directory: str | os.PathLike, params: Any, config: Mapping[str, Any]) -> Path:
    """Writes ``params`` and ``config`` to ``directory``, atomically.

    Args:
        directory: the adapter directory (created, or replaced whole).
        params: the trainable state (any pytree of arrays) or an already flat ``{path: array}``.
        config: JSON-serialisable settings, e.g. from `lora_config_dict`.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        InvalidConfigError: ``config`` is not JSON-serialisable or a leaf is not an array.

    Example:
        >>> import tempfile, pathlib
        >>> d = write_adapter_files(pathlib.Path(tempfile.mkdtemp()) / "a", {"w": np.zeros(2)}, {})
        >>> (d / ADAPTER_CONFIG).is_file()
        True
    """
    from safetensors.numpy import save_file  # noqa: PLC0415 (optional dependency)

    flat = flatten_params(params)  # a flat {path: array} dict flattens to itself
    try:
        config_text = json.dumps(dict(config), indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise errors.InvalidConfigError(f"the adapter config is not JSON-serialisable ({e})") from e
    tensors = {k: np.ascontiguousarray(v) for k, v in flat.items()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
        (tmp / ADAPTER_CONFIG).write_text(config_text, encoding="utf-8")
    return directory


def read_adapter_files(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads an adapter directory written by `write_adapter_files`.

    Returns:
        ``(params, config)``: ``{path: numpy array}`` and the JSON config.

    Raises:
        CheckpointError: the directory, a file, or valid contents are missing.

    Example:
        >>> params, config = read_adapter_files("runs/default/adapter")  # doctest: +SKIP
    """
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    directory = Path(directory)
    weights, config_file = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for f in (weights, config_file):
        if not f.is_file():
            raise errors.CheckpointError(
                f"{f} is missing; an adapter directory holds {ADAPTER_WEIGHTS} and "
                f"{ADAPTER_CONFIG}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise errors.CheckpointError(f"{config_file} is not valid JSON ({e})") from e
    try:
        params = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise errors.CheckpointError(f"{weights} is not a readable safetensors file ({e})") from e
    return params, config

