"""Build a :class:`~peft_jax.models.decoder.Decoder` from HF-named tensors, tensor by tensor.

The model is first created abstractly (``nnx.eval_shape``: no memory, no random init), then each
checkpoint tensor is checked against the shape the config implies, converted (torch ``Linear``
``[out, in]`` weights become flax ``[in, out]`` kernels) and placed, so peak host memory stays near
the model's size in the target dtype plus one tensor. :func:`load_decoder` reads an HF-layout
directory or a ``.gguf`` file.

Example:
    >>> import json, pathlib, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> hf = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
    ...       "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": True}
    >>> _ = (d / "config.json").write_text(json.dumps(hf))
    >>> shapes = hf_tensor_shapes(DecoderConfig.from_hf(hf))
    >>> save_file({k: np.ones(s, np.float32) for k, s in shapes.items()}, str(d / "model.safetensors"))
    >>> model, config = load_decoder(d)
    >>> model(np.array([[1, 2]])).shape
    (1, 2, 16)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.errors import CheckpointError
from peft_jax.models import checkpoint_files
from peft_jax.models.decoder import Decoder
from peft_jax.models.decoder_config import DecoderConfig

# Tensors some exporters write that the model recomputes or ties.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """NNX parameter path -> (HF tensor name, whether the HF tensor is the transposed kernel)."""
    *module, leaf = (str(p) for p in path)
    hf_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
    prefix = "" if module[0] == "lm_head" else "model."
    return prefix + ".".join([*module, hf_leaf]), leaf == "kernel"


def _abstract(config: DecoderConfig, dtype: Any) -> Decoder:
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))


def abstract_decoder(config: DecoderConfig, dtype: Any = jnp.float32) -> Decoder:
    """A :class:`Decoder` whose parameters are shape/dtype placeholders (nothing allocated).

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> abstract_decoder(reference_config()).lm_head.kernel.shape
        (512, 8192)
    """
    return _abstract(config, dtype)


def hf_tensor_shapes(config: DecoderConfig, model: Decoder | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (torch layout) that a checkpoint of ``config`` must have.

    Pass ``model`` (e.g. from :func:`abstract_decoder`) to skip building an abstract one.

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> hf_tensor_shapes(reference_config())["model.layers.0.self_attn.q_proj.weight"]
        (512, 512)
    """
    shapes = {}
    model = _abstract(config, jnp.float32) if model is None else model
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(path)
        shape = tuple(var.get_value().shape)
        shapes[name] = shape[::-1] if transposed else shape
    return shapes


