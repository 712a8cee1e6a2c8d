"""Reference decoder-only transformer in Flax NNX (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 3).

An ordinary NNX model built from ``nnx.Linear`` and ``nnx.Embed``; its module tree mirrors HF's,
so HF PEFT target names work unchanged: ``layers/<i>/self_attn/{q,k,v,o}_proj`` and
``layers/<i>/mlp/{gate,up,down}_proj``. It places the inert `peft_jax.hooks` taps that input,
attention and residual methods attach to (``input_tap``, ``layers/<i>/self_attn/attention_tap``,
``layers/<i>/{attention,ffn}_residual``) and ships its `ROLES`; otherwise nothing in it knows
about adapters.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                     num_heads=4, num_kv_heads=2, head_dim=4)
    >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 32)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from peft_jax.errors import InvalidConfigError
from peft_jax.hooks import AttentionTap, InputTap, ResidualTap, Roles, strip_virtual
from peft_jax.methods.sites import Attention as AttentionCall
from peft_jax.methods.sites import Inputs, Residual
from peft_jax.models import rope
from peft_jax.models.decoder_attention import attend, build_attention_mask
from peft_jax.models.decoder_cache import KVCache
from peft_jax.models.decoder_config import DecoderConfig, reference_config

__all__ = ["ROLES", "Decoder", "DecoderConfig", "KVCache", "RMSNorm", "load_decoder", "reference_config"]

#: where the decoder's parts are, for configs that place methods by role.
ROLES = Roles(attention=r"layers/\d+/attention_residual", ffn=r"layers/\d+/ffn_residual",
              embed="embed_tokens", layers=r"layers/\d+", norms=r"(layers/\d+/.*layernorm|norm)")

_init = nnx.initializers.normal(stddev=0.02)
_UNSET = object()


def _save_projections(prim, *avals, **params) -> bool:
    """Remat policy: keep the outputs of full-rank, non-batched matmuls (the layer's projections).

    Attention's batched matmuls, elementwise work and low-rank products (a contraction at least
    8x narrower than the output, such as LoRA's ``(x A) B``: cheap to redo, as large as the
    projection it is added to) are recomputed in the backward pass.
    """
    if prim is not jax.lax.dot_general_p:
        return False
    (contract, _), (batch, _) = params["dimension_numbers"]
    if batch:
        return False
    lhs, rhs = avals[0].shape, avals[1].shape
    k = math.prod(lhs[d] for d in contract)
    out_width = math.prod(rhs) // max(k, 1)
    return 8 * k > out_width


# DecoderConfig.remat -> the jax.checkpoint policy applied to each layer.
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "projections": _save_projections,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _recompute_late(fn, policy):
    """``fn`` under ``jax.checkpoint(policy=policy)``, recomputed only when the backward needs it.

    XLA:CPU drops optimization barriers before scheduling, so with plain ``jax.checkpoint`` it
    runs every layer's recomputation right after the forward pass (whose inputs are all ready),
    and peak memory is as if nothing were rematerialized. Here each saved activation gets
    ``0 * cotangent[0]`` added in the backward pass: the values are unchanged (for finite
    gradients), but the recomputation now depends on the incoming cotangent, so it runs when the
    backward pass reaches this layer. The first argument's leaves (the parameters) are left alone.
    """
    tie_leaf: list[bool] = []

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def fwd(*args):
        out, vjp_fn = jax.vjp(jax.checkpoint(fn, policy=policy), *args)
        params = {id(leaf) for leaf in jax.tree.leaves(args[0])}
        tie_leaf[:] = [id(leaf) not in params and jnp.issubdtype(leaf.dtype, jnp.floating)
                       for leaf in jax.tree.leaves(vjp_fn)]
        return out, vjp_fn

    def bwd(vjp_fn, cotangent):
        first = next(c for c in jax.tree.leaves(cotangent) if jnp.issubdtype(c.dtype, jnp.floating))
        zero = first.reshape(-1)[0] * jnp.zeros((), first.dtype)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        leaves = [leaf + zero.astype(leaf.dtype) if tie else leaf for leaf, tie in zip(leaves, tie_leaf)]
        return jax.tree.unflatten(treedef, leaves)(cotangent)

    run.defvjp(fwd, bwd)
    return run


def _remat_layer(layer: nnx.Module, policy, x: Array, angles: tuple[Array, Array], mask: Array) -> Array:
    """``layer(x, angles, mask)``, keeping only what ``policy`` saves for the backward pass.

    The layer runs as a pure function of its state, so this works inside any JAX transform
    (e.g. ``jax.value_and_grad`` of a model rebuilt by ``nnx.merge``); RNG streams it advances
    (adapter dropout) are written back.
    """
    graphdef, state = nnx.split(layer)
    rng_state = nnx.state(layer, nnx.RngState)

    def run(state, x, angles, mask):
        module = nnx.merge(graphdef, state)
        return module(x, angles, mask)[0], nnx.state(module, nnx.RngState)

    out, rng_state = _recompute_late(run, policy)(state, x, angles, mask)
    nnx.update(layer, rng_state)
    return out


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale``; output ``x / rms(x) * (offset + scale)``, computed in float32.

    ``offset=1.0`` is Gemma's convention (weights stored as ``w`` and applied as ``1 + w``, as in
    HF checkpoints); ``scale`` then starts at zeros, else at ones.

    Example:
        >>> import jax.numpy as jnp
        >>> RMSNorm(4)(jnp.full((1, 4), 3.0)).round(4).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, offset: float = 0.0,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        init = jnp.zeros if offset else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype))
        self.eps = eps
        self.offset = offset
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.offset:
            scale = scale + self.offset
        return (normed * scale).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k norms, biases and a KV cache."""

    def __init__(self, config: DecoderConfig, layer: int, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        c = config
        lin = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_init, rngs=rngs)
        self.q_proj = nnx.Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.attention_bias, **lin)
        self.k_proj = nnx.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, **lin)
        self.v_proj = nnx.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, **lin)
        self.o_proj = nnx.Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.attention_out_bias, **lin)
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(c.head_dim, **norm) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, **norm) if c.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.softcap = c.attn_logit_softcap
        self.attention_tap = AttentionTap(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                                          head_dim=c.head_dim, index=layer, num_layers=c.num_layers,
                                          features=c.hidden_size)

    def __call__(self, x: Array, angles: tuple[Array, Array], mask: Array,
                 kv: tuple[Array, Array] | None = None, offset: Array | None = None):
        b, t, _ = x.shape
        # Projections see tokens as rows of a 2-D matrix: with a 3-D input, XLA's CPU backend
        # transposes whole activations to form the weight (and LoRA factor) gradients.
        x = x.reshape(b * t, -1)
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply_rope(q, angles), rope.apply_rope(k, angles)
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, offset, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, offset, 0, 0))
            kv = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        def attention(a: AttentionCall) -> Array:
            return attend(a.query, a.key, a.value, a.mask, scale=self.scale, softcap=self.softcap,
                          causal=kv is None)

        out = self.attention_tap(AttentionCall(q, k, v, mask, hidden=x.reshape(b, t, -1),
                                               project=self._project), attention)
        return self.o_proj(out.reshape(b * t, self.num_heads * self.head_dim)).reshape(b, t, -1), kv


    def _project(self, h: Array) -> tuple[Array, Array]:
        """Keys and values of hidden states ``[b, n, d]`` (no RoPE): LLaMA-Adapter's prompts."""
        b, n, _ = h.shape
        h = h.reshape(b * n, -1)
        return (self.k_proj(h).reshape(b, n, self.num_kv_heads, self.head_dim),
                self.v_proj(h).reshape(b, n, self.num_kv_heads, self.head_dim))


