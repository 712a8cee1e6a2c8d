"""Files: adapters saved and loaded in one call (`save_adapter` / `load_adapter`), in peft_jax's
own format, HF PEFT's (`hf_peft`) or AdapterHub's (`adapterhub`), several side by side
(`save_formats`), any of them read back (`load_any`); configs as JSON (`to_dict` / `from_dict`),
base identity checks, defensive safetensors reading; everything written atomically.

Example:
    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> import peft_jax
    >>> from peft_jax import io
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> _ = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(1))
    >>> out = io.save_adapter(model, pathlib.Path(tempfile.mkdtemp()) / "adapter")
    >>> io.detect_format(out)
    'peft_jax'
"""

from peft_jax.io.atomic import atomic_directory, write_json_atomic, write_text_atomic
from peft_jax.io.bundle import save_formats
from peft_jax.io.codec import from_dict, to_dict
from peft_jax.io.formats import FORMATS, base_model_of, detect_format, load_any
from peft_jax.io.saving import load_adapter, save_adapter
from peft_jax.io.tensor_files import read_tensors, write_tensors

__all__ = [
    "FORMATS",
    "atomic_directory",
    "base_model_of",
    "detect_format",
    "from_dict",
    "load_adapter",
    "load_any",
    "read_tensors",
    "save_adapter",
    "save_formats",
    "to_dict",
    "write_json_atomic",
    "write_tensors",
    "write_text_atomic",
]
