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
    "load_encoder",
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
    ``peft_jax.models.gguf.load_gguf_decoder`` (GGUF files).

    Args:
      name_or_path: e.g. ``"minilm-l6"``, ``"smollm2-135m"``, or a path.
      dtype: parameter dtype ("float32", "bfloat16", ...); ``None`` keeps the stored one.
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
        from peft_jax.models.gguf import load_gguf_decoder  # noqa: PLC0415 (optional, heavy)

        return load_gguf_decoder(ckpt.path, dtype=dtype, **kwargs)
    from peft_jax.models.decoder import load_decoder  # noqa: PLC0415

    return load_decoder(ckpt.path, dtype=dtype, **kwargs)
