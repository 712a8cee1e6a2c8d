"""Files: adapters saved and loaded in one call (`save_adapter` / `load_adapter`), configs as
JSON (`to_dict` / `from_dict`), base identity checks, defensive safetensors reading, and the
raw file pair the training recipe writes, all written atomically.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from peft_jax import io
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "adapter"
    >>> _ = io.write_adapter_files(out, {"layer/lora_a": np.zeros((4, 2), np.float32)}, {"r": 2})
    >>> params, config = io.read_adapter_files(out)
    >>> params["layer/lora_a"].shape, config["r"]
    ((4, 2), 2)
"""

from peft_jax.io.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    flatten_params,
    lora_config_dict,
    read_adapter_files,
    restore_params,
    write_adapter_files,
)
from peft_jax.io.atomic import atomic_directory, write_json_atomic, write_text_atomic
from peft_jax.io.codec import from_dict, to_dict
from peft_jax.io.saving import load_adapter, save_adapter
from peft_jax.io.tensor_files import read_tensors, write_tensors

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "atomic_directory",
    "flatten_params",
    "from_dict",
    "load_adapter",
    "lora_config_dict",
    "read_adapter_files",
    "read_tensors",
    "restore_params",
    "save_adapter",
    "to_dict",
    "write_adapter_files",
    "write_tensors",
    "write_json_atomic",
    "write_text_atomic",
]
