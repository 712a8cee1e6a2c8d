"""Sequence classification: forward paths, the loss, evaluation, and frozen pooled features.

A *forward* says how a batch reaches the logits. `FullForward` runs the whole model on token
ids: ``model(input_ids, attention_mask, token_type_ids, dropout_rng=...)`` (any NNX classifier
with that call, e.g. `peft_jax.models.EncoderForSequenceClassification`).
`peft_jax.train.prefix_cache.PrefixForward` starts from cached hidden states of the frozen lower
layers instead. The loss and the evaluation take either.

Example:
    >>> import jax.numpy as jnp
    >>> class Toy:
    ...     def __call__(self, ids, mask, types=None, *, dropout_rng=None):
    ...         return jnp.stack([jnp.zeros(ids.shape[0]), ids[:, 0].astype(jnp.float32)], -1)
    >>> batch = {"input_ids": jnp.array([[3], [-3]]), "attention_mask": jnp.ones((2, 1)),
    ...          "labels": jnp.array([1, 0])}
    >>> loss, aux = classification_loss(Toy(), batch)
    >>> round(float(loss), 4), float(aux["accuracy"])
    (0.0486, 1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peft_jax import nnx as peft_nnx
from peft_jax.errors import BatchError
from peft_jax.models.encoder import pool
from peft_jax.train.buckets import sorted_eval_batches
from peft_jax.train.parts import ModelParts

__all__ = ["Forward", "FullForward", "classification_loss", "frozen_features",
           "make_classification_eval", "make_classification_loss"]


class Forward(Protocol):
    """How a batch becomes logits (and, for baselines, pooled features)."""

    fields: tuple[str, ...]

    def logits(self, model: Any, batch: Mapping[str, Any], dropout_rng: Any = None) -> jax.Array:
        ...

    def features(self, model: Any, batch: Mapping[str, Any]) -> jax.Array:
        ...


@dataclasses.dataclass(frozen=True)
class FullForward:
    """The whole classifier on token ids (``input_ids``, ``attention_mask``)."""

    fields: tuple[str, ...] = ("input_ids", "attention_mask")

    def logits(self, model: Any, batch: Mapping[str, Any], dropout_rng: Any = None) -> jax.Array:
        return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                     dropout_rng=dropout_rng)

    def features(self, model: Any, batch: Mapping[str, Any]) -> jax.Array:
        """What the classifier head sees: the backbone's pooled states (no dropout)."""
        out = model.backbone(batch["input_ids"], batch["attention_mask"],
                             batch.get("token_type_ids"))
        if model.pooling == "pooler":
            return out.pooler_output
        return pool(out.last_hidden_state, batch["attention_mask"], model.pooling)


def _check(batch: Mapping[str, Any], forward: Forward) -> None:
    needed = (*forward.fields, "labels")
    missing = [k for k in needed if k not in batch]
    if missing:
        raise BatchError(
            f"the batch lacks {missing} (it has {sorted(batch)}); a classification batch needs "
            f"{list(needed)}, e.g. from peft_jax.data.tokenize_examples")


def make_classification_loss(forward: Forward = FullForward(), *, model_dropout: bool = False
                             ) -> Callable[[Any, Mapping[str, Any]], Any]:
    """``model_loss(model, batch) -> (mean cross-entropy, {"accuracy": ...})``.

    Args:
        forward: how the batch reaches the logits.
        model_dropout: pass the batch's ``"dropout_rng"`` (added per step by
            `peft_jax.train.fit`) to the model, turning its own dropout on.

    The returned function raises `BatchError` for a missing field while tracing, before any
    compile.
    """

    def model_loss(model: Any, batch: Mapping[str, Any]):
        _check(batch, forward)
        rng = batch.get("dropout_rng") if model_dropout else None
        logits = forward.logits(model, batch, rng).astype(jnp.float32)
        labels = batch["labels"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"accuracy": accuracy}

    return model_loss


classification_loss = make_classification_loss()


def make_classification_eval(parts: ModelParts, frozen: Any, arrays: Mapping[str, np.ndarray],
                             *, forward: Forward = FullForward(), batch_size: int = 64,
                             bucket: int = 32, num_classes: int | None = None
                             ) -> Callable[[Any], dict[str, Any]]:
    """Builds ``evaluate(trainable) -> {"loss", "accuracy"}`` over every example of ``arrays``.

    Examples are sorted by length and batched with `sorted_eval_batches`; the forward pass is
    jitted with the parameters as arguments (no dropout).

    Args:
        parts: the model's `ModelParts` (split in evaluation mode).
        frozen: the frozen state to evaluate with.
        arrays: the forward's fields and ``labels``.
        forward: how a batch reaches the logits.
        batch_size: examples per forward pass.
        bucket: padded widths are multiples of this.
        num_classes: when given, the result also holds ``"confusion"``: ``int[C, C]`` counts,
            rows the true class, columns the predicted one (`peft_jax.train.scores`).

    Raises:
        BatchError: a required field is missing.
    """
    _check(arrays, forward)
    arrays = {k: arrays[k] for k in (*forward.fields, "labels")}
    count = len(arrays["labels"])
    classes = num_classes or 1

    @jax.jit
    def sums(trainable, frozen, batch):
        logits = forward.logits(parts.merge(trainable, frozen), batch).astype(jnp.float32)
        weight = batch["valid"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        predicted = jnp.argmax(logits, -1)
        correct = (predicted == batch["labels"]).astype(jnp.float32)
        confusion = jnp.zeros((classes, classes), jnp.float32).at[
            jnp.clip(batch["labels"], 0, classes - 1), jnp.clip(predicted, 0, classes - 1)
        ].add(weight)
        return jnp.sum(ce * weight), jnp.sum(correct * weight), confusion

    def evaluate(trainable: Any) -> dict[str, Any]:
        loss, correct, confusion = 0.0, 0.0, np.zeros((classes, classes), np.int64)
        for batch in sorted_eval_batches(arrays, batch_size, bucket=bucket):
            batch.pop("index")
            b_loss, b_correct, b_confusion = sums(trainable, frozen, batch)
            loss += float(b_loss)
            correct += float(b_correct)
            confusion += np.rint(np.asarray(b_confusion)).astype(np.int64)
        result = {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}
        return result | ({"confusion": confusion} if num_classes else {})

    return evaluate


def frozen_features(model: nnx.Module, arrays: Mapping[str, np.ndarray], *,
                    forward: Forward = FullForward(), batch_size: int = 64, bucket: int = 32
                    ) -> np.ndarray:
    """The classifier head's input features with every adapter off: ``float32[N, hidden]``.

    These are the base model's features, used for the linear-probe baseline and for
    `peft_jax.train.head_init`. The parameters enter the jitted function as arguments.
    """
    missing = [k for k in forward.fields if k not in arrays]
    if missing:
        raise BatchError(f"feature extraction needs {list(forward.fields)}; missing {missing}")
    arrays = {k: arrays[k] for k in forward.fields}
    with peft_nnx.disabled(model):
        graphdef, state, static = nnx.split(model, nnx.Variable, ...)

    @jax.jit
    def run(state, batch):
        return forward.features(nnx.merge(graphdef, state, static), batch).astype(jnp.float32)

    n = len(arrays["attention_mask"])
    out = None
    for batch in sorted_eval_batches(arrays, batch_size, bucket=bucket):
        rows, valid = batch.pop("index"), batch.pop("valid")
        feats = np.asarray(run(state, batch))
        if out is None:
            out = np.zeros((n, feats.shape[-1]), np.float32)
        out[rows[valid]] = feats[valid]
    return out
