"""Frozen-prefix caching for encoder classifiers: run the frozen lower layers once, not per step.

When adapters sit only on layers ``>= depth`` of a BERT-family encoder, the embeddings and layers
``0 .. depth-1`` are frozen and untouched by the adapters, so their output for an example never
changes during training. `encode_prefix` computes it once per example; `suffix_logits` runs the
rest of the model (layers ``depth ..``, pooling, classifier) on it. A training step then costs the
forward and backward of the upper layers only, with exactly the same math as the full model
(dropout aside: the cached prefix is computed without it).

Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from peft_jax.models import EncoderConfig, EncoderForSequenceClassification
    >>> cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> m = EncoderForSequenceClassification(cfg, num_labels=2, rngs=nnx.Rngs(0))
    >>> ids, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    >>> h = encode_prefix(m, ids, mask, depth=1)
    >>> bool(jnp.allclose(suffix_logits(m, h, mask, depth=1), m(ids, mask), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.errors import InvalidConfigError
from peft_jax.models.encoder import pool
from peft_jax.train.buckets import sorted_eval_batches

__all__ = ["PrefixForward", "cache_prefix", "encode_prefix", "frozen_depth", "suffix_features",
           "suffix_logits"]

_LAYER = re.compile(r"(?:^|/)encoder/layer/(\d+)/")


def _layers(model: Any) -> Any:
    return model.backbone.encoder.layer


def frozen_depth(model: Any, trainable_paths: Iterable[str]) -> int:
    """How many bottom layers hold no trainable parameter: 0 when anything below the layers
    trains (the embeddings, or the input tap of prompt / P-tuning, which changes every layer's
    input); what sits above them (the classifier, the pooler) does not count.

    Args:
        model: an `peft_jax.models.EncoderForSequenceClassification` (adapters attached).
        trainable_paths: "/"-joined paths of the trainable leaves.

    Example:
        >>> frozen_depth(m, ["bert/encoder/layer/4/attention/self/query/default/lora_a",
        ...                  "classifier/trained/default/kernel"])  # doctest: +SKIP
        4
    """
    depth = len(_layers(model))
    for path in trainable_paths:
        hit = _LAYER.search(path)
        if hit:
            depth = min(depth, int(hit.group(1)))
        elif not path.startswith("classifier/") and "/pooler/" not in f"/{path}":
            return 0  # the embeddings, the input tap: below every layer
    return depth


def encode_prefix(model: Any, input_ids: jax.Array, attention_mask: jax.Array, depth: int,
                  token_type_ids: jax.Array | None = None) -> jax.Array:
    """Embeddings and layers ``0 .. depth-1``: ``float[B, T, H]`` hidden states (no dropout)."""
    backbone = model.backbone
    if not 0 <= depth <= len(_layers(model)):
        raise InvalidConfigError(f"depth must be in 0..{len(_layers(model))}, got {depth}")
    if token_type_ids is None:
        token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    h = backbone.embeddings(input_ids, token_type_ids, backbone.position_ids(input_ids))
    mask = attention_mask.astype(bool)
    for layer in list(_layers(model))[:depth]:
        h = layer(h, mask)
    return h


def suffix_features(model: Any, hidden: jax.Array, attention_mask: jax.Array, depth: int, *,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """Layers ``depth ..`` and pooling on prefix states: the head's input ``[B, hidden]``."""
    if model.pooling == "pooler":
        raise InvalidConfigError("prefix caching supports pooling 'mean' or 'cls', not 'pooler'")
    layers = list(_layers(model))[depth:]
    keys = [None] * len(layers) if dropout_rng is None else list(
        jax.random.split(dropout_rng, len(layers)))
    mask = attention_mask.astype(bool)
    h = hidden
    for layer, key in zip(layers, keys):
        h = layer(h, mask, key)
    return pool(h, attention_mask, model.pooling)


def suffix_logits(model: Any, hidden: jax.Array, attention_mask: jax.Array, depth: int, *,
                  dropout_rng: jax.Array | None = None) -> jax.Array:
    """Layers ``depth ..``, pooling and the classifier on prefix states: ``[B, num_labels]``."""
    k_layers, k_head = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    feats = suffix_features(model, hidden, attention_mask, depth, dropout_rng=k_layers)
    if k_head is not None:
        feats = model.dropout(feats, deterministic=False, rngs=k_head)
    return model.classifier(feats)


@dataclasses.dataclass(frozen=True)
class PrefixForward:
    """A `peft_jax.train.classify.Forward` from cached prefix states (``hidden``) at ``depth``."""

    depth: int
    fields: tuple[str, ...] = ("hidden", "attention_mask")

    def logits(self, model: Any, batch: Any, dropout_rng: Any = None) -> jax.Array:
        return suffix_logits(model, batch["hidden"], batch["attention_mask"], self.depth,
                             dropout_rng=dropout_rng)

    def features(self, model: Any, batch: Any) -> jax.Array:
        return suffix_features(model, batch["hidden"], batch["attention_mask"], self.depth)


def cache_prefix(model: Any, arrays: dict[str, np.ndarray], depth: int, *,
                 batch_size: int = 64, bucket: int = 32) -> np.ndarray:
    """Runs `encode_prefix` over every example: ``float32[N, L, H]`` (padding rows are zero).

    Batches are sorted by length and trimmed to their longest example, so short texts cost little.
    The parameters enter the jitted function as arguments, never as constants.

    Example:
        >>> arrays = {"input_ids": ids, "attention_mask": mask}  # doctest: +SKIP
        >>> hidden = cache_prefix(model, arrays, depth=3)  # doctest: +SKIP
    """
    graphdef, state, static = nnx.split(model, nnx.Variable, ...)

    @jax.jit
    def run(state, batch):
        model = nnx.merge(graphdef, state, static)
        return encode_prefix(model, batch["input_ids"], batch["attention_mask"], depth)

    ids, mask = np.asarray(arrays["input_ids"]), np.asarray(arrays["attention_mask"])
    n, full = ids.shape
    out = np.zeros((n, full, model.backbone.config.hidden_size), np.float32)
    inputs = {"input_ids": ids, "attention_mask": mask}
    for batch in sorted_eval_batches(inputs, batch_size, bucket=bucket):
        rows, valid = batch.pop("index"), batch.pop("valid")
        hidden = np.asarray(run(state, batch))
        width = hidden.shape[1]
        out[rows[valid], :width] = hidden[valid] * batch["attention_mask"][valid][..., None]
    return out
