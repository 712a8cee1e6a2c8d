"""The NNX taps: inert calls a model author places, which front-ends adapt by site kind.

Each tap has no params; ``tap_site(tap, path)`` turns it into the `Site` that methods see.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods.sites import Inputs
    >>> tap = InputTap(features=4, vocab_size=10, embed_path="embed")
    >>> tap(Inputs(jnp.ones((1, 3, 4)), jnp.ones((1, 3), bool))).embeds.shape
    (1, 3, 4)
    >>> tap_site(tap, "input_tap").kind
    'inputs'
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from peft_jax.methods.sites import (
    Attention,
    AttentionSite,
    Inputs,
    InputSite,
    Residual,
    ResidualSite,
    Site,
)


class ResidualTap(nnx.Module):
    """``tap(Residual(output, residual, norm))`` -> ``norm(residual + output)``.

    Args:
        features: the hidden width.
        role: ``"attention"`` or ``"ffn"``: the sub-layer whose output arrives here.
        index: the block this tap belongs to.
    """

    def __init__(self, features: int, *, role: str, index: int = 0):
        self.features, self.role, self.index = features, role, index

    def __call__(self, r: Residual) -> jax.Array:
        return r.combine()


class InputTap(nnx.Module):
    """``tap(Inputs(embeds, mask))`` -> the inputs the model goes on with (unchanged here).

    Args:
        features: the embedding width.
        vocab_size: rows of the word-embedding table.
        embed_path: that table's module path from the module holding the tap (e.g.
            ``"embed_tokens"``), for methods that initialize from vocabulary rows.
        max_positions: the most tokens the model takes (``None`` when unbounded).
    """

    def __init__(self, *, features: int, vocab_size: int, embed_path: str,
                 max_positions: int | None = None):
        self.features, self.vocab_size = features, vocab_size
        self.embed_path, self.max_positions = embed_path, max_positions

    def __call__(self, inputs: Inputs) -> Inputs:
        return inputs


class AttentionTap(nnx.Module):
    """``tap(Attention(q, k, v, mask), attend)`` -> ``attend(Attention(...))``.

    Args:
        num_heads, num_kv_heads, head_dim: the attention's shape.
        index, num_layers: which block of how many (prefix tuning keeps per-layer prefixes).
        features: the model width (LLaMA-Adapter's prompts live there).
    """

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, index: int = 0,
                 num_layers: int = 1, features: int = 0):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.index, self.num_layers, self.features = index, num_layers, features

    def __call__(self, a: Attention, attend: Callable[[Attention], jax.Array]) -> jax.Array:
        return attend(a)


def tap_site(tap: Any, path: str) -> Site | None:
    """The site of a tap (NNX or Linen, read by its attributes), or ``None`` for other modules."""
    kind = getattr(type(tap), "tap_kind", None)
    layer = type(tap).__name__
    if kind == "residual":
        return ResidualSite(path=path, layer=layer, features=tap.features, role=tap.role,
                            index=tap.index)
    if kind == "inputs":
        holder = path.rpartition("/")[0]
        embed = f"{holder}/{tap.embed_path}" if holder else tap.embed_path
        return InputSite(path=path, layer=layer, features=tap.features, vocab_size=tap.vocab_size,
                         max_positions=tap.max_positions, embed_path=embed)
    if kind == "attention":
        return AttentionSite(path=path, layer=layer, num_heads=tap.num_heads,
                             num_kv_heads=tap.num_kv_heads, head_dim=tap.head_dim,
                             index=tap.index, num_layers=tap.num_layers, features=tap.features)
    return None


ResidualTap.tap_kind = "residual"
InputTap.tap_kind = "inputs"
AttentionTap.tap_kind = "attention"


def strip_virtual(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """``x`` without its first ``n`` entries along ``axis`` (the virtual tokens a tap added)."""
    return x if n == 0 else jax.lax.slice_in_dim(x, n, x.shape[axis], axis=axis)
