"""An input tap for models that take HF's ``inputs_embeds=`` / ``attention_mask=`` as they are.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft_jax
    >>> class Net(nnx.Module):  # a model written with no PEFT in mind
    ...     def __init__(self, rngs):
    ...         self.embed, self.out = nnx.Embed(10, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
    ...     def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None):
    ...         h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    ...         return self.out(h * attention_mask[..., None].astype(h.dtype))
    >>> model = WithInputTap(Net(nnx.Rngs(0)), embed_path="embed", features=4, vocab_size=10)
    >>> _ = peft_jax.nnx.attach(model, peft_jax.prompt_tuning(3), rngs=nnx.Rngs(1))
    >>> model(jnp.array([[1, 2]])).shape  # the 3 virtual positions are stripped
    (1, 2, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.hooks.taps import InputTap, strip_virtual
from peft_jax.methods.sites import Inputs


class WithInputTap(nnx.Module):
    """Wraps ``model`` (called as ``model(inputs_embeds=..., attention_mask=..., **kw)``) with
    an `InputTap`, so input methods (prompt / P-tuning) attach without editing it.

    The wrapper embeds ``input_ids`` with the model's own ``embed_path`` module, passes the
    tap's embeddings and mask on, and strips the virtual positions from every output array of
    rank 3 or more (``[batch, seq, ...]``: logits, hidden states) whose axis 1 has the prompted
    length; other outputs (pooled ``[batch, d]``) pass through. Positions are the model's business: it sees the
    prompted sequence as its input.

    Args:
        model: the model; its params live under ``model/`` in the wrapper.
        embed_path: the word-embedding module's path inside ``model``.
        features, vocab_size, max_positions: as for `InputTap`.
    """

    def __init__(self, model: nnx.Module, *, embed_path: str, features: int, vocab_size: int,
                 max_positions: int | None = None):
        self.model = model
        self.embed_path = embed_path
        self.input_tap = InputTap(features=features, vocab_size=vocab_size,
                                  embed_path=f"model/{embed_path}", max_positions=max_positions)

    def _embed(self) -> Any:
        module = self.model
        for part in self.embed_path.split("/"):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        return module

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kwargs: Any):
        t = input_ids.shape[1]
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        inputs = self.input_tap(Inputs(self._embed()(input_ids), mask))
        virtual = inputs.embeds.shape[1] - t
        out = self.model(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, **kwargs)
        if not virtual:
            return out
        return jax.tree.map(lambda a: strip_virtual(a, virtual)
                            if getattr(a, "ndim", 0) >= 3 and a.shape[1] == t + virtual else a, out)
