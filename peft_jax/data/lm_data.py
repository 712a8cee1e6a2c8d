"""Language-modelling data: text packed into fixed-length blocks, or instruction / chat examples
whose loss covers only what the assistant says.

Every split is a dict of ``[rows, block_length]`` int32 arrays: ``input_ids``, ``attention_mask``
(0 on padding) and ``loss_mask`` (1 on the tokens the model is trained to predict; the logits at
``t - 1`` predict token ``t``, as `peft_jax.train.losses.causal_lm_loss` reads it).

Sources (`load_lm_dataset`):

* ``"austen"``: Jane Austen's six novels (`peft_jax.data.austen`); each novel's last
  ``test_fraction`` of lines is the test split and the ``val_fraction`` before it validation, so
  held-out text is never seen in training, not even as the next block.
* a ``.txt`` file: one document, split the same way.
* a ``.jsonl`` file of ``{"text": ...}`` documents: rows carved into splits (seeded), packed.
* a ``.jsonl`` file of ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}`` rows:
  formatted by the model's chat template (plain ``prompt + completion + EOS`` without one), one
  example per row, right-padded; the loss mask covers the assistant turns (and the template's
  end-of-turn tokens, so the model learns to stop) and nothing else.

Packed text: documents are tokenized, joined with EOS, and cut into blocks; the last partial block
is dropped.

Example:
    >>> import numpy as np
    >>> pack_blocks([[1, 2, 3], [4, 5]], block_length=3, eos_token_id=0)["input_ids"].tolist()
    [[1, 2, 3], [0, 4, 5]]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_jax.data.dataset import carve
from peft_jax.data.tables import jsonl_records, read_utf8
from peft_jax.errors import DataError, InvalidConfigError, UnknownNameError

__all__ = ["LM_DATASETS", "LanguageModelingData", "chat_example", "load_lm_dataset", "pack_blocks",
           "tail_split"]

LM_DATASETS = ("austen",)
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class LanguageModelingData:
    """Token arrays per split (``val`` / ``test`` may have no rows) and how they were made.

    ``kind`` is ``"text"`` (packed blocks) or ``"chat"`` (one example per row); ``truncated``
    counts chat examples cut at ``block_length``.
    """

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    kind: str
    truncated: int = 0

    def split(self, name: str) -> dict[str, np.ndarray]:
        return getattr(self, name)

    def rows(self, name: str) -> int:
        return len(self.split(name)["input_ids"])

    def target_tokens(self, name: str) -> int:
        """How many tokens of split ``name`` the loss covers."""
        return int(self.split(name)["loss_mask"][:, 1:].sum())


def pack_blocks(documents: Sequence[Sequence[int]], block_length: int, eos_token_id: int
                ) -> dict[str, np.ndarray]:
    """Token ids of ``documents`` joined by ``eos_token_id`` and cut into full blocks."""
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            stream.append(eos_token_id)
        stream.extend(doc)
    rows = len(stream) // block_length
    ids = np.asarray(stream[:rows * block_length], np.int32).reshape(rows, block_length)
    ones = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones.copy()}


def tail_split(lines: Sequence[str], val_fraction: float, test_fraction: float
               ) -> tuple[list[str], list[str], list[str]]:
    """``(train, val, test)``: the last ``test_fraction`` of ``lines``, the ``val_fraction``
    before it, and the rest, in order.

    Example:
        >>> tail_split([str(i) for i in range(10)], 0.2, 0.1)
        (['0', '1', '2', '3', '4', '5', '6'], ['7', '8'], ['9'])
    """
    n = len(lines)
    test_start = n - int(round(test_fraction * n))
    val_start = test_start - int(round(val_fraction * n))
    return list(lines[:val_start]), list(lines[val_start:test_start]), list(lines[test_start:])


def _segments(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces: assistant turns are trained."""
    if not tokenizer.chat_template:
        prompt = "".join(m["content"] for m in messages if m["role"] != "assistant")
        answer = "".join(m["content"] for m in messages if m["role"] == "assistant")
        return [(prompt, False), (answer + (tokenizer.eos_token or ""), True)]
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            pieces.append((before[len(done):], False))
            done = before
        text = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not text.startswith(done):
            raise DataError("the chat template does not render a conversation as a sequence "
                            "of growing prefixes, so completions cannot be located; format the "
                            "data as plain text instead")
        pieces.append((text[len(done):], message["role"] == "assistant"))
        done = text
    return [(t, trained) for t, trained in pieces if t]


def chat_example(tokenizer: Any, messages: Sequence[Mapping[str, Any]], block_length: int
                 ) -> tuple[list[int], list[int], bool]:
    """``(ids, loss_mask, truncated)`` of one conversation, at most ``block_length`` tokens.

    Each piece is tokenized on its own (no special tokens added: the template writes them), so
    the boundary between prompt and completion is exact.
    """
    ids: list[int] = []
    mask: list[int] = []
    if tokenizer.bos_token_id is not None and not tokenizer.chat_template:
        ids, mask = [tokenizer.bos_token_id], [0]
    for text, trained in _segments(tokenizer, messages):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids[:block_length], mask[:block_length], len(ids) > block_length


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{'role': ..., 'content': ...} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant turn to learn from")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return [{"role": "user", "content": str(record["prompt"])},
            {"role": "assistant", "content": str(record["completion"])}]


