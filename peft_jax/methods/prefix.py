"""Prefix tuning: trained keys and values before every attention layer's own (Li & Liang, 2021,
"Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190).

At each attention tap the method prepends ``N`` trained key and value rows (one set per layer)
and ``N`` ones to the mask, then runs the model's attention::

    call(Attention(q, [Pk; k], [Pv; v], [1; m]))

This is what HF PEFT's ``PREFIX_TUNING`` computes by passing the prefix as ``past_key_values``:

* **Layout.** HF's prefix encoder outputs ``(N, 2·L·KV·d)`` per example, viewed as
  ``(N, 2L, KV, d)``; layer ``l`` takes rows ``2l`` (keys) and ``2l + 1`` (values)
  (``get_prompt``: view, ``permute([2, 0, 3, 1, 4])``, ``split(2)``). With grouped-query attention
  HF sets ``token_dim = head_dim · num_key_value_heads`` (``_prepare_prompt_learning_config``), so
  the prefix has ``KV`` heads, read by query head ``h`` through key head ``h // (H / KV)`` as the
  model's own keys are.
* **No RoPE on the prefix.** HF hands the prefix over as an already-filled cache, whose keys are
  never rotated; here they are prepended after the tap's keys got their RoPE.
* **Mask.** HF prepends ``N`` ones to the 2-D attention mask, so every query (padding rows
  included) sees the whole prefix; here ``N`` ``True`` columns go before the tap's mask.
  (On a sliding-window layer HF's prefix, sitting in the cache at slots ``0..N-1``, falls out
  of the window of far queries; here it stays visible.)
* **Positions.** HF counts the prefix in positions: the real tokens start at position ``N``.
  The model does that through ``Inputs.offset`` on its input tap: `PrefixPositions` (or
  `PrefixTuning.positions`) is the companion method the config layer places there.
* **Dtype.** The prefix is computed in its params' dtype (float32) and cast to the keys' dtype,
  as HF casts to the base model's dtype.

With ``projection=True`` (HF's ``prefix_projection``) the prefix is reparameterized by one MLP
shared by all layers: ``Embedding(N, T) -> Linear(T, h) -> tanh -> Linear(h, 2·L·T)`` with
``T = KV · d`` and ``h = encoder_hidden_size`` (default ``T``, as HF). Its params are *shared*
params (`Method.init_shared_params`), and each site computes only its own ``2T`` output columns.
HF checkpoints never hold the MLP: they store its output, the flat table (see `fold`,
`to_prompt_embeddings`, `from_prompt_embeddings`).

Param names (HF PEFT in brackets):

* shared, ``projection=True``: ``prefix_embedding (N, T)`` [``prompt_encoder.embedding.weight``],
  ``prefix_hidden_kernel (T, h)`` / ``prefix_hidden_bias (h,)`` [``transform.0.weight.T`` / ``.bias``],
  ``prefix_out_kernel (h, 2LT)`` / ``prefix_out_bias (2LT,)`` [``transform.2.weight.T`` / ``.bias``].
* per site, ``projection=False``: ``prefix_key (N, KV, d)`` and ``prefix_value (N, KV, d)``; HF
  holds all layers in one ``prompt_embeddings (N, 2·L·T)`` table (the saved file's key, and
  ``prompt_encoder.embedding.weight`` in memory).
* per site, ``use_gating=True``: ``prefix_gate_kernel (features, G)`` / ``prefix_gate_bias (G,)``
  [AdapterHub's ``prefix_gates.<name>.weight.T`` / ``.bias``; HF has no gates].

Gating (AdapterHub, used by UniPELT): ``g = mean_t sigmoid(hidden W + b)`` over the tap's
``hidden`` (the attention block's normalized input), ``[b, G]`` with ``G = 2`` (or 1 with
``shared_gating``); the prefix keys are scaled by ``g[:, 0]`` and the values by ``g[:, -1]``
(AdapterHub ``PrefixTuningLayer.compose_single``). The mean runs over every position, padding
included, as AdapterHub's does; on a decoding step it covers that step's tokens only.

Inits: HF's ``nn.Embedding`` ``N(0, 1)`` for the embedding and the flat prefix, torch's
``nn.Linear`` default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the MLP; ``init_weights="zero"``
zeros the last linear (or the flat prefix), as HF. The gate kernel is ``N(0, 0.02)`` and its bias
torch's default, as AdapterHub. ``dropout`` is AdapterHub's (on the prefix keys and values while
training; HF has none). Not mergeable: `fold` turns the MLP form into flat per-layer prefixes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods.base import Attention, AttentionSite, Context
    >>> site = AttentionSite(path="attn", layer="AttentionTap", num_heads=4, num_kv_heads=2,
    ...                      head_dim=8)
    >>> prefix = PrefixTuning(num_virtual_tokens=3)
    >>> params, _ = prefix.init(jax.random.key(0), site, {}, {})
    >>> {k: v.shape for k, v in params.items()}
    {'prefix_key': (3, 2, 8), 'prefix_value': (3, 2, 8)}
    >>> q, kv = jnp.ones((1, 5, 4, 8)), jnp.ones((1, 5, 2, 8))
    >>> a = Attention(q, kv, kv, jnp.ones((1, 5, 5), bool))
    >>> seen = prefix.apply(params, {}, site, lambda a: a, a, {}, Context())
    >>> seen.key.shape, seen.mask.shape
    ((1, 8, 2, 8), (1, 5, 8))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import Attention, AttentionSite, Context, Inputs, Method, Params
from peft_jax.methods.lora import check_positive_int, check_rate, input_dropout

__all__ = ["PrefixPositions", "PrefixTuning", "fold", "fold_prefix", "from_prompt_embeddings", "kv_geometry",
           "to_prompt_embeddings"]

INITS = (None, "zero")


def kv_geometry(sites: Sequence[Any]) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` shared by all attention ``sites``.

    HF sizes one prefix table for the whole model, so every layer must agree.

    Example:
        >>> from peft_jax.methods.base import AttentionSite
        >>> sites = [AttentionSite(path=f"l{i}", layer="T", num_heads=4, num_kv_heads=2,
        ...                        head_dim=8, index=i, num_layers=2) for i in range(2)]
        >>> kv_geometry(sites)
        (2, 2, 8)
    """
    shapes = {(s.num_layers, s.num_kv_heads, s.head_dim) for s in sites if s.kind == "attention"}
    if not shapes:
        raise errors.InvalidConfigError(
            "prefix tuning found no attention taps among its targets to size its prefix; the "
            "model must place attention taps (peft_jax.hooks.AttentionTap)")
    if len(shapes) > 1:
        listed = ", ".join(f"L={n} kv_heads={k} head_dim={d}" for n, k, d in sorted(shapes))
        raise errors.InvalidConfigError(
            f"prefix tuning needs one (num_layers, kv_heads, head_dim) for all its attention taps "
            f"(HF sizes one prefix table), got {listed}; target one kind of layer per adapter")
    return shapes.pop()


