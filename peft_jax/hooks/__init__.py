"""Hooks a model author places so input, attention and residual methods can reach inside.

Linear layers and whole modules need nothing: any Flax model takes LoRA or a bottleneck
adapter on a sub-layer's output. Prompt tuning, prefix tuning, LLaMA-Adapter and the
AdapterHub placements of bottleneck adapters need a *tap*: an inert call that returns its
usual result until a method is attached (like ``nnx`` ``sow`` / ``perturb``).

* `InputTap` after the word embeddings: ``embeds, mask = tap(Inputs(embeds, mask))``.
* `AttentionTap` around the attention math: ``out = tap(Attention(q, k, v, mask), attend)``.
* `ResidualTap` where a sub-layer's output meets the residual stream:
  ``h = tap(Residual(y, x, norm))`` (``norm(x + y)``, or ``x + y`` in pre-LN models).

A model that takes HF's ``inputs_embeds=`` / ``attention_mask=`` gets an input tap without
edits: ``WithInputTap(model, embed_path="embed_tokens", ...)``.

The NNX taps are here; `peft_jax.hooks.linen` has the same three for Linen. `Roles` names the
parts of a model (attention, ffn, embed, layers) for configs that place methods by role.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods.sites import Residual
    >>> tap = ResidualTap(4, role="ffn")
    >>> tap(Residual(jnp.ones((1, 4)), jnp.ones((1, 4)))).tolist()
    [[2.0, 2.0, 2.0, 2.0]]
"""

from peft_jax.hooks.roles import Roles
from peft_jax.hooks.taps import AttentionTap, InputTap, ResidualTap, strip_virtual, tap_site
from peft_jax.hooks.wrap import WithInputTap

__all__ = ["AttentionTap", "InputTap", "ResidualTap", "Roles", "WithInputTap", "strip_virtual",
           "tap_site"]
