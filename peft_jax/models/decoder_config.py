"""Configuration of the reference decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 3 text).

One frozen dataclass describes every supported decoder; :meth:`DecoderConfig.from_hf` reads an HF
``config.json`` dict (old ``rope_theta``/``rope_scaling`` keys and the newer ``rope_parameters``).

Example:
    >>> cfg = DecoderConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> cfg.head_dim, cfg.num_kv_heads
    (8, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peft_jax.errors import InvalidConfigError, UnsupportedArchitectureError
from peft_jax.models.rope import RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
#: ``DecoderConfig.remat`` values: what each decoder layer keeps for the backward pass.
#: ``None`` keeps everything XLA wants; ``"full"`` keeps only each layer's input and recomputes
#: the layer in the backward pass; ``"projections"`` keeps the outputs of the full-rank
#: projection matmuls (q, k, v, o, gate, up, down; LoRA's narrow ``x @ A`` too) and recomputes
#: attention (scores, softmax, ``P V``), norms, RoPE, activations and LoRA's ``(x A) B``;
#: ``"dots"`` / ``"dots_no_batch"`` are JAX's ``dots_saveable`` /
#: ``dots_with_no_batch_dims_saveable`` (every matmul output / every non-batched one).
REMAT_POLICIES = (None, "full", "projections", "dots", "dots_no_batch")
ACTIVATIONS = ("silu", "gelu_tanh")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of :class:`peft_jax.models.decoder.Decoder`.

    Attributes:
        vocab_size: Number of tokens.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the gated MLP.
        num_layers: Number of decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention when fewer than ``num_heads``).
        head_dim: Size of one head (need not equal ``hidden_size // num_heads``).
        rope_theta: RoPE base of global (full-attention) layers.
        rope_scaling: Optional RoPE rescaling of global layers (Llama 3, Gemma 3 linear).
        rms_norm_eps: Epsilon of every RMSNorm.
        tie_embeddings: Use the token embedding as the output head (no ``lm_head``).
        attention_bias: Bias on q/k/v projections (Qwen2; Llama's ``attention_bias``).
        attention_out_bias: Bias on the output projection (Llama's ``attention_bias``).
        mlp_bias: Bias on the MLP projections (Llama's ``mlp_bias``).
        qk_norm: RMSNorm over ``head_dim`` on queries and keys before RoPE (Qwen3, Gemma 3).
        norm_offset: Norms scale by ``norm_offset + weight`` (1.0 for Gemma's ``1 + w``).
        embed_scale: Multiply token embeddings by ``sqrt(hidden_size)`` (Gemma).
        sliding_window: Window of sliding-window layers (keys with ``q - k < window`` are seen).
        layer_types: Per layer ``"full_attention"`` or ``"sliding_attention"``; empty means every
            layer slides when ``sliding_window`` is set (Mistral) and none does otherwise.
        rope_local_theta: RoPE base of sliding layers (Gemma 3); ``None`` means ``rope_theta``.
        attn_logit_softcap: ``c * tanh(s / c)`` on attention scores when set.
        final_logit_softcap: ``c * tanh(z / c)`` on output logits when set.
        query_pre_attn_scalar: Scores are scaled by ``query_pre_attn_scalar ** -0.5`` when set,
            else by ``head_dim ** -0.5``.
        mlp_activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, Gemma).
        sandwich_norms: Gemma's extra norms: attention and MLP outputs are normalized before the
            residual add (``post_attention_layernorm``, ``post_feedforward_layernorm``) and the MLP
            input by ``pre_feedforward_layernorm``.
        remat: Per-layer rematerialization when training (one of :data:`REMAT_POLICIES`): trades
            recomputation in the backward pass for activation memory. Not an architecture field:
            it changes no result, only what is stored; ``Decoder(..., remat=)`` overrides it.
            The default, ``"projections"``, is also the fastest on CPU (the recomputed elementwise
            work costs less than writing and re-reading what it replaces); ``"full"`` saves the
            most memory for about 15% more step time; ``None`` keeps everything. Remat makes a
            training forward reverse-mode only (``jax.jvp`` through it needs ``remat=None``).
        model_type: HF ``model_type`` this config came from (informational).
        bos_token_id: Beginning-of-sequence token, if known.
        eos_token_ids: End-of-sequence tokens (default stop tokens of generation).
        pad_token_id: Padding token, if known.

    Example:
        >>> DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
        ...               num_heads=2, num_kv_heads=1, head_dim=4).num_groups
        2
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    embed_scale: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    mlp_activation: str = "silu"
    sandwich_norms: bool = False
    remat: str | None = "projections"
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise InvalidConfigError(f"DecoderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise InvalidConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.mlp_activation not in ACTIVATIONS:
            raise InvalidConfigError(f"mlp_activation must be one of {ACTIVATIONS}, got {self.mlp_activation!r}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise InvalidConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers; "
                "give one per layer or leave it empty"
            )
        bad = sorted(set(self.layer_types) - {FULL, SLIDING})
        if bad:
            raise InvalidConfigError(f"layer_types entries must be {FULL!r} or {SLIDING!r}, got {bad}")
        if self.remat not in REMAT_POLICIES:
            raise InvalidConfigError(f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise InvalidConfigError(f"sliding_window must be > 0 or None, got {self.sliding_window}")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (``None`` for global attention).

        Example:
            >>> reference_config().layer_window(0) is None
            True
        """
        if self.sliding_window is None:
            return None
        if not self.layer_types or self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """RoPE ``(theta, scaling)`` of ``layer``: local base for sliding layers when set."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @classmethod
    def reference(cls) -> DecoderConfig:
        """Same as :func:`reference_config` (the benchmark model).

        Example:
            >>> DecoderConfig.reference().num_layers
            8
        """
        return reference_config()

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        """Build a config from an HF ``config.json`` dict.

        Args:
            hf: The parsed ``config.json`` (``model_type`` one of :data:`SUPPORTED_MODEL_TYPES`).

        Returns:
            The matching :class:`DecoderConfig`.

        Raises:
            UnsupportedArchitectureError: For another ``model_type`` or an unsupported option
                (e.g. a RoPE type other than default/linear/llama3).

        Example:
            >>> DecoderConfig.from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
            ...     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            ...     "num_key_value_heads": 2}).attention_bias
            True
        """
        return _from_hf(hf)


def reference_config() -> DecoderConfig:
    """The benchmark decoder: hidden 512, 8 layers, 8 heads (8 KV heads), FFN 1408, vocab 8192.

    Benchmarks run it in fp32 with an untied head, at sequence length 256 and batch 8.

    Example:
        >>> reference_config().hidden_size
        512
    """
    return DecoderConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
        num_kv_heads=8, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False,
    )


# --- HF config.json parsing ------------------------------------------------------------------------
def _rope_from_hf(params: dict[str, Any] | None, theta_default: float, model_type: str) -> tuple[float, RopeScaling | None]:
    params = dict(params or {})
    theta = float(params.get("rope_theta", theta_default))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedArchitectureError(
        f"{model_type}: rope type {kind!r} is not supported (supported: default, linear, llama3); "
        "convert the checkpoint or remove rope scaling from config.json"
    )


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _from_hf(hf: dict[str, Any]) -> DecoderConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = model_type or (hf.get("architectures") or ["<no model_type>"])[0]
        hint = ""
        if model_type == "gemma3" and "text_config" in hf:
            hint = ("; this is the multimodal Gemma 3 checkpoint: use a text-only (gemma3_text) "
                    "checkpoint or its GGUF")
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported by the reference decoder; supported model_type "
            f"values: {', '.join(SUPPORTED_MODEL_TYPES)}{hint}"
        )
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        common = dict(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), model_type=model_type,
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise InvalidConfigError(f"{model_type} config.json lacks required key {e.args[0]!r}") from None
    default_act = "gelu_pytorch_tanh" if model_type == "gemma3_text" else "silu"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or default_act
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling")

    if model_type == "gemma3_text":
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedArchitectureError("gemma3_text with use_bidirectional_attention is not supported")
        nested = isinstance(rope_params, dict) and FULL in rope_params
        global_params = (rope_params or {}).get(FULL) if nested else rope_params
        local_params = (rope_params or {}).get(SLIDING) if nested else None
        theta, scaling = _rope_from_hf(global_params, float(hf.get("rope_theta", 1_000_000.0)), model_type)
        local_theta, local_scaling = _rope_from_hf(
            local_params, float(hf.get("rope_local_base_freq", 10_000.0)), model_type)
        if local_scaling is not None:
            raise UnsupportedArchitectureError("gemma3_text: RoPE scaling of sliding layers is not supported")
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        layer_types = tuple(hf.get("layer_types") or [
            SLIDING if (i + 1) % pattern else FULL for i in range(common["num_layers"])])
        qpas = hf.get("query_pre_attn_scalar", 256)
        return DecoderConfig(
            **common, rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            attention_bias=bool(hf.get("attention_bias", False)),
            attention_out_bias=bool(hf.get("attention_bias", False)), qk_norm=True, norm_offset=1.0,
            embed_scale=True, sliding_window=hf.get("sliding_window", 4096), layer_types=layer_types,
            # HF's Gemma 3 reads but never applies attn_logit_softcapping (Gemma 3 dropped it).
            attn_logit_softcap=None,
            final_logit_softcap=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=None if qpas is None else float(qpas),
            mlp_activation=_activation(act, model_type), sandwich_norms=True,
        )

    theta, scaling = _rope_from_hf(rope_params, float(hf.get("rope_theta", 10000.0)), model_type)
    tie = bool(hf.get("tie_word_embeddings", False))
    activation = _activation(act, model_type)
    if model_type in ("llama", "mistral"):
        bias = bool(hf.get("attention_bias", False))
        return DecoderConfig(
            **common, rope_theta=theta, rope_scaling=scaling, tie_embeddings=tie, attention_bias=bias,
            attention_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)), mlp_activation=activation,
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        )
    # qwen2 / qwen3: sliding layers only when use_sliding_window, from max_window_layers on.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = tuple(hf.get("layer_types") or [
        SLIDING if window is not None and i >= int(hf.get("max_window_layers", 28)) else FULL
        for i in range(common["num_layers"])])
    qwen3 = model_type == "qwen3"
    bias = bool(hf.get("attention_bias", False)) if qwen3 else True
    return DecoderConfig(
        **common, rope_theta=theta, rope_scaling=scaling, tie_embeddings=tie, attention_bias=bias,
        attention_out_bias=bias if qwen3 else False, qk_norm=qwen3, mlp_activation=activation,
        sliding_window=window, layer_types=layer_types,
    )


def _activation(name: str, model_type: str) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return "gelu_tanh"
    raise UnsupportedArchitectureError(
        f"{model_type}: MLP activation {name!r} is not supported (supported: silu, gelu_pytorch_tanh)"
    )
