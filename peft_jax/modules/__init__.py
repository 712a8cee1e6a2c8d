"""PEFT methods as Flax modules: layers a user writes into their own model definition.

`peft_jax.modules.nnx` (``LoraLinear``, ``BottleneckAdapter``, ``adapt``) and
`peft_jax.modules.linen` (``LoraDense``, ``BottleneckAdapter``, ``handle``) build on the same
method math (`peft_jax.methods`) and give the same variable layout as attaching the method to an
equivalent model with `peft_jax.nnx.attach` / `peft_jax.linen.attach`, so adapter files,
checkpoints, `merge` and `adapter_state` treat both alike.

Example:
    >>> lora_method(rank=4, alpha=8.0)
    Lora(rank=4, alpha=8.0, dropout=0.0, use_rslora=False, init_weights=KaimingUniform(), lora_bias=False)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peft_jax.methods.base import Method
from peft_jax.methods.bottleneck import Bottleneck
from peft_jax.methods.dora import Dora
from peft_jax.methods.initializers import KaimingUniform
from peft_jax.methods.lora import Lora


def lora_method(*, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
                use_dora: bool = False, init_weights: Any = KaimingUniform(), lora_bias: bool = False) -> Method:
    """The `Lora` (or `Dora` on it) that ``LoraLinear`` / ``LoraDense`` carry: the value
    ``LoraConfig(rank=..., alpha=..., use_dora=...)`` places on each of its targets.

    Example:
        >>> lora_method(rank=4, alpha=8.0, use_dora=True).lora.scale
        2.0
    """
    lora = Lora(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init_weights=init_weights,
                lora_bias=lora_bias)
    return Dora(lora=lora) if use_dora else lora


def module_form(method: Method, features: int) -> Method:
    """``method`` as it runs on a plain hidden state of width ``features`` (an identity
    module site: a `Bottleneck` learns the width it cannot read off the layer).

    Example:
        >>> from peft_jax.methods import seq_bn
        >>> module_form(seq_bn(), 16).features
        16
    """
    if isinstance(method, Bottleneck) and method.features is None:
        return dataclasses.replace(method, features=features)
    return method


# The front-end modules import the helpers above, so they load last.
from peft_jax.modules import linen, nnx  # noqa: E402

__all__ = ["linen", "lora_method", "module_form", "nnx"]
