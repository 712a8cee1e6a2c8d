"""One call each way: `save_adapter` writes a named adapter, `load_adapter` attaches it again.

The directory holds ``peft_jax_adapter.json`` (the adapter's name, its sites and the methods on
each, the identity of its base: architecture, every frozen tensor's shape, dtype and CRC-32,
and the versions that wrote it) and ``peft_jax_adapter.safetensors`` (what trains, in the
canonical layout both front-ends share). Loading rebuilds the config from the file (every
method is a dataclass: `peft_jax.io.codec`), checks the base before anything changes, attaches
under any name and writes the values in. The file names leave room for the HF PEFT pair
(``adapter_config.json`` + ``adapter_model.safetensors``) in the same directory.

Example:
    >>> import pathlib, tempfile
    >>> from flax import nnx
    >>> import peft_jax
    >>> def base():
    ...     return nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> model = peft_jax.nnx.attach(base(), peft_jax.LoraConfig(targets=["0"], rank=2), rngs=nnx.Rngs(2))
    >>> out = save_adapter(model, pathlib.Path(tempfile.mkdtemp()) / "a")
    >>> again = load_adapter(base(), out, name="mine")
    >>> again.layers[0].mine.lora_a.shape
    (4, 2)
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np

from peft_jax import errors
from peft_jax.io import codec, frontends, identity
from peft_jax.io.atomic import atomic_directory
from peft_jax.io.tensor_files import read_tensors, write_tensors
from peft_jax.methods.config import Placement, compose

__all__ = ["NATIVE_CONFIG", "NATIVE_WEIGHTS", "adapter_parts", "attach_state", "has_native_adapter", "load_adapter",
           "read_native", "refuse_non_empty", "save_adapter", "sites_config", "target_base"]

NATIVE_CONFIG = "peft_jax_adapter.json"
NATIVE_WEIGHTS = "peft_jax_adapter.safetensors"
FORMAT = "peft_jax.adapter"
VERSION = 1


def save_adapter(target: Any, directory: str | os.PathLike, *, name: str = "default",
                 variables: dict | None = None, base_model: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes adapter ``name`` of ``target`` (an NNX model, or a planned Linen handle with its
    ``variables``) to ``directory``, atomically.

    ``base_model`` (a registered name or a path) and ``model_kwargs`` (e.g. ``{"num_labels": 2}``)
    record how to load the base again (`peft_jax.models.load`), for the CLI's ``export`` and
    ``generate --adapter``; they are optional and not checked (the base identity is).

    Raises:
        AdapterNameError: no adapter ``name`` is attached.
        InvalidConfigError: a method holds a value that cannot be written (a callable).
        CheckpointError: ``directory`` exists and is not empty, without ``overwrite``.
    """
    parts = adapter_parts(target, variables, name)
    directory = Path(directory)
    refuse_non_empty(directory, overwrite)
    record = {
        "format": FORMAT, "version": VERSION, "name": parts.name,
        "sites": [{"path": path, "kind": kind, "methods": [codec.to_dict(m) for m in methods]}
                  for path, kind, methods in parts.sites],
        "base": {**identity.base_identity(parts.architecture, parts.base), "unchecked": list(parts.unchecked)},
        "written_by": _versions(),
    }
    if base_model is not None:
        record["base_model"] = {"name_or_path": str(base_model), "kwargs": dict(model_kwargs or {})}
    text = json.dumps(record, indent=1) + "\n"
    with atomic_directory(directory) as tmp:
        write_tensors(tmp / NATIVE_WEIGHTS, parts.state, {"format": FORMAT, "name": parts.name})
        (tmp / NATIVE_CONFIG).write_text(text, encoding="utf-8")
    return directory


def load_adapter(target: Any, directory: str | os.PathLike, *, name: str | None = None,
                 variables: dict | None = None, sample: tuple = (), rngs: Any = None,
                 allow_different_weights: bool = False) -> Any:
    """Attaches the adapter saved in ``directory`` to ``target`` and loads its values.

    Args:
        target: an NNX model (changed in place and returned), or a Linen module or handle
            (then ``variables`` and the ``sample`` inputs that trace it are needed, and
            ``(handle, variables)`` is returned).
        name: the name to attach it under (default: the name it was saved with).
        rngs: NNX rngs for building the adapter before its values are written (default seed 0).
        allow_different_weights: accept a base with the same tensors and shapes but other
            weights (the fingerprints are not compared).

    Raises:
        CheckpointError: a missing or corrupt file, or a base that is not the saved one (the
            message names the first tensor that differs); nothing is changed.
        InvalidConfigError: a method or field this version does not know (named).
        AdapterNameError: ``name`` is already attached.
    """
    record, state = read_native(directory)
    saved = record["name"]
    name = saved if name is None else name
    config = sites_config(record["sites"])
    state = frontends.rename(state, saved, name) if name != saved else state

    def check(architecture, base, plan):
        _check_base(record, architecture, base, allow_different_weights)
        _check_sites(record, plan)

    return attach_state(target, config, state, name, variables=variables, sample=sample, rngs=rngs, check=check)


