"""Frozen-feature baselines: encoder features for texts, and a linear-probe accuracy.

``peft-jax train`` reports the linear probe next to the tuned model: a multinomial logistic
regression (L-BFGS, L2 picked on a held-out fifth of the training set) on frozen mean-pooled,
L2-normalised encoder features.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 5)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
    >>> linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peft_jax.errors import BatchError

__all__ = ["L2_GRID", "encode_features", "linear_probe_accuracy", "majority_accuracy"]

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def majority_accuracy(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Test accuracy of always predicting the most frequent training label.

    Example:
      >>> majority_accuracy([1, 1, 0], [1, 0])
      0.5
    """
    majority = np.bincount(np.asarray(train_labels)).argmax()
    return float(np.mean(np.asarray(test_labels) == majority))


def encode_features(model: nnx.Module, tokenizer: Any, texts: Sequence[str], *,
                    batch_size: int = 64, max_length: int = 128, bucket: int = 16,
                    normalize: bool = True) -> np.ndarray:
    """Mean-pooled (sentence-transformers style) features of ``texts`` from a frozen encoder.

    Texts are sorted by length and each batch is padded only to its longest text (rounded up to
    a multiple of ``bucket``, so few shapes compile). Parameters are passed to the jitted
    function as an argument, never closed over.

    Args:
      model: a :class:`peft_jax.models.Encoder` (or a classifier; its backbone is used).
      tokenizer: a :class:`peft_jax.models.TextTokenizer`.
      texts: the strings.
      batch_size: texts per forward pass.
      max_length: truncation length.
      bucket: padded lengths are multiples of this.
      normalize: L2-normalise each feature vector.

    Returns:
      ``float32[len(texts), hidden]`` in the order of ``texts``.
    """
    from peft_jax.models.encoder import pool  # noqa: PLC0415 (keeps data importable alone)

    encoder = getattr(model, "backbone", model)
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def forward(state, ids, mask):
        h = nnx.merge(graphdef, state)(ids, mask).last_hidden_state
        e = pool(h, mask, "mean").astype(jnp.float32)
        if normalize:
            e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        return e

    enc = tokenizer.encode(list(texts), max_length=max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(axis=1)
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((len(texts), encoder.config.hidden_size), np.float32)
    for start in range(0, len(texts), batch_size):
        take = order[start:start + batch_size]
        width = int(min(max_length, -(-max(int(lengths[take].max()), 1) // bucket) * bucket))
        pad_rows = batch_size - len(take)  # keep one batch shape per width
        b_ids = np.pad(ids[take, :width], ((0, pad_rows), (0, 0)))
        b_mask = np.pad(mask[take, :width], ((0, pad_rows), (0, 0)))
        feats = forward(state, jnp.asarray(b_ids), jnp.asarray(b_mask))
        out[take] = np.asarray(feats)[: len(take)]
    return out


def linear_probe_accuracy(train_feats: np.ndarray, train_labels: np.ndarray,
                          test_feats: np.ndarray, test_labels: np.ndarray, *,
                          l2: float | None = None, steps: int = 200, seed: int = 0) -> float:
    """Test accuracy of a logistic regression fit on frozen features.

    Features are standardised with training statistics. With ``l2=None`` the L2 strength is
    chosen from :data:`L2_GRID` by accuracy on a seeded held-out 20% of the training set, then
    the model is refit on all training data.

    Args:
      train_feats: ``float[N, D]``.
      train_labels: ``int[N]`` in ``0..C-1``.
      test_feats: ``float[M, D]``.
      test_labels: ``int[M]``.
      l2: L2 strength on the weights; ``None`` selects it.
      steps: L-BFGS iterations.
      seed: seeds the held-out split.

    Returns:
      Accuracy on the test set, in [0, 1].

    Raises:
      BatchError: mismatched lengths or feature widths.

    Example:
      >>> x = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
      >>> linear_probe_accuracy(x, np.array([0, 0, 1, 1]), x, np.array([0, 0, 1, 1]), l2=1e-3)
      1.0
    """
    xtr, ytr = np.asarray(train_feats, np.float32), np.asarray(train_labels, np.int32)
    xte, yte = np.asarray(test_feats, np.float32), np.asarray(test_labels, np.int32)
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1:] != xte.shape[1:]:
        raise BatchError(f"probe inputs disagree: train {xtr.shape}/{ytr.shape}, "
                         f"test {xte.shape}/{yte.shape}")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if l2 is None:  # pick l2 on a held-out fifth: zero weights there, one compiled fit
        held_out = np.zeros(len(xtr), bool)
        held_out[np.random.default_rng(seed).permutation(len(xtr))[: len(xtr) // 5]] = True
        x, _ = _standardize(xtr, xtr[~held_out])
        weight = jnp.asarray(~held_out, jnp.float32)
        scores = []
        for c in L2_GRID:
            w, b = _fit(jnp.asarray(x), jnp.asarray(ytr), weight, jnp.float32(c), num_classes,
                        steps)
            pred = np.asarray(jnp.asarray(x[held_out]) @ w + b).argmax(-1)
            scores.append(float(np.mean(pred == ytr[held_out])))
        l2 = L2_GRID[int(np.argmax(scores))]
    x, (mean, std) = _standardize(xtr, xtr)
    w, b = _fit(jnp.asarray(x), jnp.asarray(ytr), jnp.ones(len(x), jnp.float32),
                jnp.float32(l2), num_classes, steps)
    pred = np.asarray(jnp.asarray((xte - mean) / std) @ w + b).argmax(axis=1)
    return float(np.mean(pred == yte))


def _standardize(x: np.ndarray, ref: np.ndarray):
    mean, std = ref.mean(axis=0), ref.std(axis=0) + 1e-6
    return (x - mean) / std, (mean, std)


@jax.jit(static_argnums=(4, 5))
def _fit(x, y, weight, l2, num_classes: int, steps: int, tol: float = 1e-5):
    """Weighted L2 logistic regression by L-BFGS until ``|grad| < tol`` or ``steps``."""
    params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
              jnp.zeros((num_classes,), jnp.float32))

    def loss(p):
        w, b = p
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)
        return jnp.sum(ce * weight) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(w * w)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, s, _ = carry
        value, grad = value_and_grad(p, state=s)
        updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), s, optax.tree.norm(grad)

    def running(carry):
        _, s, grad_norm = carry
        return (optax.tree.get(s, "count") < steps) & (grad_norm >= tol)

    init = (params, opt.init(params), jnp.asarray(jnp.inf, jnp.float32))
    params, _, _ = jax.lax.while_loop(running, step, init)
    return params
