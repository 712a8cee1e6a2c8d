"""Text in, text out: tokenize (optionally through the chat template), generate, decode.

:func:`complete` continues a batch of prompts with a loaded decoder and its
:class:`~peft_jax.models.lm_tokenizer.LMTokenizer`; :func:`generate_command` is what
``peft-jax generate`` runs: it checks its arguments, loads a named or local checkpoint and returns
the completion.

Example:
    >>> print(generate_command("smollm2-135m", "What is the capital of France?", greedy=True,
    ...                        chat=True))  # doctest: +SKIP
    The capital of France is Paris.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from peft_jax.errors import InvalidConfigError
from peft_jax.models.generate import Sampling, generate
from peft_jax.models.lm_tokenizer import LMTokenizer, load_lm_tokenizer

__all__ = ["DEFAULT_SAMPLING", "complete", "generate_command", "load_generator", "make_prompts",
           "sampling_from_flags"]

DEFAULT_SAMPLING = Sampling(temperature=0.8, top_p=0.95)  # when neither --greedy nor flags say


def make_prompts(tokenizer: LMTokenizer, prompts: Sequence[str], *, chat: bool = False,
                 system: str | None = None) -> dict[str, np.ndarray]:
    """Left-padded ``input_ids`` / ``attention_mask`` for ``prompts``.

    With ``chat=True`` each prompt becomes one user turn (after an optional system message)
    rendered by the model's chat template with the assistant header appended; the template
    writes the special tokens itself, so none are added again.

    Raises:
        InvalidConfigError: A prompt that tokenizes to nothing, or ``chat`` without a template.

    Example:
        >>> # make_prompts(tok, ["What is 2+2?"], chat=True)["input_ids"].shape
    """
    from peft_jax.models.chat import user_message  # noqa: PLC0415

    if chat:
        texts = [tokenizer.apply_chat_template(user_message(p, system)) for p in prompts]
    elif system is not None:
        raise InvalidConfigError("a system message needs chat=True (--chat): plain prompts have "
                                 "no place for it")
    else:
        texts = list(prompts)
    batch = tokenizer.batch_encode(texts, add_special_tokens=not chat)
    empty = [i for i, row in enumerate(batch["attention_mask"]) if not row.any()]
    if empty:
        raise InvalidConfigError(f"prompt(s) {empty} tokenize to no tokens; give some text")
    return batch


def complete(model: Any, tokenizer: LMTokenizer, prompts: Sequence[str], *,
             max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False,
             system: str | None = None, seed: int = 0) -> list[str]:
    """Generates a completion for each prompt (one batch, left-padded) and decodes it.

    Generation stops at the tokenizer's stop tokens and the model config's EOS ids; the stop
    token and other special tokens are not part of the returned text.

    Args:
        model: A :class:`~peft_jax.models.decoder.Decoder` (adapted or not).
        tokenizer: Its tokenizer.
        prompts: The prompts.
        max_new_tokens: At most this many new tokens per prompt.
        sampling: :class:`~peft_jax.models.generate.Sampling` (default greedy).
        chat: Format each prompt with the chat template (see :func:`make_prompts`).
        system: A system message for chat prompts.
        seed: Seed of the sampling key.

    Returns:
        One completion string per prompt.

    Raises:
        InvalidConfigError: Bad prompts, or token ids the model's vocabulary does not have.

    Example:
        >>> # complete(model, tok, ["Once upon a time"], max_new_tokens=20)
    """
    batch = make_prompts(tokenizer, prompts, chat=chat, system=system)
    vocab = model.config.vocab_size
    if int(batch["input_ids"].max()) >= vocab:
        raise InvalidConfigError(
            f"the tokenizer produced id {int(batch['input_ids'].max())} but the model's vocabulary "
            f"has {vocab} entries; load the tokenizer that belongs to this model")
    stops = tuple(dict.fromkeys([*tokenizer.stop_token_ids, *model.config.eos_token_ids]))
    out = generate(model, batch["input_ids"], batch["attention_mask"],
                   max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stops,
                   pad_token_id=tokenizer.pad_token_id, rng=jax.random.key(seed))
    return tokenizer.batch_decode(np.asarray(out.tokens), np.asarray(out.lengths))


def sampling_from_flags(*, greedy: bool = False, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None) -> Sampling:
    """The :class:`Sampling` the CLI flags ask for; unset flags take :data:`DEFAULT_SAMPLING`.

    Raises:
        InvalidConfigError: ``greedy`` together with a sampling flag, or an out-of-range value.

    Example:
        >>> sampling_from_flags(top_k=40)
        Sampling(temperature=0.8, top_k=40, top_p=0.95)
        >>> sampling_from_flags(greedy=True).greedy
        True
    """
    given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items()
             if v is not None}
    if greedy:
        if given:
            raise InvalidConfigError(
                f"--greedy takes the most likely token, so {sorted(given)} would be ignored; "
                "drop --greedy to sample, or drop the sampling flags")
        return Sampling()
    if given.get("temperature") == 0:
        raise InvalidConfigError("temperature 0 means greedy decoding: pass --greedy instead")
    d = DEFAULT_SAMPLING
    return Sampling(temperature=given.get("temperature", d.temperature),
                    top_k=given.get("top_k", d.top_k), top_p=given.get("top_p", d.top_p))


def load_generator(name_or_path: str | os.PathLike, dtype: Any = "float32") -> tuple[Any, LMTokenizer]:
    """Loads a decoder and its tokenizer from a registered name, ``.gguf`` file or HF directory.

    Raises:
        UnknownNameError: An unknown name (the known ones are listed).
        MissingPackageError: A named model whose package is missing (the pip command is shown).
        InvalidConfigError: The checkpoint is an encoder, which cannot generate text.
        CheckpointError: Missing or inconsistent files.

    Example:
        >>> model, tok = load_generator("smollm2-135m")  # doctest: +SKIP
    """
    from peft_jax.models import load  # noqa: PLC0415 (import cycle)
    from peft_jax.models.registry import MODELS, resolve  # noqa: PLC0415

    ckpt = resolve(name_or_path)
    if ckpt.family != "decoder":
        decoders = [n for n, s in MODELS.items() if s.family == "decoder"]
        raise InvalidConfigError(
            f"{str(name_or_path)!r} is an encoder model and cannot generate text; use a decoder "
            f"(registered: {decoders}, a .gguf file or an HF-layout causal LM directory)")
    tokenizer = load_lm_tokenizer(ckpt.path)  # first: a missing tokenizer fails before the weights
    return load(ckpt.path, dtype), tokenizer


def generate_command(model: str, prompt: str, *, adapter: str | None = None,
                     max_new_tokens: int = 64, greedy: bool = False, chat: bool = False,
                     system: str | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     dtype: str = "float32") -> str:
    """What ``peft-jax generate`` runs: the completion of one prompt.

    Every argument is checked before the model is loaded.

    Args:
        model: A registered name (``smollm2-135m``), a ``.gguf`` file or an HF-layout directory.
        prompt: The prompt text.
        adapter: An adapter directory (peft_jax, HF PEFT or AdapterHub files) applied to the
            decoder (`peft_jax.io.formats.load_any`).
        max_new_tokens: At most this many new tokens.
        greedy: Argmax decoding; otherwise sampling (:func:`sampling_from_flags`).
        chat: Wrap the prompt in the model's chat template as one user turn.
        system: System message for ``chat``.
        temperature, top_k, top_p: Sampling settings.
        seed: Sampling seed.
        dtype: Parameter dtype (``float32`` or ``bfloat16``).

    Returns:
        The generated text (without the prompt and special tokens).

    Raises:
        InvalidConfigError: inconsistent flags, an encoder model, an adapter that does not fit.
        UnknownNameError, MissingPackageError, CheckpointError: As :func:`load_generator`.

    Example:
        >>> generate_command("smollm2-135m", "hi", adapter="no/such/dir")
        Traceback (most recent call last):
        ...
        peft_jax.errors.CheckpointError: no/such/dir holds no adapter: ...
    """
    if adapter is not None:
        from peft_jax.io.formats import detect_format  # noqa: PLC0415

        detect_format(adapter)  # before the model loads
    if max_new_tokens < 1:
        raise InvalidConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling_from_flags(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    if system is not None and not chat:
        raise InvalidConfigError("--system needs --chat: plain prompts have no place for it")
    decoder, tokenizer = load_generator(model, dtype)
    if adapter is not None:
        from peft_jax.io.formats import load_any  # noqa: PLC0415

        decoder = load_any(decoder, adapter)
        decoder.eval()
    return complete(decoder, tokenizer, [prompt], max_new_tokens=max_new_tokens, sampling=sampling,
                    chat=chat, system=system, seed=seed)[0]