def _token_dim(site: AttentionSite) -> int:
    return site.num_kv_heads * site.head_dim


def _uniform(key, shape, fan_in: int, dtype) -> jax.Array:
    """torch ``nn.Linear``'s default init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _param_dtype(dtype) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuning(Method):
    """Prefix tuning on attention sites: ``N`` trained keys and values before each layer's own.

    Args:
        num_virtual_tokens: ``N``, the prefix length.
        projection: reparameterize the prefix by a shared MLP (HF's ``prefix_projection``).
        encoder_hidden_size: the MLP's hidden width ``h`` (``None``: ``T = kv_heads · head_dim``,
            HF's default).
        init_weights: ``None`` (random) or ``"zero"`` (the last linear, or the flat prefix, is
            zero), as HF's ``init_weights``.
        use_gating: AdapterHub's prefix gates (UniPELT): keys and values scaled by
            ``mean_t sigmoid(Linear(hidden))``.
        shared_gating: one gate for keys and values (``Linear(features -> 1)``) instead of two;
            AdapterHub's default when gating is on.
        dropout: AdapterHub's dropout on the prefix keys and values while training (HF: none).

    Example:
        >>> from peft_jax.methods.base import AttentionSite
        >>> site = AttentionSite(path="a", layer="T", num_heads=4, num_kv_heads=2, head_dim=8,
        ...                      index=0, num_layers=3, features=32)
        >>> PrefixTuning(num_virtual_tokens=5, use_gating=True).param_shapes(site)
        {'prefix_gate_bias': (1,), 'prefix_gate_kernel': (32, 1), 'prefix_key': (5, 2, 8), 'prefix_value': (5, 2, 8)}
        >>> PrefixTuning(num_virtual_tokens=5, projection=True).init_shared_params(
        ...     jax.random.key(0), [site], jnp.float32)["prefix_out_kernel"].shape  # (T, 2·L·T)
        (16, 96)
    """  # noqa: E501

    name: ClassVar[str] = "prefix_tuning"
    sites: ClassVar[tuple[str, ...]] = ("attention",)
    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    use_gating: bool = False
    shared_gating: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        for flag in ("projection", "use_gating", "shared_gating"):
            if not isinstance(getattr(self, flag), bool):
                raise errors.InvalidConfigError(
                    f"PrefixTuning {flag} must be True or False, got {getattr(self, flag)!r}")
        if self.encoder_hidden_size is not None:
            check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        if self.init_weights not in INITS:
            raise errors.InvalidConfigError(
                f"PrefixTuning init_weights must be None (random) or 'zero', got {self.init_weights!r}")
        check_rate(self.dropout, "dropout")

    @property
    def needs_rng(self) -> bool:
        return self.dropout > 0

    @property
    def gates(self) -> int:
        """``G``: the gate's outputs (1 with ``shared_gating``, else 2; 0 without gating)."""
        return 0 if not self.use_gating else 1 if self.shared_gating else 2

    def fold(self, shared: Params, sites, params):
        """`fold` as the front-ends call it: ``None`` when already flat."""
        return None if not self.projection else fold_prefix(self, shared, sites, params)

    def positions(self) -> "PrefixPositions":
        """The input-tap companion that starts the real tokens' positions after the prefix.

        Example:
            >>> PrefixTuning(num_virtual_tokens=7).positions()
            PrefixPositions(num_virtual_tokens=7)
        """
        return PrefixPositions(num_virtual_tokens=self.num_virtual_tokens)

    # -- before anything is built ------------------------------------------------------------
    def check(self, site) -> None:
        """Typed errors before compile: the site kind, its layer index, gating's input width."""
        super().check(site)
        if not 0 <= site.index < site.num_layers:
            raise errors.InvalidConfigError(
                f"PrefixTuning on {site.path!r}: the tap says it is layer {site.index} of "
                f"{site.num_layers}; the model must number its attention taps 0..num_layers-1")
        if self.use_gating and site.features <= 0:
            raise errors.InvalidConfigError(
                f"PrefixTuning(use_gating=True) on {site.path!r}: the attention tap does not give "
                "the hidden width (AttentionSite.features) the gate reads; set features on the tap")

    # -- state ------------------------------------------------------------------------------------
    def init_shared_params(self, key, sites: list, dtype: Any) -> Params:
        """The reparameterization (``projection=True``): embedding and MLP, sized from ``sites``."""
        if not self.projection:
            return {}
        num_layers, kv_heads, head_dim = kv_geometry(sites)
        t = kv_heads * head_dim
        h = self.encoder_hidden_size or t
        out = 2 * num_layers * t
        dtype = _param_dtype(dtype)
        k_emb, k_w1, k_b1, k_w2, k_b2 = jax.random.split(key, 5)
        params = {"prefix_embedding": jax.random.normal(k_emb, (self.num_virtual_tokens, t), dtype),
                  "prefix_hidden_kernel": _uniform(k_w1, (t, h), t, dtype),
                  "prefix_hidden_bias": _uniform(k_b1, (h,), t, dtype)}
        if self.init_weights == "zero":
            params["prefix_out_kernel"] = jnp.zeros((h, out), dtype)
            params["prefix_out_bias"] = jnp.zeros((out,), dtype)
        else:
            params["prefix_out_kernel"] = _uniform(k_w2, (h, out), h, dtype)
            params["prefix_out_bias"] = _uniform(k_b2, (out,), h, dtype)
        return params

    def init(self, key, site: AttentionSite, base: Params, shared: Params):
        """``prefix_key`` / ``prefix_value`` (flat form) and the gate (with ``use_gating``)."""
        dtype = jnp.float32
        k_key, k_value, k_gate, k_bias = jax.random.split(key, 4)
        params: Params = {}
        if not self.projection:
            shape = (self.num_virtual_tokens, site.num_kv_heads, site.head_dim)
            if self.init_weights == "zero":
                params["prefix_key"] = jnp.zeros(shape, dtype)
                params["prefix_value"] = jnp.zeros(shape, dtype)
            else:
                params["prefix_key"] = jax.random.normal(k_key, shape, dtype)
                params["prefix_value"] = jax.random.normal(k_value, shape, dtype)
        if self.use_gating:
            params["prefix_gate_kernel"] = 0.02 * jax.random.normal(k_gate, (site.features, self.gates), dtype)
            params["prefix_gate_bias"] = _uniform(k_bias, (self.gates,), site.features, dtype)
        return params, {}

    # -- running ----------------------------------------------------------------------------------
    def prefix(self, params: Params, shared: Params, site: AttentionSite) -> tuple[jax.Array, jax.Array]:
        """This layer's ``(keys, values)``, each ``(N, kv_heads, head_dim)`` in the params' dtype.

        With ``projection`` only the layer's ``2T`` output columns of the MLP are computed
        (columns ``[2lT, (2l + 2)T)`` of HF's ``(N, 2LT)`` output: its keys, then its values).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from peft_jax.methods.base import AttentionSite
            >>> site = AttentionSite(path="a", layer="T", num_heads=2, num_kv_heads=1, head_dim=4,
            ...                      index=1, num_layers=2)
            >>> method = PrefixTuning(num_virtual_tokens=3, projection=True)
            >>> shared = method.init_shared_params(jax.random.key(0), [site], jnp.float32)
            >>> [x.shape for x in method.prefix({}, shared, site)]
            [(3, 1, 4), (3, 1, 4)]
        """
        shape = (self.num_virtual_tokens, site.num_kv_heads, site.head_dim)
        if not self.projection:
            for name in ("prefix_key", "prefix_value"):
                if name not in params:
                    raise errors.StateError(
                        f"PrefixTuning on {site.path!r} has no {name!r}: a flat prefix "
                        "(projection=False) keeps one per site; init the site or fold() the MLP form")
                if tuple(params[name].shape) != shape:
                    raise errors.InvalidConfigError(
                        f"PrefixTuning on {site.path!r}: {name} has shape {tuple(params[name].shape)}, "
                        f"the layer needs {shape} (num_virtual_tokens, kv_heads, head_dim)")
            return params["prefix_key"], params["prefix_value"]
        t = _token_dim(site)
        width = 2 * site.num_layers * t
        if "prefix_out_kernel" not in shared:
            raise errors.StateError(
                f"PrefixTuning(projection=True) on {site.path!r} finds no shared MLP "
                "(prefix_embedding, prefix_*_kernel); create it with init_shared_params")
        have = shared["prefix_out_kernel"].shape[-1]
        if have != width:
            raise errors.InvalidConfigError(
                f"PrefixTuning on {site.path!r}: the shared MLP outputs {have} columns, this model "
                f"needs 2 * num_layers * kv_heads * head_dim = {width}; rebuild it for this model")
        cols = slice(2 * site.index * t, (2 * site.index + 2) * t)
        hidden = jnp.tanh(shared["prefix_embedding"] @ shared["prefix_hidden_kernel"]
                          + shared["prefix_hidden_bias"])
        out = hidden @ shared["prefix_out_kernel"][:, cols] + shared["prefix_out_bias"][cols]
        out = out.reshape(self.num_virtual_tokens, 2, *shape[1:])
        return out[:, 0], out[:, 1]

    def gate(self, params: Params, site: AttentionSite, hidden: jax.Array | None) -> jax.Array:
        """``mean_t sigmoid(hidden W + b)``: ``[batch, G]`` in float32 (AdapterHub's prefix gate).

        Example:
            >>> import jax.numpy as jnp
            >>> from peft_jax.methods.base import AttentionSite
            >>> site = AttentionSite(path="a", layer="T", num_heads=1, num_kv_heads=1, head_dim=2,
            ...                      features=3)
            >>> params = {"prefix_gate_kernel": jnp.zeros((3, 1)), "prefix_gate_bias": jnp.zeros(1)}
            >>> PrefixTuning(num_virtual_tokens=1, use_gating=True).gate(params, site, jnp.ones((2, 4, 3))).tolist()
            [[0.5], [0.5]]
        """
        if hidden is None:
            raise errors.MissingHookError(
                f"PrefixTuning(use_gating=True) on {site.path!r} needs the attention block's "
                "normalized input: the model's attention tap must pass it as "
                "Attention(q, k, v, mask, hidden=<the attention's input hidden states>)")
        logits = (hidden.astype(jnp.float32) @ params["prefix_gate_kernel"].astype(jnp.float32)
                  + params["prefix_gate_bias"].astype(jnp.float32))
        return jnp.mean(jax.nn.sigmoid(logits), axis=1)

    def apply(self, params, shared, site: AttentionSite, call, a: Attention, base, ctx: Context):
        """``call(Attention(q, [Pk; k], [Pv; v], [1; m]))`` (gated and dropped out as configured)."""
        pk, pv = self.prefix(params, shared, site)
        key, value, mask = a.key, a.value, a.mask
        b, n = key.shape[0], self.num_virtual_tokens
        pk = jnp.broadcast_to(pk.astype(key.dtype)[None], (b, *pk.shape))
        pv = jnp.broadcast_to(pv.astype(value.dtype)[None], (b, *pv.shape))
        if self.dropout > 0 and ctx.key is not None:
            pk = input_dropout(pk, self.dropout, ctx.key)
            pv = input_dropout(pv, self.dropout, ctx.fold(1).key)
        if self.use_gating:
            g = self.gate(params, site, a.hidden)
            ctx.report("prefix_gate", g)
            pk = pk * g[:, 0, None, None, None].astype(pk.dtype)
            pv = pv * g[:, -1, None, None, None].astype(pv.dtype)
        ones = jnp.ones((*mask.shape[:-1], n), mask.dtype)
        return call(a._replace(key=jnp.concatenate([pk, key], axis=1),
                               value=jnp.concatenate([pv, value], axis=1),
                               mask=jnp.concatenate([ones, mask], axis=-1)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixPositions(Method):
    """Starts the real tokens' positions after ``N`` prefix tokens (input-tap companion).

    HF PEFT counts prefix tuning's virtual tokens in positions (they sit in the cache before the
    inputs), so the first real token has position ``N``. On the prefill (``x.fresh``) this adds
    ``N`` to ``Inputs.offset``; decoding steps pass through (the cache carries the position on).
    No params.

    Args:
        num_virtual_tokens: ``N``, the prefix length of the `PrefixTuning` it accompanies.

    Example:
        >>> import jax.numpy as jnp
        >>> from peft_jax.methods.base import Context, Inputs, InputSite
        >>> site = InputSite(path="inputs", layer="InputTap", features=4, vocab_size=10)
        >>> x = Inputs(jnp.zeros((1, 3, 4)), jnp.ones((1, 3), bool))
        >>> PrefixPositions(num_virtual_tokens=5).apply({}, {}, site, lambda i: i, x, {}, Context()).offset
        5
    """

    name: ClassVar[str] = "prefix_positions"
    sites: ClassVar[tuple[str, ...]] = ("inputs",)
    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")

    def check(self, site) -> None:
        """Typed errors before compile: the site kind, room for the prefix in the positions."""
        super().check(site)
        limit = site.max_positions
        if limit and self.num_virtual_tokens >= limit:
            raise errors.SequenceTooLongError(
                f"prefix tuning on {site.path!r}: {self.num_virtual_tokens} virtual tokens leave no "
                f"room for inputs in a model that takes at most {limit} positions; use fewer than "
                f"{limit} virtual tokens")

    def init(self, key, site, base: Params, shared: Params):
        """No params."""
        return {}, {}

    def param_shapes(self, site) -> Params:
        """No params."""
        return {}

    def apply(self, params, shared, site, call, x: Inputs, base, ctx):
        """``call(x)`` with ``offset + N`` on a fresh call; ``call(x)`` on a decoding step."""
        if not x.fresh:
            return call(x)
        limit, seq = site.max_positions, x.embeds.shape[-2]
        total = x.offset + self.num_virtual_tokens + seq
        if limit and total > limit:
            raise errors.SequenceTooLongError(
                f"prefix tuning on {site.path!r}: {self.num_virtual_tokens} virtual tokens + {seq} "
                f"input tokens (+ {x.offset} earlier) = {total} positions, but the model takes at most "
                f"{limit}; shorten the inputs to at most {max(limit - total + seq, 0)} tokens or use "
                "fewer virtual tokens")
        return call(x._replace(offset=x.offset + self.num_virtual_tokens))


def fold_prefix(method: PrefixTuning, shared: Params, sites: Sequence[AttentionSite],
         params: Mapping[str, Params] | None = None) -> tuple[PrefixTuning, dict[str, Params]]:
    """The flat form of a reparameterized prefix: ``(PrefixTuning(projection=False, ...),
    {site.path: params})`` with identical outputs (the MLP evaluated once; HF saves exactly this).

    ``params`` (each site's current params, e.g. its gates) are kept in the returned dicts. A flat
    ``method`` comes back unchanged with ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from peft_jax.methods.base import AttentionSite
        >>> sites = [AttentionSite(path=f"l{i}", layer="T", num_heads=2, num_kv_heads=1,
        ...                        head_dim=4, index=i, num_layers=2) for i in range(2)]
        >>> method = PrefixTuning(num_virtual_tokens=3, projection=True)
        >>> shared = method.init_shared_params(jax.random.key(0), sites, jnp.float32)
        >>> flat, per_site = fold_prefix(method, shared, sites)
        >>> flat.projection, sorted(per_site["l1"]), per_site["l1"]["prefix_key"].shape
        (False, ['prefix_key', 'prefix_value'], (3, 1, 4))
    """
    params = params or {}
    if not method.projection:
        return method, {s.path: dict(params.get(s.path, {})) for s in sites}
    kv_geometry(sites)
    out = {}
    for site in sites:
        pk, pv = method.prefix({}, shared, site)
        out[site.path] = {**params.get(site.path, {}), "prefix_key": pk, "prefix_value": pv}
    return dataclasses.replace(method, projection=False, encoder_hidden_size=None), out


fold = fold_prefix  # the name the method tables export


def to_prompt_embeddings(params: Mapping[str, Params], sites: Sequence[AttentionSite]) -> jax.Array:
    """HF PEFT's ``prompt_embeddings`` ``(N, 2·L·KV·d)`` from flat per-site prefixes.

    ``sites`` must cover every layer ``0..L-1`` once (HF's table has a prefix for each layer).

    Example:
        >>> import jax.numpy as jnp
        >>> from peft_jax.methods.base import AttentionSite
        >>> sites = [AttentionSite(path=f"l{i}", layer="T", num_heads=1, num_kv_heads=1,
        ...                        head_dim=1, index=i, num_layers=2) for i in range(2)]
        >>> p = {f"l{i}": {"prefix_key": jnp.full((1, 1, 1), 10.0 * i + 1),
        ...                "prefix_value": jnp.full((1, 1, 1), 10.0 * i + 2)} for i in range(2)}
        >>> to_prompt_embeddings(p, sites).tolist()  # k0, v0, k1, v1
        [[1.0, 2.0, 11.0, 12.0]]
    """
    num_layers, kv_heads, head_dim = kv_geometry(sites)
    by_layer: dict[int, AttentionSite] = {}
    for site in sites:
        if site.index in by_layer:
            raise errors.InvalidConfigError(
                f"two attention taps claim layer {site.index}: {by_layer[site.index].path!r} and "
                f"{site.path!r}; HF's prefix table has one prefix per layer")
        by_layer[site.index] = site
    missing = sorted(set(range(num_layers)) - set(by_layer))
    if missing:
        raise errors.InvalidConfigError(
            f"HF's prompt_embeddings holds a prefix for every layer, but layers {missing[:8]} of "
            f"{num_layers} have none; target every attention layer")
    columns = []
    for layer in range(num_layers):
        p = params[by_layer[layer].path]
        n = p["prefix_key"].shape[0]
        columns += [jnp.reshape(p["prefix_key"], (n, kv_heads * head_dim)),
                    jnp.reshape(p["prefix_value"], (n, kv_heads * head_dim))]
    return jnp.concatenate(columns, axis=-1)


def from_prompt_embeddings(table: Any, sites: Sequence[AttentionSite]) -> dict[str, Params]:
    """Flat per-site prefixes ``{site.path: {"prefix_key", "prefix_value"}}`` from HF PEFT's
    ``prompt_embeddings`` ``(N, 2·L·KV·d)`` (view ``(N, 2L, KV, d)``; layer ``l``: rows ``2l``, ``2l+1``).

    Example:
        >>> import jax.numpy as jnp
        >>> from peft_jax.methods.base import AttentionSite
        >>> sites = [AttentionSite(path=f"l{i}", layer="T", num_heads=1, num_kv_heads=1,
        ...                        head_dim=1, index=i, num_layers=2) for i in range(2)]
        >>> out = from_prompt_embeddings(jnp.array([[1.0, 2.0, 11.0, 12.0]]), sites)
        >>> out["l1"]["prefix_key"].ravel().tolist(), out["l1"]["prefix_value"].ravel().tolist()
        ([11.0], [12.0])
    """
    num_layers, kv_heads, head_dim = kv_geometry(sites)
    table = jnp.asarray(table)
    width = 2 * num_layers * kv_heads * head_dim
    if table.ndim != 2 or table.shape[1] != width:
        raise errors.CheckpointError(
            f"prompt_embeddings has shape {tuple(table.shape)}, this model needs (N, {width}) = "
            f"(num_virtual_tokens, 2 * {num_layers} layers * {kv_heads} kv heads * {head_dim} head_dim); "
            "was it saved for another model?")
    n = table.shape[0]
    view = table.reshape(n, 2 * num_layers, kv_heads, head_dim)
    return {s.path: {"prefix_key": view[:, 2 * s.index], "prefix_value": view[:, 2 * s.index + 1]}
            for s in sites}
