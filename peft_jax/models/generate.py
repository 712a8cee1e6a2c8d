"""Jitted text generation for the reference decoder: prefill once, then decode with the KV cache.

Batches are left-padded (``attention_mask`` 0 on the left), so every row's next token is written
at the same cache slot. Decoding runs in one ``lax.while_loop`` that stops when every row has
produced a stop token or ``max_new_tokens`` are out; one compile per (model, batch shape,
``max_new_tokens``, sampling kind). Temperature and top-p are traced values: changing them does
not recompile.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from peft_jax.models.decoder import Decoder, DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
    ...                     num_heads=2, num_kv_heads=1, head_dim=8)
    >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
    >>> out = generate(model, jnp.array([[0, 3, 4], [5, 6, 7]]), jnp.array([[0, 1, 1], [1, 1, 1]]),
    ...                max_new_tokens=4)
    >>> out.tokens.shape, out.lengths.tolist()
    ((2, 4), [4, 4])
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from peft_jax.errors import InvalidConfigError
from peft_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        temperature: 0 for greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: Keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability reaches
            ``top_p`` (``None``: all).

    Example:
        >>> Sampling(temperature=0.7, top_p=0.9).greedy
        False
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidConfigError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidConfigError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax."""
        return self.temperature == 0


class Generation(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
        tokens: ``[batch, max_new_tokens]`` int32 new tokens; after a row's stop token (which is
            included) the row holds ``pad_token_id``.
        lengths: ``[batch]`` int32 number of generated tokens per row, stop token included.
    """

    tokens: Array
    lengths: Array


def sample_next(logits: Array, rng: Array, *, greedy: bool, top_k: int | None, use_top_p: bool,
                temperature: Array, top_p: Array) -> Array:
    """Pick one token per row from float32 ``logits`` ``[batch, vocab]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> sample_next(jnp.array([[0.0, 2.0, 1.0]]), jax.random.key(0), greedy=True, top_k=None,
        ...             use_top_p=False, temperature=jnp.float32(1), top_p=jnp.float32(1)).tolist()
        [1]
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if use_top_p:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: Decoder, input_ids: Array, attention_mask: Array | None = None, *,
             max_new_tokens: int = 32, sampling: Sampling = Sampling(), stop_tokens=None,
             pad_token_id: int | None = None, rng: Array | None = None) -> Generation:
    """Continue left-padded prompts ``input_ids`` ``[batch, prompt_len]``.

    Args:
        model: A :class:`~peft_jax.models.decoder.Decoder` (or an adapted copy of one).
        input_ids: Prompt tokens, left-padded.
        attention_mask: ``[batch, prompt_len]``, 0 on padding; ``None`` means no padding.
        max_new_tokens: Number of tokens to generate at most.
        sampling: A :class:`Sampling` (default greedy).
        stop_tokens: Token ids that end a row; ``None`` uses the config's ``eos_token_ids``.
        pad_token_id: Written after a row stops; ``None`` uses the config's pad (or 0).
        rng: A ``jax.random.key`` for sampling (default ``key(0)``); unused when greedy.

    Returns:
        A :class:`Generation` with the new tokens and per-row lengths.

    Raises:
        InvalidConfigError: ``max_new_tokens < 1`` or mismatched ``input_ids``/``attention_mask``.

    Example:
        >>> # out = generate(model, ids, mask, max_new_tokens=20, sampling=Sampling(0.7, top_p=0.9),
        >>> #                rng=jax.random.key(1))
    """
    if max_new_tokens < 1:
        raise InvalidConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise InvalidConfigError(f"input_ids must be [batch, prompt_len], got shape {input_ids.shape}")
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise InvalidConfigError(
            f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
    config = model.config
    stops = tuple(config.eos_token_ids if stop_tokens is None else (int(t) for t in stop_tokens))
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate(
        graphdef, state, input_ids, mask, rng, jnp.float32(sampling.temperature or 1.0),
        jnp.float32(sampling.top_p or 1.0), max_new_tokens=max_new_tokens, greedy=sampling.greedy,
        top_k=sampling.top_k, use_top_p=sampling.top_p is not None, stops=stops, pad=int(pad))
    return Generation(tokens, lengths)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p",
                                   "stops", "pad"))
def _generate(graphdef, state, input_ids, mask, rng, temperature, top_p, *, max_new_tokens, greedy,
              top_k, use_top_p, stops, pad):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    pick = partial(sample_next, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                   temperature=temperature, top_p=top_p)
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)

    cache = model.init_cache(batch, prompt_len + model.virtual_tokens(batch, prompt_len) + max_new_tokens)
    hidden, cache = model.hidden_states(input_ids, attention_mask=mask, cache=cache)
    rng, key = jax.random.split(rng)
    token = pick(model.logits(hidden[:, -1]).astype(jnp.float32), key)
    done = jnp.isin(token, stop_ids)
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
    lengths = jnp.ones((batch,), jnp.int32)

    def cond(carry):
        step, _, _, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, token, done, out, lengths, rng = carry
        hidden, cache = model.hidden_states(token[:, None], cache=cache)
        rng, key = jax.random.split(rng)
        nxt = pick(model.logits(hidden[:, -1]).astype(jnp.float32), key)
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop_ids)
        return step + 1, cache, nxt, done, out, lengths, rng

    carry = (jnp.int32(1), cache, token, done, out, lengths, rng)
    _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths
