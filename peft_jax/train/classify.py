"""Sequence classification: the loss of a classifier model and its evaluation over a test set.

The model is any NNX module called as ``model(input_ids, attention_mask, token_type_ids,
dropout_rng=...) -> logits[B, C]`` (e.g. `peft_jax.models.EncoderForSequenceClassification`).

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

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.errors import BatchError
from peft_jax.train.buckets import sorted_eval_batches
from peft_jax.train.parts import ModelParts

__all__ = ["REQUIRED_FIELDS", "classification_loss", "make_classification_eval"]

REQUIRED_FIELDS = ("input_ids", "attention_mask", "labels")


def _check(batch: Mapping[str, Any]) -> None:
    missing = [k for k in REQUIRED_FIELDS if k not in batch]
    if missing:
        raise BatchError(
            f"the batch lacks {missing} (it has {sorted(batch)}); a classification batch needs "
            f"{list(REQUIRED_FIELDS)}, e.g. from peft_jax.data.tokenize_examples")


def _logits(model: Any, batch: Mapping[str, Any]) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                 dropout_rng=batch.get("dropout_rng")).astype(jnp.float32)


def classification_loss(model: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy and accuracy of a batch, as ``(loss, {"accuracy": acc})``.

    A ``"dropout_rng"`` entry (added per step by `peft_jax.train.fit`) turns the model's dropout on.

    Raises:
        BatchError: a required field is missing (raised while tracing, before any compile).
    """
    _check(batch)
    logits = _logits(model, batch)
    labels = batch["labels"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, {"accuracy": accuracy}


def make_classification_eval(parts: ModelParts, frozen: Any, arrays: Mapping[str, np.ndarray],
                             *, batch_size: int = 64, bucket: int = 32
                             ) -> Callable[[Any], dict[str, float]]:
    """Builds ``evaluate(trainable) -> {"loss", "accuracy"}`` over every example of ``arrays``.

    Examples are sorted by length and batched with `sorted_eval_batches`; the forward pass is
    jitted with the parameters as arguments (no dropout).

    Args:
        parts: the model's `ModelParts`.
        frozen: the frozen state to evaluate with.
        arrays: ``input_ids``, ``attention_mask``, ``labels`` (``int[N, L]`` / ``int[N]``).
        batch_size: examples per forward pass.
        bucket: padded widths are multiples of this.

    Raises:
        BatchError: a required field is missing.
    """
    _check(arrays)
    count = len(arrays["labels"])

    @jax.jit
    def sums(trainable, frozen, batch):
        logits = _logits(parts.merge(trainable, frozen), batch)
        weight = batch["valid"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return jnp.sum(ce * weight), jnp.sum(correct * weight)

    def evaluate(trainable: Any) -> dict[str, float]:
        loss, correct = 0.0, 0.0
        for batch in sorted_eval_batches(arrays, batch_size, bucket=bucket):
            batch.pop("index")
            b_loss, b_correct = sums(trainable, frozen, batch)
            loss += float(b_loss)
            correct += float(b_correct)
        return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}

    return evaluate
