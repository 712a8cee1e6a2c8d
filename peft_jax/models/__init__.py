"""Reference NNX models and their loaders (HF safetensors directories, GGUF files)."""

from peft_jax.models.checkpoint_files import iter_tensors, load_hf_dir, read_config

__all__ = ["iter_tensors", "load_hf_dir", "read_config"]
