"""BERT-family encoders (BERT, MiniLM, RoBERTa, XLM-R) in Flax NNX, plus their HF loader.

The models are ordinary NNX modules built from ``nnx.Linear``, ``nnx.Embed`` and
``nnx.LayerNorm``, and their attribute names mirror the Hugging Face modules, so the paths are
``embeddings/word_embeddings``, ``encoder/layer/<i>/attention/self/query|key|value``,
``encoder/layer/<i>/attention/output/dense``, ``encoder/layer/<i>/intermediate/dense``,
``encoder/layer/<i>/output/dense`` and ``pooler/dense``. HF PEFT target names such as
``["query", "value"]`` therefore select the same layers here. The models place the inert
`peft_jax.hooks` taps that input, attention and residual methods attach to (``input_tap``,
``encoder/layer/<i>/attention/self/attention_tap``, ``.../attention/output/residual`` and
``.../output/residual``) and ship their `ROLES`; otherwise nothing in them knows about PEFT
methods.

Dropout is functional: it is active only when a ``dropout_rng`` key is passed to ``__call__``, so
a training step passes a fresh key per step and evaluation passes none. The models hold no RNG
state.

Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                     num_attention_heads=4, intermediate_size=32)
    >>> model = Encoder(cfg, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[2, 7, 9, 0]]); mask = jnp.array([[1, 1, 1, 0]])
    >>> model(ids, mask).last_hidden_state.shape
    (1, 4, 16)
    >>> sentence_embedding(model, ids, mask).shape
    (1, 16)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.errors import CheckpointError, InvalidConfigError, UnsupportedArchitectureError
from peft_jax.hooks import AttentionTap, InputTap, ResidualTap, Roles, strip_virtual
from peft_jax.methods.sites import Attention as AttentionCall
from peft_jax.methods.sites import Inputs, Residual
from peft_jax.models import checkpoint_files

__all__ = [
    "ROLES",
    "SUPPORTED_MODEL_TYPES",
    "Encoder",
    "EncoderConfig",
    "EncoderForSequenceClassification",
    "EncoderOutput",
    "load_encoder",
    "pool",
    "sentence_embedding",
]

log = logging.getLogger(__name__)

# model_type -> the attribute name HF gives the backbone inside task models (``bert.``...).
SUPPORTED_MODEL_TYPES: dict[str, str] = {"bert": "bert", "roberta": "roberta",
                                         "xlm-roberta": "roberta"}
_ROBERTA_LIKE = ("roberta", "xlm-roberta")
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
Pooling = Literal["cls", "mean", "pooler"]
#: where an encoder's parts are (bare, or inside a classifier as ``bert/...``), for configs that
#: place methods by role.
ROLES = Roles(attention=r"(.+/)?encoder/layer/\d+/attention/output/residual",
              ffn=r"(.+/)?encoder/layer/\d+/output/residual",
              embed=r"(.+/)?embeddings/word_embeddings", layers=r"(.+/)?encoder/layer/\d+",
              norms=r".*LayerNorm")


# --- config ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Hyper-parameters of a BERT-family encoder (the fields of an HF ``config.json``).

    Example:
      >>> cfg = EncoderConfig.from_hf({"model_type": "roberta", "vocab_size": 100,
      ...     "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...     "intermediate_size": 16, "pad_token_id": 1})
      >>> cfg.position_offset
      2
    """

    model_type: str = "bert"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    add_pooler: bool = True

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {self.model_type!r} is not a supported encoder; supported: "
                f"{sorted(SUPPORTED_MODEL_TYPES)} (decoders load through peft_jax.models.load)"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"hidden_act {self.hidden_act!r} is not supported; supported: "
                f"{sorted(_ACTIVATIONS)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise InvalidConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise InvalidConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """First position id: 0 for BERT, ``pad_token_id + 1`` for RoBERTa."""
        return self.pad_token_id + 1 if self.model_type in _ROBERTA_LIKE else 0

    @property
    def base_model_prefix(self) -> str:
        """Name HF gives the backbone inside task models (``bert`` or ``roberta``)."""
        return SUPPORTED_MODEL_TYPES[self.model_type]

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> EncoderConfig:
        """Builds the config from an HF ``config.json`` dict (unknown keys are ignored).

        Raises:
          UnsupportedArchitectureError: ``model_type`` is not BERT-family, or the config asks
            for a feature not implemented (relative position embeddings, an activation).
          InvalidConfigError: a required field is missing or out of range.

        Example:
          >>> EncoderConfig.from_hf({"model_type": "bert", "vocab_size": 10, "hidden_size": 4,
          ...     "num_hidden_layers": 1, "num_attention_heads": 1,
          ...     "intermediate_size": 8}).hidden_act
          'gelu'
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = config.get("architectures")
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} (architectures {arch}) is not a supported encoder; "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}. Decoders (llama, mistral, qwen2, "
                "qwen3, gemma3) load through peft_jax.models.load"
            )
        pos_type = config.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise UnsupportedArchitectureError(
                f"position_embedding_type {pos_type!r} is not supported; only 'absolute' is"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise InvalidConfigError(f"encoder config lacks required fields {missing}")
        return cls(**kwargs)


# --- layers ----------------------------------------------------------------------------------
class EncoderOutput(NamedTuple):
    """What :class:`Encoder` returns: per-token states and the tanh pooler output (or None)."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None


def _linear(cfg: EncoderConfig, din: int, dout: int, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: EncoderConfig, param_dtype, rngs) -> nnx.LayerNorm:
    # Normalises in float32 whatever the compute dtype (see _norm).
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=param_dtype, rngs=rngs)


def _norm(module: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """LayerNorm statistics in float32, result back in the compute dtype of ``x``."""
    return module(x.astype(jnp.float32)).astype(x.dtype)


def _dropout(module: nnx.Dropout, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return x if key is None else module(x, deterministic=False, rngs=key)


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
        self.LayerNorm = _layer_norm(cfg, param_dtype, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, key=None, *,
                 inputs_embeds=None) -> jax.Array:
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = (words + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))
        return _dropout(self.dropout, _norm(self.LayerNorm, x), key)


class SelfAttention(nnx.Module):
    """Multi-head attention projections ``query``/``key``/``value`` and the masked softmax."""

    def __init__(self, cfg: EncoderConfig, index: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = _linear(cfg, d, d, dtype, param_dtype, rngs)
        self.key = _linear(cfg, d, d, dtype, param_dtype, rngs)
        self.value = _linear(cfg, d, d, dtype, param_dtype, rngs)
        self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)
        self.attention_tap = AttentionTap(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                                          head_dim=cfg.head_dim, index=index,
                                          num_layers=cfg.num_hidden_layers, features=d)

    def __call__(self, x: jax.Array, mask: jax.Array, key=None) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads
        q = self.query(x).reshape(b, t, h, d // h)
        k = self.key(x).reshape(b, t, h, d // h)
        v = self.value(x).reshape(b, t, h, d // h)

        def attention(a: AttentionCall) -> jax.Array:
            scores = jnp.einsum("bqhd,bkhd->bhqk", a.query, a.key).astype(jnp.float32)
            scores = scores * (1.0 / math.sqrt(d // h))
            scores = jnp.where(a.mask[:, None], scores, jnp.finfo(jnp.float32).min)
            probs = _dropout(self.dropout, jax.nn.softmax(scores, axis=-1).astype(a.value.dtype), key)
            return jnp.einsum("bhqk,bkhd->bqhd", probs, a.value)

        out = self.attention_tap(AttentionCall(q, k, v, mask[:, None, :], hidden=x,
                                               project=self._project), attention)
        return out.reshape(b, t, d)

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, n, d = x.shape
        h = self.num_heads
        return self.key(x).reshape(b, n, h, d // h), self.value(x).reshape(b, n, h, d // h)


class DenseOutput(nnx.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: HF's ``BertSelfOutput`` / ``BertOutput``."""

    def __init__(self, cfg: EncoderConfig, din: int, *, role: str, index: int, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dense = _linear(cfg, din, cfg.hidden_size, dtype, param_dtype, rngs)
        self.LayerNorm = _layer_norm(cfg, param_dtype, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
        self.residual = ResidualTap(cfg.hidden_size, role=role, index=index)

    def __call__(self, x: jax.Array, residual: jax.Array, key=None) -> jax.Array:
        y = _dropout(self.dropout, self.dense(x), key)
        return self.residual(Residual(y, residual, lambda h: _norm(self.LayerNorm, h)))


class Attention(nnx.Module):
    """``self`` (the attention) followed by ``output`` (projection, residual, LayerNorm)."""

    def __init__(self, cfg: EncoderConfig, index: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, index, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output = DenseOutput(cfg, cfg.hidden_size, role="attention", index=index, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, key=None) -> jax.Array:
        k1, k2 = _keys(key, 2)
        return self.output(self.self(x, mask, k1), x, k2)


class Intermediate(nnx.Module):
    """The feed-forward expansion ``act(dense(x))``."""

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, dtype, param_dtype,
                             rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.dense(x))


class Layer(nnx.Module):
    """One transformer block: ``attention``, ``intermediate``, ``output``."""

    def __init__(self, cfg: EncoderConfig, index: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.attention = Attention(cfg, index, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.intermediate = Intermediate(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output = DenseOutput(cfg, cfg.intermediate_size, role="ffn", index=index, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, key=None) -> jax.Array:
        k1, k2 = _keys(key, 2)
        h = self.attention(x, mask, k1)
        return self.output(self.intermediate(h), h, k2)


class Stack(nnx.Module):
    """The ``layer`` list (HF's ``BertEncoder``)."""

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                               for i in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array, key=None) -> jax.Array:
        for layer, k in zip(self.layer, _keys(key, len(self.layer)), strict=True):
            x = layer(x, mask, k)
        return x


class Pooler(nnx.Module):
    """``tanh(dense(h[:, 0]))``: BERT's next-sentence pooler."""

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, dtype, param_dtype, rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(h[:, 0]))


class Encoder(nnx.Module):
    """A BERT-family encoder, attribute for attribute HF's ``BertModel`` / ``RobertaModel``.

    Args:
      config: the hyper-parameters.
      param_dtype: dtype of the parameters (float32 or bfloat16).
      dtype: compute dtype; ``None`` uses ``param_dtype``.
      rngs: initialisation RNGs (dropout keys are passed per call instead).

    Example:
      >>> cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
      ...                     num_attention_heads=2, intermediate_size=16)
      >>> out = Encoder(cfg, rngs=nnx.Rngs(0))(jnp.ones((2, 5), jnp.int32))
      >>> out.pooler_output.shape
      (2, 8)
    """

    def __init__(self, config: EncoderConfig, *, param_dtype=jnp.float32, dtype=None,
                 rngs: nnx.Rngs):
        dtype = param_dtype if dtype is None else dtype
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = Embeddings(config, **kw)
        self.encoder = Stack(config, **kw)
        self.pooler = Pooler(config, **kw) if config.add_pooler else None
        self.input_tap = InputTap(features=config.hidden_size, vocab_size=config.vocab_size,
                                  embed_path="embeddings/word_embeddings",
                                  max_positions=config.max_position_embeddings
                                  - config.position_offset)

    def position_ids(self, input_ids: jax.Array, start: int = 0) -> jax.Array:
        """BERT: ``start..start+T-1``. RoBERTa: count of non-pad tokens so far (from
        ``start``), offset by padding_idx."""
        cfg = self.config
        if cfg.model_type in _ROBERTA_LIKE:
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            return (jnp.cumsum(not_pad, axis=1) + start) * not_pad + cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(start, start + input_ids.shape[1], dtype=jnp.int32),
                                input_ids.shape)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 *, dropout_rng: jax.Array | None = None) -> EncoderOutput:
        """Encodes a batch.

        Args:
          input_ids: ``int[B, T]`` token ids.
          attention_mask: ``[B, T]``, 1 (or True) for real tokens; ``None`` means all real.
          token_type_ids: ``int[B, T]`` segment ids; ``None`` means zeros.
          position_ids: ``int[B, T]``; ``None`` derives them as HF does.
          dropout_rng: a PRNG key turns dropout on (training); ``None`` leaves it off.

        Returns:
          :class:`EncoderOutput` with ``last_hidden_state`` ``[B, T, H]`` and
          ``pooler_output`` ``[B, H]`` (``None`` without a pooler).
        """
        mask = (jnp.ones(input_ids.shape, bool) if attention_mask is None
                else attention_mask.astype(bool))
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        k_emb, k_enc = _keys(dropout_rng, 2)
        t = input_ids.shape[1]
        inputs = self.input_tap(Inputs(self.embeddings.word_embeddings(input_ids), mask))
        virtual = inputs.embeds.shape[1] - t  # prompt tokens an input method put in front
        shift = virtual + inputs.offset
        if position_ids is None:
            position_ids = self.position_ids(input_ids, shift)
        else:
            position_ids = jnp.asarray(position_ids, jnp.int32) + shift
        if virtual:  # virtual tokens: positions before the real ones, segment 0
            cfg = self.config
            lead = jnp.arange(inputs.offset, shift, dtype=jnp.int32) + cfg.position_offset
            position_ids = jnp.concatenate(
                [jnp.broadcast_to(lead, (input_ids.shape[0], virtual)), position_ids], axis=1)
            token_type_ids = jnp.concatenate(
                [jnp.zeros((input_ids.shape[0], virtual), token_type_ids.dtype), token_type_ids], axis=1)
        h = self.embeddings(None, token_type_ids, position_ids, k_emb, inputs_embeds=inputs.embeds)
        h = strip_virtual(self.encoder(h, inputs.mask.astype(bool), k_enc), virtual)
        return EncoderOutput(h, None if self.pooler is None else self.pooler(h))


def pool(hidden: jax.Array, attention_mask: jax.Array | None, kind: Pooling = "mean"
         ) -> jax.Array:
    """Pools ``[B, T, H]`` token states into ``[B, H]``: the first token, or a masked mean.

    Example:
      >>> h = jnp.arange(12.0).reshape(1, 3, 4)
      >>> pool(h, jnp.array([[1, 1, 0]]), "mean").tolist()
      [[2.0, 3.0, 4.0, 5.0]]
    """
    if kind == "cls":
        return hidden[:, 0]
    if kind != "mean":
        raise InvalidConfigError(f"pooling {kind!r} is not one of 'cls', 'mean' here")
    if attention_mask is None:
        return hidden.mean(axis=1)
    m = attention_mask.astype(jnp.float32)[..., None]
    total = (hidden.astype(jnp.float32) * m).sum(axis=1)
    return (total / jnp.maximum(m.sum(axis=1), 1e-9)).astype(hidden.dtype)


def sentence_embedding(model: Encoder, input_ids: jax.Array, attention_mask: jax.Array,
                       *, normalize: bool = True) -> jax.Array:
    """Sentence-transformers embedding: masked mean of the last states, L2-normalised.

    Example:
      >>> cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
      ...                     num_attention_heads=2, intermediate_size=16)
      >>> e = sentence_embedding(Encoder(cfg, rngs=nnx.Rngs(0)), jnp.ones((1, 3), jnp.int32),
      ...                        jnp.ones((1, 3), jnp.int32))
      >>> round(float(jnp.linalg.norm(e)), 4)
      1.0
    """
    e = pool(model(input_ids, attention_mask).last_hidden_state, attention_mask, "mean")
    if not normalize:
        return e
    e32 = e.astype(jnp.float32)
    return (e32 / jnp.maximum(jnp.linalg.norm(e32, axis=-1, keepdims=True), 1e-12)).astype(e.dtype)


class EncoderForSequenceClassification(nnx.Module):
    """An encoder (under HF's prefix, ``bert`` or ``roberta``) plus a ``classifier`` Linear.

    ``pooling="pooler"`` feeds the tanh pooler output (HF's ``BertForSequenceClassification``),
    ``"cls"`` the first token, ``"mean"`` the masked mean (what sentence encoders such as MiniLM
    were trained for).

    Example:
      >>> cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
      ...                     num_attention_heads=2, intermediate_size=16)
      >>> m = EncoderForSequenceClassification(cfg, num_labels=3, rngs=nnx.Rngs(0))
      >>> m(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)).shape
      (2, 3)
    """

    def __init__(self, config: EncoderConfig, *, num_labels: int, pooling: Pooling = "mean",
                 classifier_dropout: float | None = None, param_dtype=jnp.float32, dtype=None,
                 rngs: nnx.Rngs):
        if pooling not in ("cls", "mean", "pooler"):
            raise InvalidConfigError(f"pooling must be 'cls', 'mean' or 'pooler', got {pooling!r}")
        if pooling == "pooler" and not config.add_pooler:
            raise InvalidConfigError("pooling='pooler' needs a model with a pooler "
                                     "(add_pooler=True); use 'cls' or 'mean'")
        if num_labels < 1:
            raise InvalidConfigError(f"num_labels must be >= 1, got {num_labels}")
        dtype = param_dtype if dtype is None else dtype
        self.base_model_prefix = config.base_model_prefix
        self.pooling = pooling
        setattr(self, self.base_model_prefix,
                Encoder(config, param_dtype=param_dtype, dtype=dtype, rngs=rngs))
        rate = config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        self.dropout = nnx.Dropout(rate)
        self.classifier = _linear(config, config.hidden_size, num_labels, dtype, param_dtype,
                                  rngs)

    @property
    def backbone(self) -> Encoder:
        """The encoder (``self.bert`` or ``self.roberta``)."""
        return getattr(self, self.base_model_prefix)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Returns ``[B, num_labels]`` logits; arguments as :meth:`Encoder.__call__`."""
        k_enc, k_head = _keys(dropout_rng, 2)
        out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                            dropout_rng=k_enc)
        if self.pooling == "pooler":
            feats = out.pooler_output
        else:
            feats = pool(out.last_hidden_state, attention_mask, self.pooling)
        return self.classifier(_dropout(self.dropout, feats, k_head))


# --- loading ---------------------------------------------------------------------------------
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _canonical(name: str, prefix: str) -> str:
    """HF tensor name without the task-model prefix, with old gamma/beta LayerNorm names."""
    if name.startswith(prefix + "."):
        name = name[len(prefix) + 1:]
    if name.endswith(".gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith(".beta"):
        name = name[: -len("beta")] + "bias"
    return name


def _variables(model: nnx.Module, prefix: str) -> dict[str, tuple[nnx.Variable, bool]]:
    """Canonical HF name -> (variable, is_kernel) for every parameter of ``model``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            parts = [str(p) for p in path]
            if parts and parts[0] == prefix:
                parts = parts[1:]
            name = ".".join(parts[:-1] + [_LEAF_TO_HF[parts[-1]]])
            out[name] = (node, parts[-1] == "kernel")
    return out


def load_encoder(name_or_path: str | os.PathLike, dtype: Any = None, *,
                 num_labels: int | None = None, pooling: Pooling = "mean",
                 seed: int = 0) -> Encoder | EncoderForSequenceClassification:
    """Loads a BERT-family encoder from an HF-layout directory (or a known name).

    Weights stream in tensor by tensor (peak host memory about one model in ``dtype`` plus one
    tensor). torch ``Linear`` weights ``(out, in)`` become flax kernels ``(in, out)``. Task-model
    prefixes (``bert.``, ``roberta.``) and old ``gamma``/``beta`` names are accepted; extra
    tensors (MLM heads, ``position_ids`` buffers) are ignored.

    Args:
      name_or_path: a directory with ``config.json`` + safetensors, or a registry name such as
        ``"minilm-l6"``.
      dtype: parameter dtype ("float32", "bfloat16", ...); ``None`` keeps the stored dtype.
      num_labels: ``None`` returns the bare :class:`Encoder`; an int returns an
        :class:`EncoderForSequenceClassification` whose ``classifier`` comes from the checkpoint
        when it holds a matching ``classifier.weight``, else is freshly initialised from
        ``seed``.
      pooling: the classifier's pooling (see :class:`EncoderForSequenceClassification`).
      seed: seeds the fresh classifier head.

    Returns:
      The model, with ``model.config`` (or ``model.backbone.config``) set.

    Raises:
      CheckpointError: missing directory/config/weights, a truncated file, a missing tensor, or a
        tensor whose shape disagrees with the config (the first such tensor is named).
      UnsupportedArchitectureError: the config is not a BERT-family encoder.

    Example:
      >>> model = load_encoder("minilm-l6")  # doctest: +SKIP
      >>> model.config.hidden_size  # doctest: +SKIP
      384
    """
    path = _as_path(name_or_path)
    hf_config = checkpoint_files.read_config(path)
    target = checkpoint_files.resolve_dtype(dtype)
    specs = checkpoint_files.tensor_specs(path)
    cfg = EncoderConfig.from_hf(hf_config)
    prefix = cfg.base_model_prefix
    names = {_canonical(n, prefix): n for n in specs}
    cfg = dataclasses.replace(cfg, add_pooler="pooler.dense.weight" in names)
    if target is None:  # keep the stored dtype of the word embeddings
        target = specs[names["embeddings.word_embeddings.weight"]][1] if (
            "embeddings.word_embeddings.weight" in names) else np.dtype(np.float32)
    param_dtype = jnp.dtype(target)

    def build():
        rngs = nnx.Rngs(seed)
        if num_labels is None:
            return Encoder(cfg, param_dtype=param_dtype, rngs=rngs)
        return EncoderForSequenceClassification(cfg, num_labels=num_labels, pooling=pooling,
                                                param_dtype=param_dtype, rngs=rngs)

    model = nnx.eval_shape(build)
    wanted = _variables(model, prefix)
    optional = {n for n in wanted if n.startswith("classifier.")}
    _check_shapes(path, cfg, wanted, names, specs)
    missing = [n for n in wanted if n not in names and n not in optional]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensors the {cfg.model_type} config needs, e.g. "
            f"{missing[:5]}; is this a complete {cfg.model_type} checkpoint?"
        )
    by_file_name = {names[n]: n for n in wanted if n in names}
    for file_name, array in checkpoint_files.iter_tensors(path, target):
        canonical = by_file_name.get(file_name)
        if canonical is None:
            continue
        var, is_kernel = wanted.pop(canonical)
        var.set_value(jnp.asarray(array.T if is_kernel else array))
        del array
    if wanted:  # only the optional head is left: initialise it as HF does
        model.classifier = _linear(cfg, cfg.hidden_size, num_labels, param_dtype, param_dtype,
                                   nnx.Rngs(seed))
        log.info("%s has no matching classifier head; initialised one for %s labels", path,
                 num_labels)
    return model


def _check_shapes(path, cfg, wanted, names, specs) -> None:
    file_order = {n: i for i, n in enumerate(specs)}
    for canonical in sorted((n for n in wanted if n in names), key=lambda n: file_order[names[n]]):
        var, is_kernel = wanted[canonical]
        expected = tuple(var.get_value().shape)
        if is_kernel:
            expected = expected[::-1]
        found = specs[names[canonical]][0]
        if found != expected:
            if canonical.startswith("classifier."):  # a different head: start a fresh one
                names.pop(canonical)
                continue
            raise CheckpointError(
                f"tensor {names[canonical]!r} in {path} has shape {found} but config.json "
                f"implies {expected} (hidden_size={cfg.hidden_size}, "
                f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}); "
                "the config and the weights do not belong together"
            )


def _as_path(name_or_path: str | os.PathLike) -> str | os.PathLike:
    if os.path.exists(name_or_path):
        return name_or_path
    from peft_jax.models import registry  # noqa: PLC0415 (registry imports nothing heavy)

    if isinstance(name_or_path, str) and name_or_path in registry.known_names():
        return registry.resolve(name_or_path).path
    return name_or_path  # read_config raises a CheckpointError that names it
