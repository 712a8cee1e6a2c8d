"""Files: adapter export (safetensors + JSON config), written atomically.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from peft_jax import io
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "adapter"
    >>> _ = io.save_adapter(out, {"layer/lora_a": np.zeros((4, 2), np.float32)}, {"r": 2})
    >>> params, config = io.load_adapter(out)
    >>> params["layer/lora_a"].shape, config["r"]
    ((4, 2), 2)
"""

from peft_jax.io.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    flatten_params,
    load_adapter,
    lora_config_dict,
    restore_params,
    save_adapter,
)
from peft_jax.io.atomic import atomic_directory, write_json_atomic, write_text_atomic

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "atomic_directory",
    "flatten_params",
    "load_adapter",
    "lora_config_dict",
    "restore_params",
    "save_adapter",
    "write_json_atomic",
    "write_text_atomic",
]
