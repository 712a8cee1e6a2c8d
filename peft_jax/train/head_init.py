"""A classifier head fit on frozen features: the "linear probe" half of LP-FT.

Starting fine-tuning from a head fit on the frozen model's features (Kumar et al., 2022,
"Fine-Tuning can Distort Pretrained Features", arXiv:2202.10054) keeps the first updates from
being driven by a random head. The logistic regression runs on standardised features; the
standardisation is folded back into the returned kernel and bias, so they apply to the raw
features the model's classifier sees.

Example:
    >>> import numpy as np
    >>> x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]], np.float32)
    >>> kernel, bias = fit_linear_head(x, np.array([0, 1, 0, 1]), num_classes=2)
    >>> (x @ kernel + bias).argmax(1).tolist()
    [0, 1, 0, 1]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.errors import BatchError

__all__ = ["fit_linear_head"]


def fit_linear_head(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                    l2: float = 1e-3, steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (L-BFGS, L2 on the standardised weights).

    Args:
        features: ``float[N, D]`` raw features (e.g. mean-pooled hidden states).
        labels: ``int[N]`` in ``0..num_classes-1``.
        num_classes: number of classes.
        l2: L2 strength.
        steps: L-BFGS iterations.

    Returns:
        ``(kernel float32[D, C], bias float32[C])`` with ``logits = features @ kernel + bias``.

    Raises:
        BatchError: features and labels disagree in length, or a label is out of range.
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int32)
    if x.ndim != 2 or len(x) != len(y):
        raise BatchError(f"features {x.shape} and labels {y.shape} do not match")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise BatchError(f"labels must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    w, b = _lbfgs(jnp.asarray((x - mean) / std), jnp.asarray(y), num_classes, jnp.float32(l2),
                  steps)
    w, b = np.asarray(w), np.asarray(b)
    kernel = w / std[:, None]
    bias = b - (mean / std) @ w
    return kernel.astype(np.float32), bias.astype(np.float32)


@jax.jit(static_argnums=(2, 4))
def _lbfgs(x, y, num_classes: int, l2, steps: int):
    params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
              jnp.zeros((num_classes,), jnp.float32))

    def loss(p):
        w, b = p
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()
        return ce + 0.5 * l2 * jnp.sum(w * w)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params
