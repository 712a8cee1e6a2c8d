"""Gated LoRA: UniPELT's LoRA, whose update is scaled by a learned, input-dependent gate
(Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning", arXiv:2110.07577; AdapterHub's ``LoRAConfig(use_gating=True)``).

On a linear site with input ``x`` ``[batch, seq, *in]``::

    y = call(x) + g * ((x A) B)          g = mean_seq sigmoid(x W_g + b_g)   [batch, G]

The gate **replaces** LoRA's ``alpha / rank`` scaling (AdapterHub ``LoRA.forward``: with gating
``alpha`` is never read). ``A`` and ``B`` are `Lora`'s factors and start as its initializer
makes them; the gate ``W_g`` ``(*in, G)`` starts at ``N(0, 0.02)`` and ``b_g`` ``(G,)`` at torch's
``nn.Linear`` default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as AdapterHub's
``nn.Linear(in, gating_heads)`` with ``weight.normal_(std=0.02)``. The gate reads the layer
input itself; LoRA's ``dropout`` only hits the low-rank path (AdapterHub does the same).

* **The mean** runs over axis 1 of the input (the sequence), padding included, as AdapterHub's
  ``torch.mean(gate, dim=1)``. On a decoding step with a KV cache it covers that step's tokens
  only (AdapterHub has the same behaviour: the gate is computed per forward call).
* **Inputs without a sequence axis.** A layer called on 2-D rows (``[tokens, in]``; the reference
  decoder flattens tokens to rows before its projections) gives no sequence to average over: the
  call raises `UnsupportedLayerError` at trace time, naming the layer. Target layers that see
  ``[batch, seq, ...]`` (the reference encoder's, a user's own) or use `Lora` there.
* **gating_heads** ``G > 1``: the output features (flattened, ``fan_out``) split into ``G``
  contiguous blocks of ``fan_out / G``, block ``j`` scaled by ``g[:, j]``. This is AdapterHub's
  handling in ``LoRAMergedLinear`` (a fused ``q|k|v`` projection, one gate per matrix:
  ``gate.repeat_interleave(out_features // 3)``); AdapterHub's plain ``LoRALinear`` always
  uses one head. ``G`` must divide ``fan_out``.
* **Not mergeable**: the gate depends on the input, so no fixed kernel reproduces it
  (`merge` raises `NotMergeableError`, as AdapterHub's ``merge_adapter`` raises ValueError).

Layers: Dense / Linear / DenseGeneral / LinearGeneral (`peft_jax.ops.ContractionOp`) whose
contracted input axes are the trailing ones; convolutions, embeddings and einsum kernels raise
`UnsupportedLayerError` before compile. rsLoRA, ``lora_bias`` and the PiSSA / OLoRA inits (which
rewrite the base kernel assuming the fixed scale) are rejected with `InvalidConfigError`.

Params: ``lora_a`` ``(*in, r)``, ``lora_b`` ``(r, *out)`` and ``lora_gate`` ``{"kernel": (*in, G),
"bias": (G,)}`` (AdapterHub: ``loras.<name>.lora_A`` ``(r, in)`` = ``lora_a.T``, ``lora_B``
``(out, r)`` = ``lora_b.T``, ``gate.weight`` ``(G, in)`` = ``kernel.T``, ``gate.bias``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.ops import dense_op
    >>> from peft_jax.methods.base import Context, LinearSite
    >>> site = LinearSite(path="q", op=dense_op(4, 6), layer="Linear", has_bias=False)
    >>> method = GatedLora(lora=Lora(rank=2), gating_heads=2)
    >>> dict(sorted(method.param_shapes(site).items()))
    {'lora_a': (4, 2), 'lora_b': (2, 6), 'lora_gate': {'bias': (2,), 'kernel': (4, 2)}}
    >>> base = {"kernel": jnp.ones((4, 6))}
    >>> params, _ = method.init(jax.random.key(0), site, base, {})
    >>> x = jnp.ones((2, 3, 4))
    >>> y = method.apply(params, {}, site, lambda x: x @ base["kernel"], x, base, Context())
    >>> bool(jnp.array_equal(y, x @ base["kernel"]))  # B starts at zero
    True
    >>> method.gate(params, site, x).shape  # [batch, G]
    (2, 2)
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import LinearSite, Method, Params
from peft_jax.methods.initializers import OLoRA, PiSSA
from peft_jax.methods.lora import Lora, check_positive_int, low_rank
from peft_jax.ops import ContractionOp

__all__ = ["GatedLora"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedLora(Method):
    """LoRA whose update is scaled by ``g = mean_seq sigmoid(x W_g + b_g)`` instead of ``alpha / r``.

    Args:
        lora: the factors' settings (``rank``, ``dropout``, ``init_weights``); its ``alpha`` is
            not used (the gate replaces the scale, as in AdapterHub).
        gating_heads: ``G``, the gate's outputs; each scales one contiguous block of
            ``fan_out / G`` output features.

    Example:
        >>> GatedLora(lora=Lora(rank=4)).gating_heads
        1
        >>> try:
        ...     GatedLora(lora=Lora(rank=4, use_rslora=True))
        ... except errors.InvalidConfigError as e:
        ...     print(str(e)[:40])
        GatedLora replaces LoRA's scale by its g
    """

    name: ClassVar[str] = "gated_lora"
    sites: ClassVar[tuple[str, ...]] = ("linear",)
    lora: Lora = Lora()
    gating_heads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.lora, Lora):
            raise errors.InvalidConfigError(f"GatedLora needs lora=Lora(...), got {self.lora!r}")
        check_positive_int(self.gating_heads, "gating_heads")
        if self.lora.use_rslora:
            raise errors.InvalidConfigError(
                "GatedLora replaces LoRA's scale by its gate, so use_rslora (which only changes "
                "the scale) has no effect; drop it")
        if self.lora.lora_bias:
            raise errors.InvalidConfigError(
                "GatedLora does not support lora_bias (nor does AdapterHub's gated LoRA)")
        if isinstance(self.lora.init_weights, (PiSSA, OLoRA)):
            raise errors.InvalidConfigError(
                f"{type(self.lora.init_weights).__name__} init moves scale * A @ B out of the base "
                "kernel, which a gated LoRA (no fixed scale) cannot undo; use KaimingUniform() or "
                "Gaussian()")

    @property
    def needs_rng(self) -> bool:
        return self.lora.needs_rng

    # -- before anything is built ------------------------------------------------------------
    def check(self, site) -> None:
        """Typed errors before compile: the site kind and layer type, ``G`` against ``fan_out``."""
        super().check(site)
        if not isinstance(site.op, ContractionOp):
            raise errors.UnsupportedLayerError(
                f"GatedLora cannot adapt {site.path!r} ({site.layer}): its gate averages "
                "[batch, seq, features] inputs of a Dense / Linear / DenseGeneral layer; use Lora "
                "there or leave the layer out")
        if site.op.fan_out % self.gating_heads:
            raise errors.InvalidConfigError(
                f"GatedLora gating_heads={self.gating_heads} on {site.path!r} must divide the "
                f"layer's {site.op.fan_out} output features (one block of outputs per head)")
        self.lora.check(site)

    # -- state ------------------------------------------------------------------------------------
    def init(self, key, site: LinearSite, base: Params, shared: Params):
        """`Lora`'s factors plus ``lora_gate`` (``N(0, 0.02)`` kernel, torch-default bias)."""
        k_lora, k_gate, k_bias = jax.random.split(key, 3)
        params, updates = self.lora.init(k_lora, site, base, shared)
        if updates:
            raise errors.InvalidConfigError(
                f"GatedLora on {site.path!r}: the initializer {self.lora.init_weights!r} rewrites "
                "the base kernel, which a gated LoRA cannot compensate; use KaimingUniform()")
        op, dtype = site.op, base["kernel"].dtype
        bound = 1.0 / math.sqrt(op.fan_in)
        g = self.gating_heads
        params["lora_gate"] = {
            "kernel": (0.02 * jax.random.normal(k_gate, op.a_shape(g), jnp.float32)).astype(dtype),
            "bias": jax.random.uniform(k_bias, (g,), jnp.float32, -bound, bound).astype(dtype)}
        return params, {}

    # -- running ----------------------------------------------------------------------------------
    def _lead(self, site: LinearSite, x: jax.Array) -> int:
        """The number of leading (non-contracted) input axes; raises unless ``>= 2``."""
        axes = sorted(ax % x.ndim for ax in site.op.axis)
        n = len(axes)
        if axes != list(range(x.ndim - n, x.ndim)):
            raise errors.UnsupportedLayerError(
                f"GatedLora on {site.path!r} ({site.layer}) needs the contracted input axes last; "
                f"this layer contracts axes {tuple(site.op.axis)} of a {x.ndim}-D input")
        if x.ndim - n < 2:
            raise errors.UnsupportedLayerError(
                f"GatedLora on {site.path!r} ({site.layer}) averages its gate over the sequence "
                f"(axis 1 of [batch, seq, ...]), but the layer is called on {x.ndim}-D input "
                f"{tuple(x.shape)} with no sequence axis (e.g. tokens flattened to rows); use Lora "
                "on this layer or call it on [batch, seq, features]")
        return x.ndim - n

    def gate(self, params: Params, site: LinearSite, x: jax.Array) -> jax.Array:
        """``mean_seq sigmoid(x W_g + b_g)`` in float32: ``[batch, *other leading axes, G]``
        (``[batch, G]`` for ``[batch, seq, in]`` inputs; AdapterHub's stored gate score)."""
        self._lead(site, x)
        gate = params["lora_gate"]
        logits = (site.op.project_in(x.astype(jnp.float32), gate["kernel"].astype(jnp.float32))
                  + gate["bias"].astype(jnp.float32))
        return jnp.mean(jax.nn.sigmoid(logits), axis=1)

    def apply(self, params, shared, site: LinearSite, call, x, base, ctx):
        """``call(x) + g * ((dropout(x) A) B)``, block ``j`` of the outputs by ``g[:, j]``."""
        out = call(x)
        lead = self._lead(site, x)
        op, dtype, heads = site.op, out.dtype, self.gating_heads
        delta = low_rank(params["lora_a"], params["lora_b"], op, x, 1.0, dtype,
                         self.lora.dropout, ctx.key)
        g = self.gate(params, site, x)
        ctx.report("lora_gate", g)
        g = g.astype(dtype)[:, None]  # [b, 1, *rest, G]: over the sequence
        shape = delta.shape
        blocks = delta.reshape(*shape[:lead], heads, op.fan_out // heads)
        return out + (blocks * g[..., None]).reshape(shape)
