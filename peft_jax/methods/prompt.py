"""Prompt tuning: trainable virtual-token embeddings before the inputs (Lester et al., 2021,
"The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691).

At the model's input site (an input tap) the method prepends ``N`` trained rows ``P`` to the token
embeddings and ``N`` ones to the attention mask::

    call(Inputs([P; e], [1; m]))

``P`` is HF PEFT's ``prompt_embeddings`` ``(N, features)``, broadcast over the batch and cast to
the embeddings' dtype. Starting values (``prompt_init``; not ``init``, which is `Method.init`):

* ``"random"``: ``N(0, 1)``, as HF's ``PromptTuningInit.RANDOM`` (a fresh ``nn.Embedding``).
* ``"random_uniform"``: ``U(-0.5, 0.5)``, as AdapterHub's default.
* ``"vocab"``: rows of the word embedding at uniform-random token ids (HF's ``SAMPLE_VOCAB``).
* ``"text"``: the word-embedding rows of ``token_ids``, repeated or cut to ``N`` as HF's ``TEXT``
  does; `PromptTuning.from_text` tokenizes the text for you.

The params are kept in at least float32 (HF keeps them in fp32 even on a half-precision model).
Decoding steps after a cached prefill (``Inputs.fresh=False``) pass through untouched: the
virtual tokens are already in the cache. The model's outputs then carry ``N`` extra leading
positions (`peft_jax.hooks.taps.strip_virtual` drops them). A seq2seq model has one input site
per stack (encoder, decoder), each with its own ``P``; HF saves both as one ``(2N, d)`` array.
Not mergeable: there are no base weights to fold the prompt into.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods.base import Context
    >>> from peft_jax.methods.sites import Inputs, InputSite
    >>> site = InputSite(path="input_tap", layer="InputTap", features=4, vocab_size=10)
    >>> table = jnp.arange(40.0).reshape(10, 4)
    >>> pt = PromptTuning(num_virtual_tokens=3, prompt_init="text", token_ids=(7, 2))
    >>> params, _ = pt.init(jax.random.key(0), site, {"embedding": table}, {})
    >>> params["prompt_embeddings"][:, 0].tolist()  # rows 7, 2, 7 (the ids repeated to 3)
    [28.0, 8.0, 28.0]
    >>> x = Inputs(jnp.zeros((2, 5, 4)), jnp.ones((2, 5), bool))
    >>> out = pt.apply(params, {}, site, lambda i: i, x, {"embedding": table}, Context())
    >>> out.embeds.shape, out.mask.shape
    ((2, 8, 4), (2, 8))
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import errors
from peft_jax.methods.base import Call, Inputs, InputSite, Method, Params
from peft_jax.methods.lora import check_positive_int

__all__ = ["PromptTuning", "check_prompt_length", "param_dtype", "prepend_prompt", "repeat_to_length",
           "token_ids_of"]

INITS = ("random", "random_uniform", "vocab", "text")


def param_dtype(dtype: Any) -> Any:
    """The dtype virtual-token params are kept in: ``dtype`` promoted to at least float32.

    Example:
        >>> import jax.numpy as jnp
        >>> param_dtype(jnp.bfloat16), param_dtype(jnp.float32)
        (dtype('float32'), dtype('float32'))
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def repeat_to_length(ids: Sequence[int], length: int) -> tuple[int, ...]:
    """``ids`` cut to ``length``, or repeated until they reach it (HF PEFT's ``TEXT`` init).

    Example:
        >>> repeat_to_length([5, 6, 7], 2), repeat_to_length([5, 6], 5)
        ((5, 6), (5, 6, 5, 6, 5))
    """
    ids = tuple(ids)
    if not ids:
        raise errors.InvalidConfigError("cannot repeat an empty list of token ids")
    reps = -(-length // len(ids))
    return (ids * reps)[:length]


def token_ids_of(text: str, tokenizer: Any) -> tuple[int, ...]:
    """The token ids of one string, from any tokenizer the library meets.

    Accepts an HF-style callable (``tokenizer(text)["input_ids"]``, with its special tokens, as HF
    PEFT's ``TEXT`` init), an object whose ``encode(text)`` returns ids, a ``tokenizers.Encoding``
    or a dict (`peft_jax.models.lm_tokenizer.LMTokenizer`, ``tokenizers.Tokenizer``), and the
    batch-only `peft_jax.models.tokenizer.TextTokenizer` (encoded unpadded and untruncated).

    Example:
        >>> class Words:
        ...     def encode(self, text):
        ...         return [len(w) for w in text.split()]
        >>> token_ids_of("a bb ccc", Words())
        (1, 2, 3)
    """
    if not isinstance(text, str):
        raise errors.InvalidConfigError(f"the init text must be a string, got {type(text).__name__}")
    if _is_text_tokenizer(tokenizer):
        batch = tokenizer.encode([text], padding="longest", truncation=False)
        ids = np.asarray(batch["input_ids"][0])[np.asarray(batch["attention_mask"][0]) > 0]
    elif callable(tokenizer):
        ids = tokenizer(text)["input_ids"]
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise errors.InvalidConfigError(
            f"cannot tokenize with a {type(tokenizer).__name__}: pass a tokenizer with encode(text) "
            "-> list of ids, or an HF-style tokenizer(text)['input_ids']")
    if hasattr(ids, "ids"):  # a tokenizers.Encoding
        ids = ids.ids
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise errors.InvalidConfigError(
            f"the tokenizer returned {ids.shape} values of type {ids.dtype} for one text; expected a "
            "flat list of integer ids")
    if not ids.size:
        raise errors.InvalidConfigError(f"the init text {text!r} tokenizes to no tokens; give a longer text")
    return tuple(int(i) for i in ids)


def _is_text_tokenizer(tokenizer: Any) -> bool:
    try:
        from peft_jax.models.tokenizer import TextTokenizer  # noqa: PLC0415 (needs `tokenizers`)
    except ImportError:
        return False
    return isinstance(tokenizer, TextTokenizer)


def check_prompt_length(method: Method, n: int, site: InputSite, seq_len: int | None = None,
                        offset: int = 0) -> None:
    """Raises `SequenceTooLongError` if ``n`` virtual tokens (plus ``seq_len`` inputs after
    ``offset`` earlier virtual tokens, when given) exceed ``site.max_positions``.

    Example:
        >>> from peft_jax.methods.sites import InputSite
        >>> site = InputSite(path="t", layer="InputTap", features=4, vocab_size=9, max_positions=8)
        >>> check_prompt_length(PromptTuning(num_virtual_tokens=3), 3, site, seq_len=5)  # 8 fits
        >>> check_prompt_length(PromptTuning(num_virtual_tokens=3), 3, site, seq_len=6)
        Traceback (most recent call last):
        ...
        peft_jax.errors.SequenceTooLongError: PromptTuning on 't': 3 virtual tokens + 6 input tokens = 9 positions, but the model takes at most 8; shorten the inputs to at most 5 tokens (truncate or bucket them) or use fewer virtual tokens
    """  # noqa: E501
    limit = site.max_positions
    if not limit:
        return
    what = f"{type(method).__name__} on {site.path!r}"
    if seq_len is None:
        if n >= limit:
            raise errors.SequenceTooLongError(
                f"{what}: {n} virtual tokens leave no room for inputs in a model that takes at most "
                f"{limit} positions; use fewer than {limit} virtual tokens")
        return
    total = n + seq_len + offset
    if total > limit:
        earlier = f" + {offset} earlier virtual tokens" if offset else ""
        raise errors.SequenceTooLongError(
            f"{what}: {n} virtual tokens + {seq_len} input tokens{earlier} = {total} positions, but "
            f"the model takes at most {limit}; shorten the inputs to at most {max(limit - n - offset, 0)} "
            "tokens (truncate or bucket them) or use fewer virtual tokens")


def prepend_prompt(method: Method, prompt: jax.Array, site: InputSite, call: Call, x: Inputs) -> Any:
    """``call(x)`` with the ``(N, d)`` rows of ``prompt`` before ``x.embeds`` and ones before
    ``x.mask``; ``call(x)`` unchanged when ``x.fresh`` is false (a decoding step after a prefill).

    Raises `SequenceTooLongError` (at trace time) if the longer inputs exceed the site's limit.

    Example:
        >>> import jax.numpy as jnp
        >>> from peft_jax.methods.sites import Inputs, InputSite
        >>> site = InputSite(path="t", layer="InputTap", features=2, vocab_size=9)
        >>> x = Inputs(jnp.zeros((1, 2, 2)), jnp.array([[True, False]]))
        >>> out = prepend_prompt(PromptTuning(num_virtual_tokens=1), jnp.ones((1, 2)), site, lambda i: i, x)
        >>> out.embeds[0, :, 0].tolist(), out.mask.tolist()
        ([1.0, 0.0, 0.0], [[True, True, False]])
    """
    if not x.fresh:
        return call(x)
    embeds, mask = x.embeds, x.mask
    n = prompt.shape[0]
    if prompt.shape[-1] != embeds.shape[-1]:
        raise errors.InvalidConfigError(
            f"{type(method).__name__} on {site.path!r}: the prompt is {prompt.shape[-1]} wide but the "
            f"input embeddings are {embeds.shape[-1]}; the input tap's features must be the embedding width")
    check_prompt_length(method, n, site, seq_len=embeds.shape[-2], offset=x.offset)
    batch = embeds.shape[:-2]
    rows = jnp.broadcast_to(prompt.astype(embeds.dtype), (*batch, *prompt.shape))
    ones = jnp.ones((*mask.shape[:-1], n), mask.dtype)
    return call(x._replace(embeds=jnp.concatenate([rows, embeds], axis=-2),
                           mask=jnp.concatenate([ones, mask], axis=-1)))


def _check_token_ids(token_ids: Any) -> tuple[int, ...]:
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, (tuple, list, range, np.ndarray)):
        raise errors.InvalidConfigError(f"token_ids must be a tuple of token ids, got {token_ids!r}")
    bad = [i for i in token_ids
           if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad:
        raise errors.InvalidConfigError(f"token_ids must be non-negative integers, got {bad[:5]!r}")
    if len(token_ids) == 0:
        raise errors.InvalidConfigError("prompt_init='text' needs at least one token id in token_ids")
    return tuple(int(i) for i in token_ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuning(Method):
    """Prompt tuning on an input site: ``N`` trained embeddings before the inputs.

    Args:
        num_virtual_tokens: ``N``, the rows of ``prompt_embeddings``.
        prompt_init: ``"random"`` (``N(0, 1)``), ``"random_uniform"`` (``U(-0.5, 0.5)``), ``"vocab"``
            (word-embedding rows at random ids) or ``"text"`` (the rows of ``token_ids``).
        token_ids: for ``prompt_init="text"``: the ids whose rows start the prompt (repeated or cut to
            ``N``); see `from_text`.

    Example:
        >>> from peft_jax.methods.sites import InputSite
        >>> site = InputSite(path="t", layer="InputTap", features=8, vocab_size=100)
        >>> PromptTuning(num_virtual_tokens=20).param_shapes(site)
        {'prompt_embeddings': (20, 8)}
    """

    name: ClassVar[str] = "prompt_tuning"
    sites: ClassVar[tuple[str, ...]] = ("inputs",)
    num_virtual_tokens: int = 20
    prompt_init: str = "random"
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        if self.prompt_init not in INITS:
            raise errors.InvalidConfigError(
                f"PromptTuning prompt_init must be one of {', '.join(map(repr, INITS))}, got {self.prompt_init!r}")
        if self.prompt_init == "text":
            if self.token_ids is None:
                raise errors.InvalidConfigError(
                    "prompt_init='text' needs token_ids (or build it with PromptTuning.from_text(text, tokenizer))")
            object.__setattr__(self, "token_ids", _check_token_ids(self.token_ids))
        elif self.token_ids is not None:
            raise errors.InvalidConfigError(
                f"token_ids is only used by prompt_init='text', but prompt_init is {self.prompt_init!r}; "
                "drop one of them")

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, num_virtual_tokens: int = 20) -> "PromptTuning":
        """A ``"text"``-initialized prompt: the tokens of ``text`` (HF's ``prompt_tuning_init_text``).

        ``tokenizer`` is anything `token_ids_of` accepts (the library's tokenizers, an HF one).

        Example:
            >>> class Chars:
            ...     def encode(self, text):
            ...         return [ord(c) - ord("a") for c in text]
            >>> PromptTuning.from_text("abc", Chars(), num_virtual_tokens=5).token_ids
            (0, 1, 2)
        """
        return cls(num_virtual_tokens=num_virtual_tokens, prompt_init="text",
                   token_ids=token_ids_of(text, tokenizer))

    @property
    def init_ids(self) -> tuple[int, ...] | None:
        """The ``N`` token ids a ``"text"`` init copies (``token_ids`` repeated or cut), else ``None``.

        Example:
            >>> PromptTuning(num_virtual_tokens=4, prompt_init="text", token_ids=(1, 2, 3)).init_ids
            (1, 2, 3, 1)
        """
        if self.token_ids is None:
            return None
        return repeat_to_length(self.token_ids, self.num_virtual_tokens)

    def check(self, site) -> None:
        """Typed errors before compile: the site kind, the position limit, ids in the vocabulary."""
        super().check(site)
        check_prompt_length(self, self.num_virtual_tokens, site)
        if self.token_ids is not None:
            out_of_range = sorted({i for i in self.token_ids if i >= site.vocab_size})
            if out_of_range:
                raise errors.InvalidConfigError(
                    f"PromptTuning on {site.path!r}: token ids {out_of_range[:5]} are out of range for the "
                    f"vocabulary of {site.vocab_size} rows; tokenize the init text with this model's tokenizer")

    def init(self, key, site: InputSite, base: Params, shared: Params):
        """``{"prompt_embeddings": (N, features)}`` as ``prompt_init`` says (``base["embedding"]`` is the table)."""
        n, d = self.num_virtual_tokens, site.features
        table = (base or {}).get("embedding")
        dtype = param_dtype(table.dtype if table is not None else jnp.float32)
        if self.prompt_init == "random":
            prompt = jax.random.normal(key, (n, d), dtype)
        elif self.prompt_init == "random_uniform":
            prompt = jax.random.uniform(key, (n, d), dtype, -0.5, 0.5)
        else:
            if table is None:
                raise errors.InvalidConfigError(
                    f"PromptTuning(prompt_init={self.prompt_init!r}) on {site.path!r} needs the word-embedding table "
                    "(the input site's embed_path); use prompt_init='random' or name the embedding")
            if self.prompt_init == "vocab":
                ids = jax.random.randint(key, (n,), 0, table.shape[0])
            else:
                ids = jnp.asarray(self.init_ids, jnp.int32)
            prompt = jnp.take(table, ids, axis=0).astype(dtype)
        return {"prompt_embeddings": prompt}, {}

    def param_shapes(self, site: InputSite) -> Params:
        """``{"prompt_embeddings": (N, features)}`` (without building anything)."""
        return {"prompt_embeddings": (self.num_virtual_tokens, site.features)}

    def apply(self, params, shared, site: InputSite, call, x: Inputs, base, ctx):
        """``call(Inputs([P; e], [1; m]))``, or ``call(x)`` on a decoding step (``x.fresh`` false)."""
        return prepend_prompt(self, params["prompt_embeddings"], site, call, x)
