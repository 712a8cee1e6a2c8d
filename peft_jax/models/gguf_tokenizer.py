"""Build a PyPI ``tokenizers`` tokenizer from the vocabulary a GGUF file carries.

Two llama.cpp tokenizer kinds (``tokenizer.ggml.model``) are rebuilt:

* ``"gpt2"``: byte-level BPE (SmolLM2, Llama 3, Qwen2/3). Vocabulary and merges come from the
  file; text is split by the regex llama.cpp uses for the file's ``tokenizer.ggml.pre`` (see
  :data:`BPE_PRE_TOKENIZERS`; an unlisted name falls back to GPT-2's regex) and mapped to the
  byte alphabet.
* ``"llama"``: SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma). The file has no
  merges; they are derived from the vocabulary, a merge ranked by the merged piece's score (for
  Gemma, whose scores do not follow its merge order, by the piece's position in the file).

Control tokens (llama.cpp type 3) become special added tokens, matched whole in the text and
dropped by ``decode(..., skip_special_tokens=True)``; user-defined ones (type 4) are matched whole
but kept. BOS/EOS are added by the post-processor when the file's ``add_bos_token`` /
``add_eos_token`` say so.

Example:
    >>> from peft_jax.models.gguf import GGUFTokenizerInfo
    >>> info = GGUFTokenizerInfo(model="gpt2", tokens=("<s>", "a", "b", "ab", "\u0120", "\u0120ab"),
    ...                          token_types=(3, 1, 1, 1, 1, 1), merges=("a b", "\u0120 ab"))
    >>> tok = build_gguf_tokenizer(info)
    >>> tok.encode("<s>ab ab", add_special_tokens=False).ids
    [0, 3, 5]
    >>> tok.decode([0, 3, 5])
    'ab ab'
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from peft_jax.errors import CheckpointError, InvalidConfigError
from peft_jax.models.gguf import GGUFTokenizerInfo

__all__ = ["BPE_PRE_TOKENIZERS", "SUPPORTED_GGUF_TOKENIZERS", "build_gguf_tokenizer",
           "byte_alphabet"]

SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = 3, 4

# How llama.cpp splits text before byte-level BPE, by ``tokenizer.ggml.pre``.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {  # name -> (regex, digits split one by one)
    "default": (_GPT2, False), "gpt2": (_GPT2, False), "smollm": (_GPT2, True),
    "llama3": (_LLAMA3, False), "llama-v3": (_LLAMA3, False), "llama-bpe": (_LLAMA3, False),
    "smaug-bpe": (_LLAMA3, False), "qwen2": (_QWEN2, False), "deepseek-r1-qwen": (_QWEN2, False),
}


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """The 256 printable characters byte-level BPE spells bytes 0..255 with (GPT-2's table).

    Example:
        >>> byte_alphabet()[ord(" ")], byte_alphabet()[ord("a")]
        ('\u0120', 'a')
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in kept:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return tuple(spelled[b] for b in range(256))


def build_gguf_tokenizer(info: GGUFTokenizerInfo, architecture: str | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the one described by a GGUF file's metadata.

    Args:
        info: From :func:`peft_jax.models.gguf.gguf_tokenizer_info`.
        architecture: The file's ``general.architecture``; Gemma SentencePiece files need it
            (without it, Gemma is recognized by its ``<start_of_turn>`` token).

    Returns:
        The tokenizer (no padding or truncation configured).

    Raises:
        InvalidConfigError: The tokenizer kind is not in :data:`SUPPORTED_GGUF_TOKENIZERS`.
        CheckpointError: The vocabulary is inconsistent (a BPE file without merges, a merge of
            unknown pieces).

    Example:
        >>> from peft_jax.models.gguf import GGUFTokenizerInfo
        >>> build_gguf_tokenizer(GGUFTokenizerInfo(model="t5", tokens=("a",)))
        Traceback (most recent call last):
        ...
        peft_jax.errors.InvalidConfigError: GGUF tokenizer model 't5' is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece BPE). Use a model whose GGUF has one of these, or an HF directory with a tokenizer.json
    """
    if info.model == "gpt2":
        tok = _byte_level_bpe(info)
    elif info.model == "llama":
        tok = _sentencepiece_bpe(info, architecture)
    else:
        raise InvalidConfigError(
            f"GGUF tokenizer model {info.model!r} is not supported; supported: gpt2 (byte-level "
            "BPE), llama (SentencePiece BPE). Use a model whose GGUF has one of these, or an HF "
            "directory with a tokenizer.json")
    _add_special_tokens(tok, info)
    _set_post_processor(tok, info)
    return tok


def _byte_level_bpe(info: GGUFTokenizerInfo) -> Tokenizer:
    if not info.merges:
        raise CheckpointError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges; the "
                              "file is incomplete, re-export it with llama.cpp's convert script")
    alphabet = set(byte_alphabet())
    spell = byte_alphabet()
    vocab = {}
    for i, token in enumerate(info.tokens):
        if not set(token) <= alphabet:  # stored as raw text: respell its UTF-8 bytes
            token = "".join(spell[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in info.merges]
    try:
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception on a merge of unknown pieces
        raise CheckpointError(f"GGUF BPE vocabulary and merges disagree: {e}") from e
    regex, digits = BPE_PRE_TOKENIZERS.get(info.pre or "default", BPE_PRE_TOKENIZERS["default"])
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(info: GGUFTokenizerInfo, architecture: str | None) -> Tokenizer:
    if architecture is not None:
        gemma = architecture.startswith("gemma")
    else:
        gemma = "<start_of_turn>" in info.tokens[:1000]
    # Gemma stores pieces of two or more spaces as spaces; SentencePiece spells them with U+2581.
    tokens = [("\u2581" * len(t) if gemma and t and not t.strip(" ") else t) for t in info.tokens]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    types = info.token_types or (1,) * len(tokens)
    if gemma or len(info.scores) != len(tokens):
        rank = {t: -i for i, t in enumerate(tokens)}  # earlier in the file = merged first
    else:
        rank = {t: s for t, s in zip(tokens, info.scores)}
    merges = []
    for t, kind in zip(tokens, types):
        if kind not in (1, _USER_DEFINED) or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                merges.append((-rank[t], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = info.tokens[info.unknown_token_id] if info.unknown_token_id is not None else None
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(info.add_space_prefix) if info.add_space_prefix is not None else not gemma
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # "\u2581" before the first piece of text, as SentencePiece adds a dummy space
        tok.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok: Tokenizer, info: GGUFTokenizerInfo) -> None:
    types = info.token_types
    if not types:
        return
    alphabet = set(byte_alphabet()) if info.model == "gpt2" else None
    vocab = tok.get_vocab()
    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(info.tokens, types)
               if k == _CONTROL and t in vocab and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(info.tokens, types) if k == _USER_DEFINED and t in vocab]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _set_post_processor(tok: Tokenizer, info: GGUFTokenizerInfo) -> None:
    add_bos = info.add_bos_token if info.add_bos_token is not None else info.model == "llama"
    bos = [info.tokens[info.bos_token_id]] if add_bos and info.bos_token_id is not None else []
    eos = ([info.tokens[info.eos_token_id]]
           if info.add_eos_token and info.eos_token_id is not None else [])
    if not (bos or eos):
        return
    ids = {info.tokens[i]: i for i in (info.bos_token_id, info.eos_token_id) if i is not None}
    tok.post_processor = processors.TemplateProcessing(
        single=[*bos, "$A", *eos], pair=[*bos, "$A", *eos, "$B:1", *eos],
        special_tokens=[(t, ids[t]) for t in dict.fromkeys(bos + eos)])
