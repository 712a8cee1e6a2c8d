"""Causal-LM loss and perplexity that never hold the ``[batch, seq, vocab]`` logits at once.

The final hidden states are cut into chunks of ``chunk`` positions; a `jax.lax.scan` computes the
LM head and the cross-entropy of one chunk at a time under `jax.checkpoint`, so the backward pass
recomputes each chunk's logits instead of keeping them. Peak memory for the head is one chunk:
``batch * chunk * vocab`` floats (Gemma 3's 262k vocabulary at batch 8 and seq 512 would need
4 GiB of float32 logits at once; in chunks of 128 it needs a quarter of that, and one chunk's
gradient). The result equals `peft_jax.train.losses.causal_lm_loss` on the full logits.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from peft_jax.models.decoder import Decoder, DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
    ...                     num_heads=2, num_kv_heads=1, head_dim=8)
    >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
    >>> ids = jnp.arange(10)[None] % 32
    >>> batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    >>> loss, aux = make_lm_loss(chunk=4)(model, batch)
    >>> from peft_jax.train.losses import causal_lm_loss
    >>> bool(jnp.allclose(loss, causal_lm_loss(model(ids), ids), atol=1e-6))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.errors import BatchError
from peft_jax.train.buckets import sorted_eval_batches

__all__ = ["DEFAULT_CHUNK", "make_lm_eval", "make_lm_loss", "nll_sums"]

DEFAULT_CHUNK = 128
FIELDS = ("input_ids", "attention_mask", "loss_mask")


def _check(batch: Mapping[str, Any]) -> None:
    missing = [k for k in FIELDS if k not in batch]
    if missing:
        raise BatchError(f"a language-model batch needs {list(FIELDS)}; missing {missing}")


def nll_sums(model: Any, batch: Mapping[str, Any], *, chunk: int = DEFAULT_CHUNK
             ) -> tuple[jax.Array, jax.Array]:
    """``(sum of -log p(token), number of tokens)`` over the tokens ``loss_mask`` marks
    (position 0 is never a target), the head applied ``chunk`` positions at a time."""
    _check(batch)
    hidden, _ = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
    h, labels = hidden[:, :-1], batch["input_ids"][:, 1:]
    weights = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    b, t, d = h.shape
    size = max(1, min(chunk, t))
    n = math.ceil(t / size)
    pad = n * size - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, size, d).swapaxes(0, 1)
    labels = jnp.pad(labels, ((0, 0), (0, pad))).reshape(b, n, size).swapaxes(0, 1)
    w = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, n, size).swapaxes(0, 1)

    @jax.checkpoint
    def piece(h_c, y_c, w_c):
        logits = model.logits(h_c).astype(jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y_c) * w_c)

    def body(total, xs):
        return total + piece(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, labels, w))
    return total, jnp.sum(weights)


def make_lm_loss(*, chunk: int = DEFAULT_CHUNK) -> Callable[[Any, Mapping[str, Any]], Any]:
    """``model_loss(model, batch) -> (mean next-token cross-entropy, {"target_tokens": n})`` for
    `peft_jax.train.parts.ModelParts.loss`; ``batch`` holds `FIELDS`."""

    def model_loss(model: Any, batch: Mapping[str, Any]):
        total, count = nll_sums(model, batch, chunk=chunk)
        return total / jnp.maximum(count, 1.0), {"target_tokens": count}

    return model_loss


def make_lm_eval(parts: Any, frozen: Any, arrays: Mapping[str, np.ndarray], *, batch_size: int = 8,
                 bucket: int = 32, chunk: int = DEFAULT_CHUNK) -> Callable[[Any], dict[str, float]]:
    """``evaluate(trainable) -> {"loss", "perplexity", "tokens"}`` over every row of ``arrays``:
    the token-weighted mean cross-entropy and its exponential.

    Raises:
        BatchError: a field of `FIELDS` is missing.
    """
    _check(arrays)
    arrays = {k: arrays[k] for k in FIELDS}

    @jax.jit
    def sums(trainable, frozen, batch):
        valid = batch["valid"].astype(jnp.int32)[:, None]
        batch = {**batch, "loss_mask": batch["loss_mask"] * valid}
        return nll_sums(parts.merge(trainable, frozen), batch, chunk=chunk)

    def evaluate(trainable: Any) -> dict[str, float]:
        total, count = 0.0, 0.0
        for batch in sorted_eval_batches(arrays, batch_size, bucket=bucket):
            batch.pop("index")
            b_total, b_count = sums(trainable, frozen, batch)
            total, count = total + float(b_total), count + float(b_count)
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}

    return evaluate