def read_native(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(record, state)`` of a directory `save_adapter` wrote, checked for shape and content."""
    directory = Path(directory)
    if not has_native_adapter(directory):
        raise errors.CheckpointError(
            f"{directory} holds no peft_jax adapter ({NATIVE_CONFIG} and {NATIVE_WEIGHTS}); "
            "write one with peft_jax.save_adapter, or import another format with peft-jax import")
    try:
        record = json.loads((directory / NATIVE_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.CheckpointError(f"{directory / NATIVE_CONFIG} is not valid JSON ({e})") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise errors.CheckpointError(f"{directory / NATIVE_CONFIG} is not a peft_jax adapter record")
    if record.get("version", 0) > VERSION:
        raise errors.CheckpointError(
            f"{directory} was written by a newer peft_jax (format version {record['version']}); upgrade")
    for key in ("name", "sites", "base"):
        if key not in record:
            raise errors.CheckpointError(f"{directory / NATIVE_CONFIG} has no {key!r} entry")
    state = read_tensors(directory / NATIVE_WEIGHTS)
    return record, state


def has_native_adapter(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds the files `save_adapter` writes."""
    d = Path(directory)
    return (d / NATIVE_CONFIG).is_file() and (d / NATIVE_WEIGHTS).is_file()


def sites_config(sites: list[dict[str, Any]]) -> Any:
    """The config that puts the saved methods on exactly the saved sites, in their order."""
    placements = []
    for entry in sites:
        for method in entry["methods"]:
            placements.append(Placement(re.escape(entry["path"]), codec.from_dict(method),
                                        what="saved adapter sites"))
    if not placements:
        raise errors.CheckpointError("the saved adapter has no sites")
    return compose(*placements)


# --- front-ends -------------------------------------------------------------------------------------
def _is_nnx(target: Any) -> bool:
    from flax import nnx  # noqa: PLC0415

    return isinstance(target, nnx.Module)


def adapter_parts(target: Any, variables: dict | None, name: str) -> frontends.AdapterParts:
    """`AdapterParts` of adapter ``name`` of an NNX model or a planned Linen handle."""
    if _is_nnx(target):
        return frontends.nnx_parts(target, name)
    from peft_jax.linen import Peft  # noqa: PLC0415

    if not isinstance(target, Peft) or variables is None:
        raise errors.InvalidConfigError(
            "save_adapter takes an NNX model, or a planned peft_jax.linen handle with variables=")
    return frontends.linen_parts(target, variables, name)


def attach_state(target: Any, config: Any, state: dict[str, Any], name: str, *, variables: dict | None = None,
                 sample: tuple = (), rngs: Any = None, check: Any = None) -> Any:
    """Attaches ``config`` to ``target`` under ``name`` and writes the canonical ``state`` in,
    after every check: ``check(architecture, base, plan)`` (the caller's, e.g. the base identity),
    the plan, and each tensor's shape. Nothing changes when a check fails.

    Returns the NNX model, or ``(handle, variables)`` for a Linen module or handle.
    """
    if _is_nnx(target):
        from flax import nnx  # noqa: PLC0415

        from peft_jax import nnx as peft_nnx  # noqa: PLC0415

        base = frontends.nnx_base(target)
        plan = peft_nnx.plan(target, config, name)  # every check, before anything changes
        if check is not None:
            check(frontends._architecture(target), base, plan)
        frontends.check_state(state, frontends.expected_shapes(plan, base))
        peft_nnx.attach(target, config, rngs=rngs or nnx.Rngs(0), name=name)
        frontends.write_nnx(target, name, state)
        return target
    import jax  # noqa: PLC0415

    from peft_jax import linen as peft_linen  # noqa: PLC0415

    if variables is None:
        raise errors.InvalidConfigError(
            "loading into a Linen module needs variables= and the sample= inputs that trace it")
    handle = target.attach(config, name) if isinstance(target, peft_linen.Peft) \
        else peft_linen.attach(target, config, name)
    base = frontends.linen_base(variables)
    handle = handle.plan(variables, *sample)
    plan = next(a for a in handle.plans if a.name == name)
    if check is not None:
        check(frontends._architecture(handle.module), base, plan)
    frontends.check_state(state, frontends.expected_shapes(plan, base))
    variables = handle.init(jax.random.key(0), variables)
    return handle, frontends.write_linen(handle, variables, name, state)


def target_base(target: Any, variables: dict | None = None) -> tuple[str, dict[str, Any]]:
    """``(architecture, frozen base leaves by path)`` of an NNX model or a Linen module/handle."""
    if _is_nnx(target):
        return frontends._architecture(target), frontends.nnx_base(target)
    if variables is None:
        raise errors.InvalidConfigError("a Linen module needs variables= (and sample= inputs) to load into")
    return frontends._architecture(getattr(target, "module", target)), frontends.linen_base(variables)


def _check_base(record, architecture, base, allow_different_weights):
    saved = record["base"]
    unchecked = set(saved.get("unchecked", ()))
    current = identity.base_identity(architecture, {p: v for p, v in base.items() if p not in unchecked})
    identity.check_identity(saved, current, allow_different_weights=allow_different_weights)


def _check_sites(record, plan):
    saved = [(e["path"], e["kind"]) for e in record["sites"]]
    planned = [(s.path, s.site.kind) for s in plan.sites]
    if saved != planned:
        first = next((a, b) for a, b in zip(saved + [None] * len(planned), planned + [None] * len(saved)) if a != b)
        raise errors.CheckpointError(
            f"the saved adapter's sites do not fit this model: saved {first[0]}, here {first[1]}; "
            "load it onto the architecture it was saved from")


def refuse_non_empty(directory: Path, overwrite: bool) -> None:
    """Raises `CheckpointError` when ``directory`` is a file, or a non-empty directory without
    ``overwrite``: checked before anything is computed or written."""
    if directory.exists() and not directory.is_dir():
        raise errors.CheckpointError(f"{directory} exists and is not a directory; choose another path")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise errors.CheckpointError(
            f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it, "
            "or choose another directory")


def _versions() -> dict[str, str]:
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415

    import peft_jax  # noqa: PLC0415

    return {"peft_jax": peft_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "python": platform.python_version()}
