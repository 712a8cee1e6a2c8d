"""LLaMA-Adapter: zero-gated adaption prompts in the top layers (Zhang et al., 2023, arXiv:2303.16199;
HF PEFT's ``ADAPTION_PROMPT``).

Each of the top ``adapter_layers`` attention layers holds ``adapter_len`` trained hidden states
``P`` (``adaption_prompt``) and a scalar gate ``g`` (``adaption_gate``, zero at init). The layer's
own key and value projections turn ``P`` into keys and values (no RoPE, no mask), the queries
attend to them in a softmax of their own, and the gated result is added to the attention output::

    ak, av = project(P)                                   # [n, kv_heads, d]
    out = call(a) + g * softmax(q ak^T / sqrt(d)) av      # per head, before o_proj

As in HF PEFT (``AdaptedAttention.forward``):

* ``q`` is the layer's query after RoPE (HF recomputes it with the model's rotary embedding);
  the scale is ``1 / sqrt(head_dim)`` whatever the model's own attention scale.
* The softmax runs in float32 over the ``adapter_len`` keys only and is cast back to the query's
  dtype before the gate multiplies it; every query (padding rows too) sees all prompt keys.
* With grouped-query attention query head ``h`` reads prompt head ``h // (H / KV)`` (HF's
  ``repeat_interleave`` of the projected prompt by ``factor``).
* HF adds ``o_proj(adapter)`` to the attention module's output; this site adds the adapter to the
  heads before ``o_proj``, which is the same when ``o_proj`` has no bias (Llama, Mistral; HF adds
  a biased ``o_proj``'s bias a second time, which this does not copy).
* Only the top ``adapter_layers`` layers are adapted (HF's ``parents[-adapter_layers:]``); the
  config layer places the method where `AdaptionPrompt.applies_to` holds.

Param names match HF's: ``adaption_prompt`` ``(adapter_len, features)`` is HF's
``(1, adapter_len, hidden_size)`` without its leading 1, ``N(0, 1)`` at init; ``adaption_gate``
``(1,)``, zero, so the adapted model starts exactly as the base. The model's attention tap must
pass ``Attention(..., project=...)``: its own k/v projections (`MissingHookError` otherwise).
Not mergeable.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods.base import Attention, AttentionSite, Context
    >>> site = AttentionSite(path="attn", layer="AttentionTap", num_heads=4, num_kv_heads=2,
    ...                      head_dim=8, index=3, num_layers=4, features=32)
    >>> method = AdaptionPrompt(adapter_len=5, adapter_layers=2)
    >>> method.applies_to(site)
    True
    >>> params, _ = method.init(jax.random.key(0), site, {}, {})
    >>> sorted((k, v.shape) for k, v in params.items())
    [('adaption_gate', (1,)), ('adaption_prompt', (5, 32))]
    >>> project = lambda h: (h[..., :16].reshape(*h.shape[:-1], 2, 8),) * 2
    >>> a = Attention(jnp.ones((1, 3, 4, 8)), None, None, None, project=project)
    >>> out = method.apply(params, {}, site, lambda a: a.query, a, {}, Context())
    >>> bool(jnp.array_equal(out, a.query))  # the gate starts at zero
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import Attention, AttentionSite, Context, Method, Params
from peft_jax.methods.lora import check_positive_int

__all__ = ["AdaptionPrompt", "prompt_attention"]


def prompt_attention(query: jax.Array, key: jax.Array, value: jax.Array, gate: jax.Array) -> jax.Array:
    """``gate * softmax(q k^T / sqrt(d)) v`` of ``query`` ``[b, t, H, d]`` over prompt ``key`` /
    ``value`` ``[n, KV, d]`` (query head ``h`` reads head ``h // (H / KV)``); ``[b, t, H, d]``.

    Scores and softmax run in float32; the probabilities are cast to the query's dtype before
    the gate multiplies them (HF PEFT's order).

    Example:
        >>> import jax.numpy as jnp
        >>> q = jnp.ones((1, 2, 2, 4)); k = jnp.zeros((3, 1, 4)); v = jnp.ones((3, 1, 4))
        >>> prompt_attention(q, k, v, jnp.array([0.5]))[0, 0, :, 0].tolist()  # uniform weights
        [0.5, 0.5]
    """
    b, t, heads, d = query.shape
    kv_heads = key.shape[-2]
    q = query.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,nkd->bkgtn", q, key.astype(query.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    weights = gate.astype(query.dtype) * probs
    out = jnp.einsum("bkgtn,nkd->btkgd", weights, value.astype(query.dtype))
    return out.reshape(b, t, heads, d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptionPrompt(Method):
    """LLaMA-Adapter on the attention sites of the top ``adapter_layers`` layers.

    Args:
        adapter_len: ``n``, the prompt rows per layer (HF's ``adapter_len``).
        adapter_layers: how many layers from the top get a prompt (HF's ``adapter_layers``).

    Example:
        >>> from peft_jax.methods.base import AttentionSite
        >>> site = AttentionSite(path="a", layer="T", num_heads=2, num_kv_heads=2, head_dim=4,
        ...                      index=0, num_layers=2, features=8)
        >>> AdaptionPrompt(adapter_len=3, adapter_layers=1).applies_to(site)  # layer 0 of 2
        False
    """

    name: ClassVar[str] = "adaption_prompt"
    sites: ClassVar[tuple[str, ...]] = ("attention",)
    adapter_len: int
    adapter_layers: int

    def __post_init__(self) -> None:
        check_positive_int(self.adapter_len, "adapter_len")
        check_positive_int(self.adapter_layers, "adapter_layers")

    def applies_to(self, site) -> bool:
        """Whether ``site`` is one of the top ``adapter_layers`` layers (``index >= L - adapter_layers``).

        Example:
            >>> from peft_jax.methods.base import AttentionSite
            >>> sites = [AttentionSite(path=f"l{i}", layer="T", num_heads=1, num_kv_heads=1,
            ...                        head_dim=2, index=i, num_layers=4, features=2) for i in range(4)]
            >>> [AdaptionPrompt(adapter_len=1, adapter_layers=3).applies_to(s) for s in sites]
            [False, True, True, True]
        """
        return site.kind == "attention" and site.index >= site.num_layers - self.adapter_layers

    def check(self, site) -> None:
        """Typed errors before compile: the site kind, the layer count, the hidden width."""
        super().check(site)
        if self.adapter_layers > site.num_layers:
            raise errors.InvalidConfigError(
                f"AdaptionPrompt asks for {self.adapter_layers} adapter layers but the model has "
                f"{site.num_layers}; use adapter_layers <= {site.num_layers}")
        if not self.applies_to(site):
            raise errors.InvalidConfigError(
                f"AdaptionPrompt(adapter_layers={self.adapter_layers}) adapts the top layers only, "
                f"and {site.path!r} is layer {site.index} of {site.num_layers}; place it where "
                "AdaptionPrompt.applies_to(site) holds")
        if site.features <= 0:
            raise errors.InvalidConfigError(
                f"AdaptionPrompt on {site.path!r}: the attention tap does not give the hidden width "
                "(AttentionSite.features) its prompt needs; set features on the tap")
        if site.num_heads % site.num_kv_heads:
            raise errors.InvalidConfigError(
                f"AdaptionPrompt on {site.path!r}: {site.num_heads} query heads do not group over "
                f"{site.num_kv_heads} key/value heads")

    def init(self, key, site: AttentionSite, base: Params, shared: Params):
        """``adaption_prompt`` ``N(0, 1)`` ``(adapter_len, features)`` and ``adaption_gate`` ``0`` ``(1,)``."""
        return {"adaption_prompt": jax.random.normal(key, (self.adapter_len, site.features), jnp.float32),
                "adaption_gate": jnp.zeros((1,), jnp.float32)}, {}

    def param_shapes(self, site) -> Params:
        """``{"adaption_gate": (1,), "adaption_prompt": (adapter_len, features)}`` (nothing built)."""
        return {"adaption_gate": (1,), "adaption_prompt": (self.adapter_len, site.features)}

    def apply(self, params, shared, site: AttentionSite, call, a: Attention, base, ctx: Context):
        """``call(a) + gate * softmax(q ak^T / sqrt(d)) av`` with ``(ak, av) = a.project(prompt)``."""
        if a.project is None:
            raise errors.MissingHookError(
                f"AdaptionPrompt on {site.path!r} needs the layer's own key/value projections: the "
                "model's attention tap must pass Attention(q, k, v, mask, project=<hidden [b, n, "
                "features] -> (key, value) [b, n, kv_heads, head_dim], without RoPE>)")
        out = call(a)
        dtype = (a.hidden if a.hidden is not None else a.query).dtype
        prompt = params["adaption_prompt"].astype(dtype)[None]
        ak, av = a.project(prompt)
        adapter = prompt_attention(a.query, ak[0], av[0], params["adaption_gate"])
        return out + adapter.astype(out.dtype)