def check_shapes(config: DecoderConfig, found: dict[str, tuple[int, ...]], source: str,
                 model: Decoder | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``found`` (name -> shape) fits ``config``.

    Names the first tensor whose shape disagrees, then lists missing and unexpected tensors.

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> check_shapes(reference_config(), hf_tensor_shapes(reference_config()), "ok")
    """
    expected = hf_tensor_shapes(config, model)
    for name, shape in found.items():
        if name in expected and tuple(shape) != expected[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(shape)} but its config implies "
                f"{expected[name]}; the weights do not belong to this config.json (check "
                "hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size, "
                "vocab_size)"
            )
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) the config needs are missing, first {missing[:5]}; "
            "the checkpoint is incomplete or was saved for a different architecture"
        )
    extra = [n for n in found if n not in expected and not _ignorable(n, config)]
    if extra:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {extra[:5]} that a {config.model_type} config does not "
            "use (e.g. biases or norms of another architecture); check model_type in config.json"
        )


def _ignorable(name: str, config: DecoderConfig) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or (config.tie_embeddings and name == "lm_head.weight")


def build_decoder(config: DecoderConfig, tensors: Iterable[tuple[str, np.ndarray]], *,
                  dtype: Any = jnp.float32, source: str = "checkpoint",
                  model: Decoder | None = None) -> Decoder:
    """A :class:`Decoder` whose parameters come from HF-named ``(name, array)`` pairs.

    Arrays are consumed one at a time (a generator keeps peak memory low). Shapes must already
    have been checked with :func:`check_shapes`; a mismatch here still raises.

    Args:
        config: The model config.
        tensors: ``(HF tensor name, numpy array)`` pairs in the HF (torch) layout and conventions.
        dtype: Parameter and compute dtype.
        source: Shown in error messages (a path).
        model: An unfilled :func:`abstract_decoder` of ``config`` in ``dtype`` to fill (saves
            building one).

    Returns:
        The populated model.

    Raises:
        CheckpointError: A tensor is missing or has a wrong shape.

    Example:
        >>> from peft_jax.models.decoder_config import reference_config
        >>> cfg = reference_config()
        >>> arrays = ((n, np.zeros(s, np.float32)) for n, s in hf_tensor_shapes(cfg).items())
        >>> build_decoder(cfg, arrays).config.hidden_size
        512
    """
    model = _abstract(config, dtype) if model is None else model
    targets = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(path)
        targets[name] = (var, transposed)
    filled = set()
    for name, array in tensors:
        if name not in targets:
            continue
        var, transposed = targets[name]
        want = tuple(var.get_value().shape)
        got = array.shape[::-1] if transposed else array.shape
        if tuple(got) != want:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {array.shape}, expected "
                f"{want[::-1] if transposed else want} from the config")
        host = np.ascontiguousarray(array.T if transposed else array, dtype=np.dtype(dtype))
        del array  # one host copy alive at a time; device_put copies once (jnp.asarray may twice)
        var.set_value(jax.device_put(host))
        del host
        filled.add(name)
    missing = [n for n in targets if n not in filled]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}; the checkpoint is incomplete")
    return model


def load_hf_decoder(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[Decoder, DecoderConfig]:
    """Load an HF-layout directory (``config.json`` + ``model.safetensors`` or a sharded index).

    Shapes are checked against ``config.json`` from the safetensors headers before any tensor
    data is read. ``dtype=None`` keeps the stored floating dtype.

    Example:
        >>> # model, config = load_hf_decoder("path/to/llama_dir", dtype=jnp.bfloat16)
    """
    hf = checkpoint_files.read_config(path)
    config = DecoderConfig.from_hf(hf)
    specs = checkpoint_files.tensor_specs(path)
    target = checkpoint_files.resolve_dtype(dtype)
    if target is None:
        stored = [d for _, d in specs.values() if np.issubdtype(d, np.floating)]
        target = stored[0] if stored else np.dtype(np.float32)
    model = _abstract(config, jnp.dtype(target))
    check_shapes(config, {n: s for n, (s, _) in specs.items()}, str(path), model)
    stream = checkpoint_files.iter_tensors(path, target)
    model = build_decoder(config, stream, dtype=jnp.dtype(target), source=str(path), model=model)
    return model, config


def load_decoder(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[Decoder, DecoderConfig]:
    """Load a reference decoder from an HF-layout directory or a ``.gguf`` file.

    Args:
        path: A directory with ``config.json`` and safetensors weights, or a GGUF file
            (dequantized; see :mod:`peft_jax.models.gguf`).
        dtype: Parameter and compute dtype (``jnp.float32``, ``jnp.bfloat16``, a name such as
            ``"bf16"``, or ``None``: the stored dtype of a safetensors checkpoint, float32 for GGUF).

    Returns:
        ``(model, config)``.

    Raises:
        CheckpointError: Missing, truncated or inconsistent files (the first bad tensor is named).
        UnsupportedArchitectureError: ``model_type`` is not one the decoder implements.

    Example:
        >>> # model, config = load_decoder("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    p = Path(path)
    if p.suffix.lower() == ".gguf" or (p.is_file() and _is_gguf(p)):
        from peft_jax.models.gguf import load_gguf_decoder

        return load_gguf_decoder(p, dtype=dtype)
    return load_hf_decoder(p, dtype=dtype)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
