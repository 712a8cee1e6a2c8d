"""Merged export: fold the adapters into a copy of the base and write an HF checkpoint
``transformers`` loads with ``from_pretrained``.

`export_merged` takes an adapted reference model (`peft_jax.models.decoder.Decoder` for LLaMA /
Mistral / Qwen2 / Qwen3 / Gemma 3 text, `peft_jax.models.encoder.Encoder` for BERT / RoBERTa /
XLM-R, or a BERT `EncoderForSequenceClassification` with ``pooling="pooler"``), merges its
active adapters into a clone (the caller's model is left exactly as it was) and writes, atomically:

* ``config.json``: the source directory's own, when ``source`` is an HF directory (its dtype and,
  for a classifier, its labels updated); rebuilt from the model's config for a GGUF source or none;
* ``model.safetensors`` (metadata ``{"format": "pt"}``), or ``model-0000i-of-0000N.safetensors``
  shards plus ``model.safetensors.index.json`` when the weights exceed ``max_shard_size``;
  HF tensor names and torch layouts (`peft_jax.io.hf_layout`), a tied ``lm_head`` not written;
* the tokenizer files (and ``generation_config.json``) of a source directory. A GGUF's tokenizer
  lives in its metadata and is not converted: load it with
  ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``.

`export_base` writes the base the same way, without the adapters.

Example:
    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> import peft_jax
    >>> from peft_jax.models.decoder import Decoder, DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                     num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
    >>> _ = peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q_proj"], rank=2), rngs=nnx.Rngs(1))
    >>> out = export_merged(model, pathlib.Path(tempfile.mkdtemp()) / "merged")
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'model.safetensors']
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax import errors
from peft_jax.io import hf_layout
from peft_jax.io.atomic import atomic_directory
from peft_jax.io.saving import refuse_non_empty
from peft_jax.io.tensor_files import write_tensors

__all__ = ["INDEX_FILE", "TOKENIZER_FILES", "WEIGHTS_FILE", "export_base", "export_merged", "parse_size",
           "plan_shards"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: files copied from a source HF directory when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def export_merged(model: nnx.Module, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                  dtype: Any = None, max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Writes ``model`` with its active adapters merged as an HF checkpoint in ``out_dir``.

    Args:
        model: an adapted NNX reference model (see the module docstring); not changed.
        out_dir: the directory to write (replaced atomically).
        source: the HF directory or ``.gguf`` file (or registry name) the base was loaded from:
            its ``config.json`` and tokenizer files are copied from a directory, and it is
            checked to describe the same model. Without it ``config.json`` is rebuilt.
        dtype: the dtype of the written tensors (``"bfloat16"``, ``jnp.float16``, ...); default
            the model's parameter dtype.
        max_shard_size: bytes (an int, or ``"500MB"``, ``"2GB"``, ``"1GiB"``) per file; larger
            checkpoints are sharded with an index, as ``save_pretrained`` does.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        NotMergeableError: an active adapter holds a method that cannot merge (prompt tuning,
            bottleneck adapters, ...), or adapters are combined; nothing is written.
        UnsupportedArchitectureError: not a model with an HF layout here.
        InvalidConfigError: ``source`` describes another model, or a bad ``max_shard_size``.
        CheckpointError: ``out_dir`` is not empty without ``overwrite``; ``source`` is unreadable.
    """
    _require_mergeable(model)
    return _export(model, out_dir, merge=True, source=source, dtype=dtype, max_shard_size=max_shard_size,
                   overwrite=overwrite)


def export_base(model: nnx.Module, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                dtype: Any = None, max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Writes the base of ``model`` without its adapters, as `export_merged` writes a merged one.

    Merged adapters are unmerged in the copy first; base leaves trained in place (BitFit's
    biases) keep their trained values. Raises as `export_merged` (no `NotMergeableError`).

    Example:
        >>> # export_base(model, "base_dir", source="path/to/hf_dir")
    """
    return _export(model, out_dir, merge=False, source=source, dtype=dtype, max_shard_size=max_shard_size,
                   overwrite=overwrite)


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a number with a unit (``KB`` = 1000, ``KiB`` = 1024, ...).

    Example:
        >>> parse_size("2GB"), parse_size("1.5MiB"), parse_size(100)
        (2000000000, 1572864, 100)
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if unit not in _UNITS:
            raise errors.InvalidConfigError(
                f"max_shard_size {size!r} is not a size; give bytes as an int or a string such as '500MB' or '2GB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise errors.InvalidConfigError(f"max_shard_size must be > 0 bytes, got {size!r}")
    return n


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most ``max_bytes`` each, in order (a tensor larger
    than that gets a file of its own).

    Example:
        >>> plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8)
        [['a', 'b'], ['c'], ['d']]
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


# --- steps -------------------------------------------------------------------------------------------
def _export(model, out_dir, *, merge, source, dtype, max_shard_size, overwrite) -> Path:
    out_dir = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    refuse_non_empty(out_dir, overwrite)
    hf_layout.config_of(model)  # a reference model, else UnsupportedArchitectureError
    _require_hf_head(model)
    plain = _plain_copy(model, merge)
    tensors = hf_layout.hf_tensors(plain)
    target = jnp.dtype(dtype) if dtype is not None else next(iter(tensors.values())).dtype
    kind, path = _resolve_source(source)
    config = _config(plain, kind, path, hf_layout.dtype_name(target))
    with atomic_directory(out_dir) as tmp:
        _write_weights(tmp, tensors, target, max_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if kind == "hf_dir":
            for name in TOKENIZER_FILES:
                if (path / name).is_file():
                    shutil.copyfile(path / name, tmp / name)
    return out_dir


def _require_mergeable(model: nnx.Module) -> None:
    from peft_jax import nnx as peft_nnx  # noqa: PLC0415 (peft_jax.nnx imports peft_jax.io)
    from peft_jax.methods.base import is_mergeable  # noqa: PLC0415

    for path, layer in peft_nnx.adapted_layers(model):
        if layer.composition is not None:
            raise errors.NotMergeableError(
                f"the adapters on {path!r} are combined by {layer.composition!r}, which no single set of "
                "weights reproduces; set_active(model, name) one adapter before a merged export, or export "
                "the adapters with peft_jax.save_adapter instead (nothing was written)")
        live = layer._live()
        for name, slot in layer.slots():
            if slot not in live:
                continue
            for method in slot.methods:
                if not is_mergeable(method):
                    raise errors.NotMergeableError(
                        f"adapter {name!r} holds {type(method).__name__} on {path!r}, which cannot be merged into "
                        "the base weights, so a merged checkpoint cannot hold it; convert it to a mergeable "
                        "method first, detach or deactivate it, or export the adapter with "
                        "peft_jax.save_adapter instead (nothing was written)")


def _require_hf_head(model: nnx.Module) -> None:
    from peft_jax.models.encoder import EncoderForSequenceClassification  # noqa: PLC0415

    if not isinstance(model, EncoderForSequenceClassification):
        return
    cfg = model.backbone.config
    if cfg.model_type != "bert" or model.pooling != "pooler":
        raise errors.UnsupportedArchitectureError(
            f"HF's {cfg.model_type} sequence classifier is a BERT pooler + Linear head; this one is a "
            f"{cfg.model_type} encoder pooling by {model.pooling!r}, which transformers would compute "
            "differently; export model.backbone (the encoder) and keep the classifier separately")


def _plain_copy(model: nnx.Module, merge: bool) -> nnx.Module:
    """A clone with every adapter wrapper removed (merged first when ``merge``)."""
    from peft_jax import nnx as peft_nnx  # noqa: PLC0415

    copy = nnx.clone(model)
    if not merge and any(layer.merge_record is not None for _, layer in peft_nnx.adapted_layers(copy)):
        peft_nnx.unmerge(copy)
    return peft_nnx.unload(copy, merge_adapters=merge)


def _resolve_source(source: Any) -> tuple[str | None, Path | None]:
    if source is None:
        return None, None
    path = Path(source)
    if not path.exists() and isinstance(source, str):
        from peft_jax.models import registry  # noqa: PLC0415

        if source in registry.known_names():
            path = Path(registry.resolve(source).path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise errors.CheckpointError(f"source {path} has no config.json; pass the HF directory the base came "
                                         "from, its .gguf file, or source=None to rebuild config.json")
        return "hf_dir", path
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", path
    raise errors.CheckpointError(f"source {source!r} is neither an HF directory with config.json nor a .gguf file; "
                                 "pass what the base was loaded from, or source=None")


def _config(plain: nnx.Module, kind: str | None, path: Path | None, dtype: str) -> dict[str, Any]:
    if kind == "hf_dir":
        config = _from_directory(plain, path)
    elif kind == "gguf":
        config = hf_layout.hf_config(plain, max_positions=_gguf_context(plain, path))
    else:
        config = hf_layout.hf_config(plain)
    for key in ("torch_dtype", "dtype"):
        config.pop(key, None)
    config["torch_dtype"] = dtype
    return config


def _from_directory(plain: nnx.Module, path: Path) -> dict[str, Any]:
    from peft_jax.models import checkpoint_files  # noqa: PLC0415
    from peft_jax.models.decoder import Decoder  # noqa: PLC0415
    from peft_jax.models.decoder_config import DecoderConfig  # noqa: PLC0415
    from peft_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification  # noqa: PLC0415

    config = dict(checkpoint_files.read_config(path))
    mine = hf_layout.config_of(plain)
    read = (DecoderConfig if isinstance(plain, Decoder) else EncoderConfig).from_hf(config)
    _require_same(read, mine, path)
    if isinstance(plain, EncoderForSequenceClassification):
        built = hf_layout.encoder_hf_config(mine, num_labels=int(plain.classifier.kernel.shape[1]))
        config["architectures"] = built["architectures"]
        if len(config.get("id2label") or {}) != len(built["id2label"]):
            config.update(id2label=built["id2label"], label2id=built["label2id"])
    elif not config.get("architectures"):
        config["architectures"] = hf_layout.hf_architectures(plain)
    return config


def _gguf_context(plain: nnx.Module, path: Path) -> int | None:
    from peft_jax.models.gguf import gguf_config, gguf_metadata  # noqa: PLC0415

    _require_same(gguf_config(path), plain.config, path)
    meta = gguf_metadata(path)
    value = meta.get(f"{meta.get('general.architecture')}.context_length")
    return None if value is None else int(np.asarray(value).reshape(-1)[0])


def _require_same(read: Any, mine: Any, path: Path) -> None:
    bad = hf_layout.same_config(read, mine)
    if bad:
        raise errors.InvalidConfigError(
            f"source {path} describes another model than the one exported (it differs in {', '.join(bad)}); "
            "pass the checkpoint the base was loaded from, or source=None to rebuild config.json")


def _write_weights(directory: Path, tensors: dict[str, jax.Array], dtype: Any, max_bytes: int) -> None:
    def out_dtype(x: jax.Array) -> Any:
        return jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(out_dtype(x))

    sizes = {name: int(np.prod(x.shape)) * out_dtype(x).itemsize for name, x in tensors.items()}
    shards = plan_shards(sizes, max_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_tensors(directory / WEIGHTS_FILE, _host(tensors, shards[0], cast), meta)
        return
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        write_tensors(directory / file, _host(tensors, names, cast), meta)
    where = {name: file for file, names in zip(files, shards) for name in names}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(where.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _host(tensors: dict[str, jax.Array], names: list[str], cast) -> dict[str, np.ndarray]:
    """One file's tensors on the host, in the written dtype (one file converted at a time)."""
    return {name: np.asarray(jax.device_get(cast(tensors[name]))) for name in names}
