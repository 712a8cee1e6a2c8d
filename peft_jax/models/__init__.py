"""Reference NNX models and their loaders (HF safetensors directories, GGUF files).

Example:
    >>> from peft_jax import models
    >>> sorted(models.known_names())
    ['gemma3-270m', 'minilm-l6', 'smollm2-135m']
    >>> model = models.load("minilm-l6", "float32")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from peft_jax.models.checkpoint_files import (
    iter_tensors,
    load_hf_dir,
    read_config,
    resolve_dtype,
    tensor_specs,
)
from peft_jax.models.encoder import (
    Encoder,
    EncoderConfig,
    EncoderForSequenceClassification,
    EncoderOutput,
    load_encoder,
    pool,
    sentence_embedding,
)
from peft_jax.models.registry import (
    ResolvedCheckpoint,
    install_command,
    known_names,
    resolve,
)
from peft_jax.models.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "EncoderForSequenceClassification",
    "EncoderOutput",
    "ResolvedCheckpoint",
    "TextTokenizer",
    "install_command",
    "iter_tensors",
    "known_names",
    "load",
    "load_decoder",
    "load_encoder",
    "load_gguf_decoder",
    "load_hf_dir",
    "load_tokenizer",
    "pool",
    "read_config",
    "resolve",
    "resolve_dtype",
    "sentence_embedding",
    "tensor_specs",
]


def load(name_or_path: str | os.PathLike, dtype: Any = None, **kwargs: Any) -> Any:
    """Loads a reference model from a registered name, an HF-layout directory or a GGUF file.

    Encoders (BERT family) go to :func:`load_encoder`; decoders to
    ``peft_jax.models.decoder.load_decoder`` (HF directories) or
    ``peft_jax.models.gguf.load_gguf_decoder`` (GGUF files). Either way the model alone is
    returned; its config is ``model.config``.

    Args:
      name_or_path: e.g. ``"minilm-l6"``, ``"smollm2-135m"``, or a path.
      dtype: parameter dtype ("float32", "bfloat16", ...); ``None`` keeps the stored one
        (float32 for GGUF).
      **kwargs: passed to the loader (``num_labels=2`` for an encoder classifier, ...).

    Returns:
      The loaded NNX model.

    Raises:
      UnknownNameError, MissingPackageError, CheckpointError, UnsupportedArchitectureError.

    Example:
      >>> enc = load("minilm-l6", num_labels=2)  # doctest: +SKIP
    """
    ckpt = resolve(name_or_path)
    if ckpt.family == "encoder":
        return load_encoder(ckpt.path, dtype, **kwargs)
    if ckpt.kind == "gguf":
        from peft_jax.models.gguf import load_gguf_decoder as loader  # noqa: PLC0415 (lazy)
    else:
        from peft_jax.models.decoder import load_decoder as loader  # noqa: PLC0415 (lazy)
    loaded = loader(ckpt.path, dtype=dtype, **kwargs)
    return loaded[0] if isinstance(loaded, tuple) else loaded


# Decoder names are re-exported lazily: importing peft_jax.models stays light and independent.
_LAZY = {"Decoder": "peft_jax.models.decoder", "DecoderConfig": "peft_jax.models.decoder_config",
         "load_decoder": "peft_jax.models.decoder", "load_gguf_decoder": "peft_jax.models.gguf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_jax.models' has no attribute {name!r}")
