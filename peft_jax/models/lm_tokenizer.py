"""The tokenizer of a causal language model: encode, left-padded batches, decode, chat prompts.

:class:`LMTokenizer` wraps a PyPI ``tokenizers.Tokenizer`` with the model's special tokens and
chat template. It is built from a GGUF file's metadata (:meth:`LMTokenizer.from_gguf`) or from
an HF-layout directory (``tokenizer.json`` plus ``tokenizer_config.json``;
:meth:`LMTokenizer.from_hf_dir`); :func:`load_lm_tokenizer` takes a registered name or a path.

Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> raw = Tokenizer(models.WordLevel({"<eos>": 0, "hi": 1, "there": 2}, unk_token="<eos>"))
    >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> raw.add_special_tokens(["<eos>"])
    1
    >>> tok = LMTokenizer(raw, eos_token_id=0)
    >>> batch = tok.batch_encode(["hi there", "hi"])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[1, 2], [0, 1]], [[1, 1], [0, 1]])
    >>> tok.decode([1, 2, 0])
    'hi there'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from peft_jax.errors import CheckpointError, InvalidConfigError

__all__ = ["LMTokenizer", "load_lm_tokenizer"]


class LMTokenizer:
    """A causal LM's tokenizer with its special tokens and chat template.

    Args:
        tokenizer: The ``tokenizers.Tokenizer`` (its post-processor adds BOS when the model
            wants one); this object never changes its padding or truncation settings.
        bos_token_id: Beginning-of-sequence id, if the model has one.
        eos_token_id: End-of-sequence id, if any.
        pad_token_id: Padding id; ``None`` uses ``eos_token_id`` (else 0).
        stop_token_ids: Ids that end generation; ``None`` means ``(eos_token_id,)``.
        chat_template: The Jinja chat template, if the model has one.

    Example:
        >>> from tokenizers import Tokenizer, models
        >>> tok = LMTokenizer(Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
        ...                   eos_token_id=1)
        >>> tok.eos_token, tok.pad_token_id, tok.stop_token_ids
        ('</s>', 1, (1,))
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else
                                eos_token_id if eos_token_id is not None else 0)
        default_stops = () if eos_token_id is None else (eos_token_id,)
        self.stop_token_ids = tuple(int(t) for t in (stop_token_ids or default_stops))
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> LMTokenizer:
        """Builds the tokenizer described by a GGUF file's metadata.

        Raises:
            CheckpointError: The file is missing, corrupt or has no tokenizer.
            InvalidConfigError: The GGUF tokenizer kind is not supported.

        Example:
            >>> tok = LMTokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
            >>> tok.encode("The capital of France is")  # doctest: +SKIP
            [504, 3575, 282, 4649, 314]
        """
        from peft_jax.models.gguf import gguf_tokenizer_info, open_gguf  # noqa: PLC0415 (lazy)
        from peft_jax.models.gguf_tokenizer import build_gguf_tokenizer  # noqa: PLC0415

        file = open_gguf(path)
        info = gguf_tokenizer_info(file)
        raw = build_gguf_tokenizer(info, file.metadata.get("general.architecture"))
        stops = [t for t in (info.eos_token_id, info.eot_token_id) if t is not None]
        return cls(raw, bos_token_id=info.bos_token_id,
                   eos_token_id=info.eos_token_id, pad_token_id=info.padding_token_id,
                   stop_token_ids=list(dict.fromkeys(stops)), chat_template=info.chat_template)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> LMTokenizer:
        """Reads ``tokenizer.json`` and, if present, ``tokenizer_config.json`` (special tokens,
        ``chat_template``) and ``chat_template.jinja`` from an HF-layout directory.

        Raises:
            CheckpointError: No ``tokenizer.json``, or an unreadable file.

        Example:
            >>> LMTokenizer.from_hf_dir("/nonexistent")
            Traceback (most recent call last):
            ...
            peft_jax.errors.CheckpointError: /nonexistent has no tokenizer.json; save the model's tokenizer there (tokenizer.save_pretrained(dir)) or pass a .gguf file, which carries its own
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(
                f"{path} has no tokenizer.json; save the model's tokenizer there "
                "(tokenizer.save_pretrained(dir)) or pass a .gguf file, which carries its own")
        try:
            raw = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{file} is not a valid tokenizers file: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take "default"
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        model_config = _read_json(path / "config.json")
        ids = {k: _token_id(raw, config.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
        eos = ids["eos"] if ids["eos"] is not None else _first(model_config.get("eos_token_id"))
        stops = [eos, *_as_list(model_config.get("eos_token_id"))]
        return cls(raw, bos_token_id=ids["bos"], eos_token_id=eos, pad_token_id=ids["pad"],
                   stop_token_ids=[t for t in dict.fromkeys(stops) if t is not None],
                   chat_template=template)

    # --- tokens -------------------------------------------------------------------------------
    def _token(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(i)

    @property
    def bos_token(self) -> str | None:
        """The BOS token text (``None`` if the model has none)."""
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        """The EOS token text (``None`` if the model has none)."""
        return self._token(self.eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # --- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one string (BOS/EOS added when the model's tokenizer adds them).

        Special tokens written in the text (``<|im_start|>``) are kept whole.
        """
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def batch_encode(self, texts: Sequence[str], *, add_special_tokens: bool = True,
                     padding_side: Literal["left", "right"] = "left",
                     pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        """Encodes a batch padded to its longest row (left padding suits generation).

        Args:
            texts: The strings.
            add_special_tokens: Add BOS/EOS as the model's tokenizer does.
            padding_side: ``"left"`` (generation) or ``"right"``.
            pad_to_multiple_of: Round the padded length up (fewer distinct shapes to compile).

        Returns:
            ``{"input_ids", "attention_mask"}``, each ``int32[batch, length]``.

        Raises:
            InvalidConfigError: An empty batch, a bad ``padding_side`` or multiple.
        """
        if isinstance(texts, str) or not texts:
            raise InvalidConfigError("batch_encode needs a non-empty list of strings; use "
                                     "encode(text) for a single string")
        if padding_side not in ("left", "right"):
            raise InvalidConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise InvalidConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                            add_special_tokens=add_special_tokens)]
        length = max(1, max(len(r) for r in rows))
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            span = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            ids[i, span], mask[i, span] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens dropped unless ``skip_special_tokens=False``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, lengths: Sequence[int] | None = None, *,
                     skip_special_tokens: bool = True) -> list[str]:
        """Decodes each row, cut to ``lengths[i]`` tokens when given (e.g. ``Generation``)."""
        rows = np.asarray(rows)
        cut = [len(r) for r in rows] if lengths is None else [int(n) for n in np.asarray(lengths)]
        return [self.decode(r[:n], skip_special_tokens=skip_special_tokens) for r, n in zip(rows, cut)]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        """Renders a conversation with the model's chat template (see :mod:`peft_jax.models.chat`).

        Raises:
            InvalidConfigError: The model has no chat template.
        """
        from peft_jax.models.chat import render_chat  # noqa: PLC0415 (jinja2 only when needed)

        if not self.chat_template:
            raise InvalidConfigError("this model's tokenizer has no chat template; prompt it with "
                                     "plain text (drop --chat / chat=True)")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)


def load_lm_tokenizer(name_or_path: str | os.PathLike) -> LMTokenizer:
    """The tokenizer of a registered decoder name, a ``.gguf`` file or an HF-layout directory.

    Raises:
        UnknownNameError / MissingPackageError: As :func:`peft_jax.models.registry.resolve`.
        CheckpointError: No tokenizer there.

    Example:
        >>> tok = load_lm_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> tok.decode(tok.encode("héllo 🙂"))  # doctest: +SKIP
        'héllo 🙂'
    """
    from peft_jax.models.registry import resolve  # noqa: PLC0415

    ckpt = resolve(name_or_path)
    if ckpt.kind == "gguf":
        return LMTokenizer.from_gguf(ckpt.path)
    return LMTokenizer.from_hf_dir(ckpt.path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from e
    return value if isinstance(value, dict) else {}


def _token_id(raw: Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):  # AddedToken as saved by transformers
        token = token.get("content")
    return raw.token_to_id(token) if isinstance(token, str) else None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first(value: Any) -> int | None:
    values = _as_list(value)
    return values[0] if values else None