def _chat_arrays(tokenizer: Any, conversations: list[list[dict]], block_length: int
                 ) -> tuple[dict[str, np.ndarray], int]:
    n = len(conversations)
    ids = np.full((n, block_length), tokenizer.pad_token_id, np.int32)
    attention, loss = np.zeros((n, block_length), np.int32), np.zeros((n, block_length), np.int32)
    truncated = 0
    for row, messages in enumerate(conversations):
        tokens, mask, cut = chat_example(tokenizer, messages, block_length)
        ids[row, :len(tokens)], attention[row, :len(tokens)], loss[row, :len(tokens)] = tokens, 1, mask
        truncated += cut
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}, truncated


def _eos(tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id


def _packed(tokenizer: Any, splits: Mapping[str, list[str]], block_length: int, source: str
            ) -> LanguageModelingData:
    arrays = {name: pack_blocks([tokenizer.encode(d, add_special_tokens=False) for d in docs if d],
                                block_length, _eos(tokenizer)) for name, docs in splits.items()}
    if not len(arrays["train"]["input_ids"]):
        raise DataError(f"{source}: the training text is shorter than one block of "
                        f"{block_length} tokens; give more text or a smaller --max-length")
    return LanguageModelingData(arrays["train"], arrays["val"], arrays["test"], kind="text")


def load_lm_dataset(name_or_path: str | os.PathLike, tokenizer: Any, *, block_length: int,
                    val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0
                    ) -> LanguageModelingData:
    """Tokenized splits of a named corpus (`LM_DATASETS`), a ``.txt`` file or a ``.jsonl`` file.

    Raises:
        UnknownNameError: neither a known corpus nor an existing file.
        DataError: a suffix other than .txt / .jsonl, an empty file, JSONL rows with neither
            ``text``, ``prompt``/``completion`` nor ``messages`` (file and line named), or too
            little text for one block.
        MissingPackageError: ``"austen"`` without its Debian package (the commands are printed).
        InvalidConfigError: fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InvalidConfigError(f"--val-fraction {val_fraction} and --test-fraction "
                                 f"{test_fraction} must each be in [0, 1) and sum to less than 1")
    if name_or_path == "austen":
        from peft_jax.data.austen import load_novels  # noqa: PLC0415 (reads files only here)

        parts = [tail_split(lines, val_fraction, test_fraction) for lines in load_novels().values()]
        splits = {name: ["\n".join(p[i]) for p in parts] for i, name in enumerate(SPLITS)}
        return _packed(tokenizer, splits, block_length, "austen")
    path = Path(name_or_path)
    if not path.is_file():
        raise UnknownNameError(f"{str(name_or_path)!r} is neither a known text corpus {list(LM_DATASETS)} "
                        "nor a file; give a .txt file or a .jsonl file of text or chat rows")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        parts = tail_split(read_utf8(path).splitlines(), val_fraction, test_fraction)
        return _packed(tokenizer, {name: ["\n".join(p)] for name, p in zip(SPLITS, parts, strict=True)},
                       block_length, str(path))
    if suffix != ".jsonl":
        raise DataError(f"{path}: language-model data is a .txt or .jsonl file, not "
                        f"{suffix or 'a file without suffix'!r}")
    records = jsonl_records(path, read_utf8(path))
    if not records:
        raise DataError(f"{path} holds no rows")
    first = records[0][1]
    chat = "messages" in first or {"prompt", "completion"} <= set(first)
    for number, record in records:
        fits = ("messages" in record or {"prompt", "completion"} <= set(record)) if chat else (
            "text" in record)
        if not fits:
            want = "'messages' or 'prompt' and 'completion'" if chat else "'text'"
            raise DataError(f"{path}: line {number} has no {want} field (its fields: "
                            f"{sorted(record)}); every row must have the fields of the first")
    rest, test = carve(records, test_fraction, seed)
    train, val = carve(rest, val_fraction / (1 - test_fraction), seed + 1)
    if not chat:
        return _packed(tokenizer, {n: [str(r["text"]) for _, r in rows] for n, rows in
                                   zip(SPLITS, (train, val, test), strict=True)}, block_length, str(path))
    arrays, truncated = {}, 0
    for name, rows in zip(SPLITS, (train, val, test), strict=True):
        arrays[name], cut = _chat_arrays(
            tokenizer, [_messages(r, f"{path}: line {n}") for n, r in rows], block_length)
        truncated += cut
    if not arrays["train"]["loss_mask"].any():
        raise DataError(f"{path}: no completion token survives truncation to {block_length} "
                        "tokens; raise --max-length")
    return LanguageModelingData(arrays["train"], arrays["val"], arrays["test"], kind="chat",
                                truncated=truncated)