class MLP(nnx.Module):
    """Gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU or GeGLU)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        c = config
        lin = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=_init, rngs=rngs)
        self.gate_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **lin)
        self.up_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **lin)
        self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, **lin)
        self.activation = c.mlp_activation

    def __call__(self, x: Array) -> Array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # tokens as rows, as in Attention
        gate = self.gate_proj(x)
        gate = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down_proj(gate * self.up_proj(x)).reshape(*shape[:-1], -1)


class DecoderLayer(nnx.Module):
    """Pre-norm block; with ``sandwich_norms`` (Gemma) sub-layer outputs are normalized too."""

    def __init__(self, config: DecoderConfig, layer: int, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        c = config
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, **norm)
        self.self_attn = Attention(c, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Llama names the pre-MLP norm "post_attention_layernorm"; Gemma uses it on the attention output.
        self.post_attention_layernorm = RMSNorm(c.hidden_size, **norm)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, **norm) if c.sandwich_norms else None
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, **norm) if c.sandwich_norms else None
        self.mlp = MLP(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention_residual = ResidualTap(c.hidden_size, role="attention", index=layer)
        self.ffn_residual = ResidualTap(c.hidden_size, role="ffn", index=layer)

    def __call__(self, x, angles, mask, kv=None, offset=None):
        h, kv = self.self_attn(self.input_layernorm(x), angles, mask, kv, offset)
        if self.pre_feedforward_layernorm is None:
            x = self.attention_residual(Residual(h, x))
            return self.ffn_residual(Residual(self.mlp(self.post_attention_layernorm(x)), x)), kv
        x = self.attention_residual(Residual(self.post_attention_layernorm(h), x))
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.ffn_residual(Residual(h, x)), kv


def _check_room(cache: KVCache, new_tokens: int) -> None:
    """Fail early (outside jit, where the length is known) instead of silently clamping writes."""
    if new_tokens > cache.max_length:
        raise InvalidConfigError(
            f"{new_tokens} tokens do not fit a KV cache of {cache.max_length}; create it with "
            "init_cache(batch, max_length) large enough for the prompt (virtual tokens included) "
            "plus every generated token")
    if isinstance(cache.length, jax.core.Tracer):
        return
    if int(cache.length) + new_tokens > cache.max_length:
        raise InvalidConfigError(
            f"the KV cache holds {cache.max_length} tokens and already has {int(cache.length)}; "
            f"{new_tokens} more do not fit. Create it with init_cache(batch, max_length) large enough "
            "for the prompt plus every generated token")


class Decoder(nnx.Module):
    """Decoder-only language model: ``embed_tokens``, ``layers``, ``norm``, ``lm_head`` (if untied).

    Args:
        config: The :class:`DecoderConfig`.
        rngs: Random streams for initialization (weights are ``N(0, 0.02)``, norms neutral).
        dtype: Compute dtype of activations.
        param_dtype: Dtype of the parameters.
        remat: Per-layer rematerialization policy (see ``DecoderConfig.remat``); by default the
            config's. It applies when no KV cache is given (training); results are unchanged.
            For a loaded model: ``model.config = dataclasses.replace(model.config, remat="full")``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
        ...                     num_heads=2, num_kv_heads=1, head_dim=8)
        >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
        >>> ids, mask = jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]])
        >>> cache = model.init_cache(1, 8)
        >>> logits, cache = model(ids, attention_mask=mask, cache=cache)
        >>> logits, cache = model(jnp.array([[7]]), cache=cache)
        >>> logits.shape, int(cache.length)
        ((1, 1, 32), 4)
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: str | None = _UNSET):
        c = config if remat is _UNSET else dataclasses.replace(config, remat=remat)
        self.config = c
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=_init, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype,
                            param_dtype=param_dtype)
        self.lm_head = None if c.tie_embeddings else nnx.Linear(
            c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_init, rngs=rngs)
        self.input_tap = InputTap(features=c.hidden_size, vocab_size=c.vocab_size,
                                  embed_path="embed_tokens")

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows of ``max_length`` tokens in total."""
        return KVCache.create(self.config, batch_size, max_length, dtype or self.dtype)

    def virtual_tokens(self, batch_size: int, seq_len: int) -> int:
        """How many tokens input methods (prompt tuning) put before ``seq_len`` inputs on a
        prefill: the cache needs room for them too. Computed from shapes only."""
        embeds = jax.ShapeDtypeStruct((batch_size, seq_len, self.config.hidden_size), self.dtype)
        mask = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.bool_)
        out = jax.eval_shape(lambda e, m: self.input_tap(Inputs(e, m)).embeds, embeds, mask)
        return out.shape[1] - seq_len

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings ``[batch, seq, hidden]`` (times ``sqrt(hidden)`` for Gemma)."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
        return x

    def logits(self, hidden: Array) -> Array:
        """Output logits from final (normalized) hidden states, soft-capped when configured."""
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:
            out = jnp.tanh(out / cap) * cap
        return out

    def hidden_states(self, input_ids: Array | None = None, *, attention_mask: Array | None = None,
                      positions: Array | None = None, cache: KVCache | None = None,
                      inputs_embeds: Array | None = None) -> tuple[Array, KVCache | None]:
        """Final normalized hidden states ``[batch, seq, hidden]`` and the updated cache.

        Arguments are those of :meth:`__call__`.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        fresh = cache is None or not cache.started
        inputs = self.input_tap(Inputs(x, mask, fresh=fresh))
        virtual = inputs.embeds.shape[1] - t  # prompt tokens an input method put in front
        x, mask, t = inputs.embeds, inputs.mask.astype(bool), inputs.embeds.shape[1]
        shift = inputs.offset if fresh else 0  # prefix tokens counted in positions, as HF does
        if cache is None:
            offset, start, key_valid = 0, jnp.full((b,), shift, jnp.int32), mask
        else:
            _check_room(cache, t)
            offset, start = cache.length, cache.next_position + shift
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.length))
        default_positions = positions is None and not shift
        if positions is None:
            positions = jnp.maximum(start[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
            next_position = start + jnp.sum(mask, axis=1, dtype=jnp.int32)
        else:
            positions = jnp.asarray(positions, jnp.int32) + virtual + shift
            if virtual:
                lead = jnp.broadcast_to(jnp.arange(virtual, dtype=jnp.int32) + shift, (b, virtual))
                positions = jnp.concatenate([lead, positions], axis=1)
            next_position = positions[:, -1] + 1
        masks, tables = {}, {}
        new_keys, new_values = [], []
        policy = _REMAT.get(self.config.remat) if cache is None else None
        for i, layer in enumerate(self.layers):
            window = self.config.layer_window(i)
            if window not in masks:
                masks[window] = build_attention_mask(key_valid, q_offset=offset, q_len=t, window=window)
            theta, scaling = self.config.layer_rope(i)
            if (theta, scaling) not in tables:
                inv = rope.inverse_frequencies(self.config.head_dim, theta, scaling)
                if default_positions and cache is None:  # positions < t: look them up
                    tables[theta, scaling] = rope.rope_angles_from_table(positions, inv, t)
                else:
                    tables[theta, scaling] = rope.rope_angles(positions, inv)
            if policy is not None:
                x = _remat_layer(layer, policy, x, tables[theta, scaling], masks[window])
                continue
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, tables[theta, scaling], masks[window], kv, offset)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        if cache is not None:
            cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), valid=key_valid,
                            next_position=next_position, length=cache.length + t, started=True)
        return strip_virtual(self.norm(x), virtual), cache

    def __call__(self, input_ids: Array | None = None, *, attention_mask: Array | None = None,
                 positions: Array | None = None, cache: KVCache | None = None,
                 inputs_embeds: Array | None = None) -> Array | tuple[Array, KVCache]:
        """Logits for ``input_ids`` ``[batch, seq]``; with a ``cache``, also the updated cache.

        Args:
            input_ids: Token ids (int); ignored when ``inputs_embeds`` is given.
            attention_mask: ``[batch, seq]``, 1 for real tokens, 0 for padding (left or right).
            positions: RoPE positions ``[batch, seq]``; by default counted over real tokens only
                (so a left-padded row starts at 0), continuing from the cache.
            cache: A :class:`KVCache` (see :meth:`init_cache`); the new keys/values are written
                at ``cache.length`` and attention covers the cache plus the new tokens.
            inputs_embeds: ``[batch, seq, hidden]`` embeddings used instead of ``input_ids``
                (no embedding scale is applied to them).

        Returns:
            ``[batch, seq, vocab]`` logits, or ``(logits, new_cache)`` when a cache is given.
        """
        h, new_cache = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions,
                                          cache=cache, inputs_embeds=inputs_embeds)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def load_decoder(path, dtype=jnp.float32) -> tuple[Decoder, DecoderConfig]:
    """Load a :class:`Decoder` from an HF-layout directory or a ``.gguf`` file.

    See :func:`peft_jax.models.decoder_load.load_decoder` (this is the same function).

    Example:
        >>> # model, config = load_decoder("path/to/qwen2_dir", dtype=jnp.bfloat16)
    """
    from peft_jax.models.decoder_load import load_decoder as _load  # noqa: PLC0415 (import cycle)

    return _load(path, dtype)
