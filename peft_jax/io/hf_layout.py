"""Our reference models in the Hugging Face layout: tensor names, torch layouts and ``config.json``.

The reverse of the loaders (`peft_jax.models.decoder_load`, `peft_jax.models.encoder.load_encoder`):
`hf_tensors` gives every parameter of a plain (adapter-free) `Decoder`, `Encoder` or
`EncoderForSequenceClassification` under its HF name, with flax ``(in, out)`` kernels transposed
back to torch ``(out, in)`` weights; a tied decoder has no ``lm_head.weight``. The loaded models
already hold HF conventions (GGUF Q/K rows are un-permuted, Gemma's ``w + 1`` norms undone at load),
so nothing else changes. `hf_config` rebuilds a ``config.json`` dict from the model's config and
checks that it reads back to the same config.

Example:
    >>> from flax import nnx
    >>> from peft_jax.models.decoder import Decoder, DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                     num_heads=2, num_kv_heads=1, head_dim=4, tie_embeddings=True)
    >>> tensors = hf_tensors(Decoder(cfg, rngs=nnx.Rngs(0)))
    >>> tensors["model.layers.0.self_attn.k_proj.weight"].shape, "lm_head.weight" in tensors
    ((4, 8), False)
    >>> hf_config(Decoder(cfg, rngs=nnx.Rngs(0)))["architectures"]
    ['LlamaForCausalLM']
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax import errors
from peft_jax.models import decoder_load
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import FULL, SLIDING, DecoderConfig
from peft_jax.models.encoder import _LEAF_TO_HF, Encoder, EncoderConfig, EncoderForSequenceClassification

__all__ = ["config_of", "decoder_hf_config", "dtype_name", "encoder_hf_config", "hf_architectures", "hf_config",
           "hf_tensors", "same_config"]

_CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_ENCODER_CLASS = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}
#: positions written when nothing says how long the model's context is (a GGUF's
#: ``context_length`` or the source ``config.json`` override it).
DEFAULT_MAX_POSITIONS = 2048


def _unsupported(model: Any) -> errors.UnsupportedArchitectureError:
    return errors.UnsupportedArchitectureError(
        f"{type(model).__name__} has no Hugging Face layout here: merged export writes the reference "
        "Decoder, Encoder and EncoderForSequenceClassification; for another model save the adapter "
        "with peft_jax.save_adapter instead")


def config_of(model: Any) -> DecoderConfig | EncoderConfig:
    """The `DecoderConfig` / `EncoderConfig` of a reference model (a classifier's backbone's)."""
    if isinstance(model, Decoder):
        return model.config
    if isinstance(model, Encoder):
        return model.config
    if isinstance(model, EncoderForSequenceClassification):
        return model.backbone.config
    raise _unsupported(model)


# --- tensors -----------------------------------------------------------------------------------------
def hf_tensors(model: Any) -> dict[str, jax.Array]:
    """HF tensor name -> array in the torch layout, for a plain reference model (no adapter
    wrappers: `peft_jax.nnx.unload` it first). Arrays stay on the device; no copy is made.

    Raises:
        UnsupportedArchitectureError: not a reference model, or it holds a parameter the HF
            class does not have (named).
    """
    if isinstance(model, Decoder):
        return _decoder_tensors(model)
    if isinstance(model, (Encoder, EncoderForSequenceClassification)):
        return _encoder_tensors(model)
    raise _unsupported(model)


def _params(model: nnx.Module) -> list[tuple[tuple[str, ...], jax.Array]]:
    return [(tuple(str(p) for p in path), var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _decoder_tensors(model: Decoder) -> dict[str, jax.Array]:
    expected = decoder_load.hf_tensor_shapes(model.config)
    out = {}
    for path, value in _params(model):
        name, transposed = decoder_load._hf_name(path)
        value = value.T if transposed else value
        if expected.get(name) != tuple(value.shape):
            raise errors.UnsupportedArchitectureError(
                f"parameter {'/'.join(path)} (HF {name!r}, shape {tuple(value.shape)}) is not part of a "
                f"{model.config.model_type} checkpoint of this config; unload every adapter wrapper "
                "(peft_jax.nnx.unload) before taking the HF layout")
        out[name] = value
    missing = sorted(set(expected) - set(out))
    if missing:
        raise errors.UnsupportedArchitectureError(f"the model lacks HF tensors {missing[:3]}; is it a full Decoder?")
    return out


def _encoder_tensors(model: nnx.Module) -> dict[str, jax.Array]:
    out = {}
    for path, value in _params(model):
        if path[-1] not in _LEAF_TO_HF:
            raise errors.UnsupportedArchitectureError(
                f"parameter {'/'.join(path)} has no HF counterpart; unload every adapter wrapper "
                "(peft_jax.nnx.unload) before taking the HF layout")
        out[".".join([*path[:-1], _LEAF_TO_HF[path[-1]]])] = value.T if path[-1] == "kernel" else value
    return out


# --- config.json -------------------------------------------------------------------------------------
def hf_config(model: Any, *, max_positions: int | None = None) -> dict[str, Any]:
    """A ``config.json`` dict for a reference model, checked to read back to its config.

    Raises:
        UnsupportedArchitectureError: the config has a feature ``config.json`` cannot express
            (llama.cpp per-frequency RoPE factors, ...) or the model is not a reference model;
            pass the original HF directory as the export ``source`` then.
    """
    if isinstance(model, Decoder):
        return decoder_hf_config(model.config, max_positions=max_positions)
    if isinstance(model, Encoder):
        return encoder_hf_config(model.config)
    if isinstance(model, EncoderForSequenceClassification):
        return encoder_hf_config(model.backbone.config, num_labels=int(model.classifier.kernel.shape[1]))
    raise _unsupported(model)


def hf_architectures(model: Any) -> list[str]:
    """The ``architectures`` entry of ``config.json``: the transformers class that loads ``model``.

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> hf_architectures(nnx.eval_shape(lambda: Decoder(reference_config(), rngs=nnx.Rngs(0))))
        ['LlamaForCausalLM']
    """
    config = config_of(model)
    if isinstance(model, Decoder):
        return [_CAUSAL_LM[config.model_type]]
    head = "ForSequenceClassification" if isinstance(model, EncoderForSequenceClassification) else "Model"
    return [_ENCODER_CLASS[config.model_type] + head]


def _rope(config: DecoderConfig) -> dict[str, Any] | None:
    s = config.rope_scaling
    if s is None:
        return None
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    if s.kind == "llama3":
        return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_positions}
    raise errors.UnsupportedArchitectureError(
        f"RoPE scaling {s.kind!r} (from a GGUF's rope_freqs tensor) has no config.json form; pass the "
        "original HF directory as source= so its config.json is copied")


def decoder_hf_config(config: DecoderConfig, *, max_positions: int | None = None) -> dict[str, Any]:
    """``config.json`` for a `DecoderConfig` (the reverse of `DecoderConfig.from_hf`).

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> decoder_hf_config(reference_config())["num_key_value_heads"]
        8
    """
    c = config
    eos = list(c.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [_CAUSAL_LM[c.model_type]], "model_type": c.model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": _rope(c), "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": int(max_positions or DEFAULT_MAX_POSITIONS),
        "hidden_act": "silu" if c.mlp_activation == "silu" else "gelu_pytorch_tanh",
        "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": c.pad_token_id,
    }
    if c.model_type in ("llama", "mistral", "qwen3"):
        hf["attention_bias"] = c.attention_bias
    if c.model_type in ("llama", "mistral"):
        hf["mlp_bias"] = c.mlp_bias
    if c.model_type == "mistral":
        hf["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen3"):
        sliding = [i for i, t in enumerate(c.layer_types) if t == SLIDING]
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  max_window_layers=sliding[0] if sliding else c.num_layers,
                  layer_types=list(c.layer_types) or [FULL] * c.num_layers)
    if c.model_type == "gemma3_text":
        del hf["hidden_act"]
        hf.update(hidden_activation="gelu_pytorch_tanh", attention_bias=c.attention_bias,
                  rope_local_base_freq=c.rope_local_theta, sliding_window=c.sliding_window,
                  layer_types=list(c.layer_types), query_pre_attn_scalar=c.query_pre_attn_scalar,
                  final_logit_softcapping=c.final_logit_softcap, attn_logit_softcapping=None)
    _check_round_trip(DecoderConfig.from_hf(hf), config)
    return hf


def encoder_hf_config(config: EncoderConfig, *, num_labels: int | None = None) -> dict[str, Any]:
    """``config.json`` for an `EncoderConfig`; with ``num_labels``, for the HF sequence classifier.

    Example:
        >>> cfg = EncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=16)
        >>> encoder_hf_config(cfg, num_labels=2)["architectures"]
        ['BertForSequenceClassification']
    """
    hf = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "add_pooler"}
    head = "Model" if num_labels is None else "ForSequenceClassification"
    hf.update(architectures=[_ENCODER_CLASS[config.model_type] + head], position_embedding_type="absolute")
    if num_labels is not None:
        hf.update(id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(num_labels)})
    _check_round_trip(dataclasses.replace(EncoderConfig.from_hf(hf), add_pooler=config.add_pooler), config)
    return hf


def _check_round_trip(read: Any, config: Any) -> None:
    bad = same_config(read, config)
    if bad:
        raise errors.UnsupportedArchitectureError(
            f"config.json cannot express this model's {', '.join(bad)}; pass the original HF directory as "
            "source= so its config.json is copied")


def same_config(read: Any, config: Any) -> list[str]:
    """The fields on which ``read`` (from a source's config) and ``config`` differ (``remat`` and
    the encoder's ``add_pooler`` are ignored).

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> same_config(reference_config(), dataclasses.replace(reference_config(), remat=None))
        []
    """
    ignore = {"remat", "add_pooler"}
    return [f.name for f in dataclasses.fields(config)
            if f.name not in ignore and getattr(read, f.name) != getattr(config, f.name)]


def dtype_name(dtype: Any) -> str:
    """The torch dtype name HF writes in ``config.json`` for a numpy / JAX dtype.

    Example:
        >>> dtype_name(jnp.float32), dtype_name("bfloat16")
        ('float32', 'bfloat16')
    """
    return jnp.dtype(dtype).name
