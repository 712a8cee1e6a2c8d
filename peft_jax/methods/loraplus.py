"""LoRA+: a larger learning rate for ``B`` than for ``A`` (Hayou et al., 2024, arXiv:2402.12354).

Example:
    >>> import optax, jax.numpy as jnp
    >>> tx = loraplus(optax.adamw, learning_rate=1e-4, ratio=16.0)
    >>> lora_b_labels({"q": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 4))}})
    {'q': {'lora_a': 'other', 'lora_b': 'lora_b'}}
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from peft_jax.core.paths import map_with_path


def lora_b_labels(params: Any) -> Any:
    """Labels each leaf ``"lora_b"`` when its path contains a ``lora_b`` component, else ``"other"``."""
    return map_with_path(lambda path, _: "lora_b" if "lora_b" in path.split("/") else "other", params)


def loraplus(optimizer: Callable[..., optax.GradientTransformation], *, learning_rate: Any,
             ratio: float = 16.0, **kwargs: Any) -> optax.GradientTransformation:
    """Builds ``optimizer`` twice: ``B`` leaves get ``ratio * learning_rate``, the rest ``learning_rate``.

    ``learning_rate`` may be a float or an optax schedule (scaled by ``ratio`` for ``B``).
    """
    b_rate = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate
    return optax.multi_transform(
        {"lora_b": optimizer(learning_rate=b_rate, **kwargs),
         "other": optimizer(learning_rate=learning_rate, **kwargs)},
        lora_b_labels)
