"""Thin glue over PyPI ``tokenizers``: a ``tokenizer.json`` -> padded numpy int32 batches.

Example:
    >>> tok = load_tokenizer("minilm-l6")  # doctest: +SKIP
    >>> batch = tok.encode(["hello world", "a longer sentence"], max_length=8)  # doctest: +SKIP
    >>> batch["input_ids"].shape, batch["attention_mask"].dtype  # doctest: +SKIP
    ((2, 8), dtype('int32'))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from peft_jax.errors import CheckpointError, InvalidConfigError

__all__ = ["TextTokenizer", "load_tokenizer"]

_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


class TextTokenizer:
    """Batch encoding with padding and truncation to fixed-length numpy arrays.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (this object owns and reconfigures it).
      pad_id: the padding id; ``None`` takes it from the tokenizer's padding config or a
        ``[PAD]``/``<pad>`` token.

    Example:
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> raw = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hi": 2, "there": 3},
      ...                                  unk_token="[UNK]"))
      >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> tok = TextTokenizer(raw)
      >>> tok.encode(["hi there", "hi"], max_length=3)["input_ids"].tolist()
      [[2, 3, 0], [2, 0, 0]]
    """

    def __init__(self, tokenizer: Tokenizer, pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.pad_id = self._find_pad_id(pad_id)
        self.pad_token = tokenizer.id_to_token(self.pad_id) or ""

    @classmethod
    def from_file(cls, path: str | os.PathLike, pad_id: int | None = None) -> TextTokenizer:
        """Reads a ``tokenizer.json`` file (or the one inside a model directory).

        Raises:
          CheckpointError: no such file, or not a valid tokenizer file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"no tokenizer file at {path}; pass a tokenizer.json or a model directory that "
                "holds one"
            )
        try:
            raw = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{path} is not a valid tokenizers file: {e}") from e
        return cls(raw, pad_id)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], max_length: int = 128,
               padding: Literal["max_length", "longest"] = "max_length", truncation: bool = True,
               add_special_tokens: bool = True,
               padding_side: Literal["right", "left"] = "right") -> dict[str, np.ndarray]:
        """Tokenizes a batch into int32 arrays.

        Args:
          texts: the strings.
          max_length: length to truncate to, and to pad to with ``padding="max_length"``.
          padding: ``"max_length"`` (fixed shape: one compiled program) or ``"longest"``.
          truncation: cut sequences longer than ``max_length``.
          add_special_tokens: add ``[CLS]``/``[SEP]`` (or the model's equivalents).
          padding_side: ``"right"`` for encoders, ``"left"`` for batched generation.

        Returns:
          ``{"input_ids", "attention_mask", "token_type_ids"}``, each ``int32[B, L]``.

        Raises:
          InvalidConfigError: ``max_length < 1`` or an unknown padding mode.
        """
        if max_length < 1:
            raise InvalidConfigError(f"max_length must be >= 1, got {max_length}")
        if padding not in ("max_length", "longest"):
            raise InvalidConfigError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        tok = self.tokenizer
        if truncation:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        tok.enable_padding(direction=padding_side, pad_id=self.pad_id, pad_token=self.pad_token,
                           length=max_length if padding == "max_length" else None)
        encodings = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask",
                  "token_type_ids": "type_ids"}
        if not encodings:
            return {k: np.zeros((0, max_length), np.int32) for k in fields}
        return {k: np.array([getattr(e, attr) for e in encodings], np.int32)
                for k, attr in fields.items()}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Turns ids back into text."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _find_pad_id(self, pad_id: int | None) -> int:
        if pad_id is not None:
            return int(pad_id)
        if self.tokenizer.padding is not None:
            return int(self.tokenizer.padding["pad_id"])
        for token in _PAD_TOKENS:
            found = self.tokenizer.token_to_id(token)
            if found is not None:
                return found
        raise InvalidConfigError(
            f"the tokenizer has no padding config and none of the tokens {_PAD_TOKENS}; pass "
            "pad_id=..."
        )


def load_tokenizer(name_or_path: str | os.PathLike, pad_id: int | None = None) -> TextTokenizer:
    """Loads the tokenizer of a registered model name, a model directory or a tokenizer.json.

    Raises:
      UnknownNameError / MissingPackageError: as :func:`peft_jax.models.registry.resolve`.
      CheckpointError: no ``tokenizer.json`` there (GGUF decoders carry their tokenizer in the
        GGUF metadata instead).
    """
    path = Path(name_or_path)
    if not path.exists():
        from peft_jax.models import registry  # noqa: PLC0415

        path = registry.resolve(name_or_path).path
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(
            f"{path} is a GGUF file; its tokenizer lives in the GGUF metadata and is read by the "
            "GGUF loader, not from a tokenizer.json"
        )
    return TextTokenizer.from_file(path, pad_id)
