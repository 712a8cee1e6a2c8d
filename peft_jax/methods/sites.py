"""The site kinds a method attaches to, and the tuples the calls at a tap take.

Linear and module sites are found on any model. The other three are *taps* a model author
places (`peft_jax.hooks`): inert calls that return their input's usual result until a method
is attached. Each tap's call takes one NamedTuple, so a method rewrites fields and calls on:

* `Residual` at a `ResidualSite`: ``call(r)`` is ``r.norm(r.residual + r.output)`` (post-LN,
  BERT) or ``r.residual + r.output`` (pre-LN, ``norm=None``).
* `Inputs` at an `InputSite`: ``call(i)`` returns ``i`` (the model goes on with the fields);
  prompt tuning returns ``call(i._replace(embeds=[P; e], mask=[1; m]))``.
* `Attention` at an `AttentionSite`: ``call(a)`` is the model's attention of ``a.query`` over
  ``a.key`` / ``a.value`` under ``a.mask``; prefix tuning prepends rows to key, value and mask.

Example:
    >>> import jax.numpy as jnp
    >>> r = Residual(output=jnp.ones(2), residual=jnp.ones(2))
    >>> r.combine().tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import jax

from peft_jax.ops import LinearOp


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """A layer that computes ``op(x, kernel) (+ bias)``: what a weight method may rely on."""

    path: str
    op: LinearOp
    layer: str
    has_bias: bool
    kind: ClassVar[str] = "linear"


@dataclasses.dataclass(frozen=True)
class ModuleSite:
    """Any module: its path, class name and the shapes of its own params (a nested dict).

    A method may replace the module's params (LayerNorm tuning) or wrap its output (a
    bottleneck adapter on a user's own sub-layer: ``call(x) + f(call(x))``).
    """

    path: str
    layer: str
    param_shapes: Mapping[str, Any]
    op: LinearOp | None = None
    kind: ClassVar[str] = "module"


@dataclasses.dataclass(frozen=True)
class ResidualSite:
    """Where a sub-layer's output meets the residual stream (a `peft_jax.hooks` residual tap).

    Attributes:
        features: the hidden width ``d``.
        role: which sub-layer feeds it: ``"attention"`` or ``"ffn"``.
        index: the transformer block (0-based) it belongs to.
    """

    path: str
    layer: str
    features: int
    role: str
    index: int = 0
    kind: ClassVar[str] = "residual"


@dataclasses.dataclass(frozen=True)
class InputSite:
    """The model's inputs (an input tap): token embeddings ``[batch, seq, features]`` and mask.

    Attributes:
        features: the embedding width.
        vocab_size: rows of the word-embedding table (the site's ``base["embedding"]``).
        max_positions: the most tokens the model can take (``None``: no limit, e.g. RoPE).
        embed_path: the word-embedding module's path from the root (its table is the site's
            ``base`` when a method initializes, e.g. from vocabulary rows).
    """

    path: str
    layer: str
    features: int
    vocab_size: int
    max_positions: int | None = None
    embed_path: str | None = None
    kind: ClassVar[str] = "inputs"


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """An attention tap of block ``index`` of ``num_layers``; layouts ``[batch, seq, heads, dim]``."""

    path: str
    layer: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    index: int = 0
    num_layers: int = 1
    features: int = 0
    kind: ClassVar[str] = "attention"


Site = LinearSite | ModuleSite | ResidualSite | InputSite | AttentionSite


class Residual(NamedTuple):
    """A residual tap's call: the sub-layer ``output`` (after its projection and dropout), the
    ``residual`` stream it adds to, and the post-sum ``norm`` (``None`` in pre-LN models)."""

    output: jax.Array
    residual: jax.Array
    norm: Callable[[jax.Array], jax.Array] | None = None

    def combine(self) -> jax.Array:
        """What the model computes without adapters: ``norm(residual + output)``."""
        total = self.residual + self.output
        return total if self.norm is None else self.norm(total)


class Inputs(NamedTuple):
    """An input tap's call: ``embeds`` ``[batch, seq, d]``, ``mask`` ``[batch, seq]`` (bool).

    ``fresh`` is static: ``False`` on decoding steps after a cached prefill, whose virtual
    tokens are already in the cache (so input methods must not prepend them again).
    ``offset`` is static too: virtual tokens that precede these inputs without being part of
    them (prefix tuning's keys and values, as HF PEFT counts them); the model starts its
    positions after them.
    """

    embeds: jax.Array
    mask: jax.Array
    fresh: bool = True
    offset: int = 0


class Attention(NamedTuple):
    """An attention tap's call: ``query`` ``[b, t, heads, d]``; ``key`` / ``value``
    ``[b, s, kv_heads, d]`` (RoPE applied, cache included); ``mask`` bool ``[b, t|1, s]``.

    ``hidden`` is the block's normalized input ``[b, t, features]`` and ``project`` maps hidden
    states ``[b, n, features]`` to ``(key, value)`` ``[b, n, kv_heads, d]`` through the layer's
    own projections, without RoPE (LLaMA-Adapter's adaption prompts use them); either may be
    ``None`` when the model does not offer it.
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    mask: jax.Array
    hidden: jax.Array | None = None
    project: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None
