"""AdapterHub's adapter files for bottleneck adapters and Compacter, both ways.

`export_adapterhub` writes what AdapterHub's ``model.save_adapter(dir, name)`` writes
(``adapters`` 1.3.0): ``adapter_config.json`` (``{"config": {BnConfig fields}, "hidden_size",
"model_class", "model_name", "model_type", "name", "version"}``) and the weights under AdapterHub's
state-dict names (``bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight``,
``bert.shared_parameters.<name>.phm_rule``; our ``(in, out)`` kernels transposed to torch's
``(out, in)``; the names are `peft_jax.methods.bottleneck.adapterhub_names`). The weights go to
``adapter.safetensors``, which AdapterHub reads with ``model.load_adapter(dir, use_safetensors=True)``;
``weights="torch"`` / ``"both"`` also writes ``pytorch_adapter.bin`` (needs torch), which a plain
``model.load_adapter(dir)`` reads.

`import_adapterhub` reads such a directory (either weights file) into a peft_jax config (the
`Bottleneck` of the ``BnConfig`` on the residual taps that have weights) and the canonical flat
state, so attach + `peft_jax.nnx.load_adapter_state` reproduces the AdapterHub adapter.
`save_adapterhub` / `load_adapterhub` are the one-call forms on an NNX model.

Only bottleneck configs (``seq_bn``, ``double_seq_bn``, ``par_bn``, ``scaled_par_bn``, Compacter,
Compacter++ and their options) are handled: another architecture (LoRA, prefix tuning, unions), an
invertible adapter, ``cross_adapter`` or an unknown field raises `InvalidConfigError` naming it.

Example:
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> from peft_jax.methods.bottleneck import seq_bn
    >>> m = seq_bn(reduction_factor=4)
    >>> path = "encoder/layer/0/output/residual"
    >>> state = {f"{path}/default/down/kernel": np.ones((8, 2), np.float32),
    ...          f"{path}/default/down/bias": np.zeros(2, np.float32),
    ...          f"{path}/default/up/kernel": np.ones((2, 8), np.float32),
    ...          f"{path}/default/up/bias": np.zeros(8, np.float32)}
    >>> out = export_adapterhub([(path, "residual", (m,))], state, pathlib.Path(tempfile.mkdtemp()) / "ah")
    >>> config, back = import_adapterhub(out)
    >>> sorted(back) == sorted(state), config.placements()[0].method == m
    (True, True)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from peft_jax import errors
from peft_jax.io import frontends
from peft_jax.io.adapterhub_keys import AH_ONLY_FIELDS, BERT_KEYS, BN_FIELDS, PHM_FIELDS, AhKeyMap
from peft_jax.io.atomic import atomic_directory
from peft_jax.io.saving import refuse_non_empty
from peft_jax.io.tensor_files import read_tensors, write_tensors
from peft_jax.methods.bottleneck import AhName, Bottleneck, adapterhub_names
from peft_jax.methods.config import at_taps
from peft_jax.methods.phm import Phm

__all__ = ["AH_CONFIG", "AH_SAFE_WEIGHTS", "AH_TORCH_WEIGHTS", "AH_VERSION", "export_adapterhub",
           "import_adapterhub", "load_adapterhub", "save_adapterhub"]

AH_CONFIG = "adapter_config.json"
AH_SAFE_WEIGHTS = "adapter.safetensors"
AH_TORCH_WEIGHTS = "pytorch_adapter.bin"
#: The ``adapters`` release whose layout is written (and was checked against).
AH_VERSION = "adapters.1.3.0"
Weights = Literal["safetensors", "torch", "both"]


# --- ours -> AdapterHub ----------------------------------------------------------------------------
def _one_method(sites: Sequence[tuple[str, str, tuple[Any, ...]]]) -> Bottleneck:
    if not sites:
        raise errors.InvalidConfigError("the adapter has no sites; attach a bottleneck adapter first")
    methods = set()
    for path, kind, ms in sites:
        if kind != "residual" or len(ms) != 1 or not isinstance(ms[0], Bottleneck):
            names = [type(m).__name__ for m in ms]
            raise errors.UnsupportedArchitectureError(
                f"AdapterHub's format holds one bottleneck adapter per residual site; {path} is a {kind!r} site "
                f"with {names}; export bottleneck / Compacter adapters only (other methods: save_adapter)")
        methods.add(ms[0])
    if len(methods) != 1:
        raise errors.InvalidConfigError(
            f"AdapterHub keeps one config per adapter, but the sites carry {len(methods)} different bottleneck "
            "configs; use one Bottleneck (a per-block reduction_factor mapping covers different sizes)")
    method = methods.pop()
    if method.bottleneck_size is not None or method.features is not None:
        raise errors.InvalidConfigError(
            "AdapterHub's BnConfig has no bottleneck_size / features; give the size as reduction_factor")
    return method


def _bn_config(method: Bottleneck, flags: dict[str, bool], leave_out: list[int]) -> dict[str, Any]:
    cfg = {f: getattr(method, f) for f in BN_FIELDS}
    rf = method.reduction_factor
    cfg["reduction_factor"] = dict(rf) if isinstance(rf, tuple) else rf
    if cfg["init_weights"] == "zero_up":  # ours only; an init, the saved weights are what counts
        cfg["init_weights"] = "bert"
    phm = method.phm or Phm()
    cfg.update({f: getattr(phm, f) for f in PHM_FIELDS})
    cfg.update(flags, cross_adapter=False, leave_out=leave_out, phm_layer=method.phm is not None,
               inv_adapter=None, inv_adapter_reduction_factor=None)
    return dict(sorted(cfg.items()))


def _hidden_size(method: Bottleneck, state: Mapping[str, Any], name: str) -> int:
    n = method.phm.phm_dim if method.phm is not None else 1
    for key, value in state.items():
        rel = key[len(name) + 1:] if key.startswith(f"{name}/shared/") else key.split(f"/{name}/", 1)[-1]
        if rel == "down/kernel":
            return int(np.shape(value)[0])
        if rel in ("down/w_left", "down/w", "shared/w_down_left", "shared/w_down"):
            return n * int(np.shape(value)[1])
        if rel == "up/bias":
            return int(np.shape(value)[0])
    raise errors.InvalidConfigError("cannot tell the model's hidden size from the adapter state; pass hidden_size=")


def _locations(sites, key_map: AhKeyMap, num_layers: int | None) -> tuple[dict[str, str], dict, list[int]]:
    modules, layers = {}, {"mh_adapter": set(), "output_adapter": set()}
    for path, _, _ in sites:
        module = key_map.module(path)
        if module is None:
            raise errors.InvalidConfigError(
                f"{path} is not a residual tap the key map knows (AdapterHub modules after attention / the FFN); "
                "pass model_key_map= for this model")
        flag, index = key_map.location(module)
        modules[path] = module
        layers[flag].add(index)
    used = [s for s in layers.values() if s]
    if any(s != used[0] for s in used):
        raise errors.InvalidConfigError(
            f"AdapterHub leaves out the same layers at every location; the adapter has layers {layers}")
    top = (max(used[0]) + 1) if num_layers is None else num_layers
    leave_out = sorted(set(range(top)) - used[0])
    return modules, {k: bool(v) for k, v in layers.items()}, leave_out


def _ah_tensors(method: Bottleneck, state: Mapping[str, Any], modules: dict[str, str], name: str,
                ah_name: str, key_map: AhKeyMap) -> dict[str, np.ndarray]:
    names = adapterhub_names(method)
    out: dict[str, np.ndarray] = {}
    expected = set()

    def put(our_key: str, ah_key: str, entry: AhName) -> None:
        expected.add(our_key)
        if our_key not in state:
            raise errors.StateError(f"the adapter state has no {our_key!r}, which AdapterHub needs ({ah_key})")
        value = np.asarray(state[our_key])
        out[ah_key] = np.ascontiguousarray(value.T if entry.transpose else value)

    for path, module in modules.items():
        for rel, entry in names.items():
            if entry.shared:
                continue
            put(f"{path}/{name}/{rel}", f"{module}.adapters.{ah_name}.{entry.key}", entry)
            if entry.key.startswith("adapter_norm_before."):  # also adapter_down.0 (one module, two names)
                out[f"{module}.adapters.{ah_name}.adapter_down.0.{entry.key.split('.')[-1]}"] = \
                    out[f"{module}.adapters.{ah_name}.{entry.key}"]
    for rel, entry in names.items():
        if entry.shared:
            put(f"{name}/{rel}", f"{key_map.prefix}shared_parameters.{ah_name}.{entry.key}", entry)
    extra = sorted(set(state) - expected)
    if extra:
        raise errors.StateError(f"adapter state entries with no AdapterHub name: {extra[:5]}; is it one adapter?")
    return out


def _torch_save(tensors: dict[str, np.ndarray], path: Path) -> None:
    import torch  # noqa: PLC0415 (checked by the caller)

    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)


def export_adapterhub(sites: Sequence[tuple[str, str, tuple[Any, ...]]], state: Mapping[str, Any],
                      out_dir: str | os.PathLike, *, name: str = "default", adapter_name: str | None = None,
                      model_key_map: AhKeyMap = BERT_KEYS, hidden_size: int | None = None,
                      num_layers: int | None = None, model_class: str = "BertAdapterModel", model_name: str = "",
                      model_type: str = "bert", weights: Weights = "safetensors",
                      overwrite: bool = False) -> Path:
    """Writes one bottleneck / Compacter adapter as AdapterHub's ``save_adapter`` does.

    Args:
        sites: ``(module_path, site_kind, methods)`` of the adapter (`peft_jax.io.frontends.AdapterParts`).
        state: its canonical flat dict (``"<path>/<name>/<param>"``, ``"<name>/shared/<param>"``).
        out_dir: the directory to write (atomically).
        name: the adapter's name in ``state``.
        adapter_name: its name in AdapterHub (``load_adapter`` adds it under that name); ``name`` by default.
        model_key_map: our tap paths -> AdapterHub modules (`peft_jax.io.adapterhub_keys.BERT_KEYS`).
        hidden_size: recorded in the config; read off the weights by default.
        num_layers: the model's layer count, so trailing layers without adapters go to ``leave_out``.
        model_class, model_name, model_type: recorded in the config (AdapterHub does not check them).
        weights: ``"safetensors"`` (``adapter.safetensors``), ``"torch"`` (``pytorch_adapter.bin``,
            needs torch) or ``"both"``.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        UnsupportedArchitectureError: a site that is not one bottleneck on a residual tap.
        InvalidConfigError: options AdapterHub cannot express, or an unknown tap path.
        StateError: the state misses (or has extra) entries.
        CheckpointError: ``out_dir`` is not empty and not ``overwrite``.
        MissingPackageError: ``weights`` needs torch and it is not installed.

    Example:
        >>> export_adapterhub([("x", "linear", ())], {}, "/tmp/never-written")
        Traceback (most recent call last):
        ...
        peft_jax.errors.UnsupportedArchitectureError: AdapterHub's format holds one bottleneck adapter per \
residual site; x is a 'linear' site with []; export bottleneck / Compacter adapters only (other methods: save_adapter)
    """
    out = Path(out_dir)
    method = _one_method(sites)
    if weights not in ("safetensors", "torch", "both"):
        raise errors.InvalidConfigError(f"weights must be 'safetensors', 'torch' or 'both', got {weights!r}")
    if weights != "safetensors":
        try:
            import torch  # noqa: F401, PLC0415
        except ImportError as e:
            raise errors.MissingPackageError(
                f"weights={weights!r} writes {AH_TORCH_WEIGHTS} with torch, which is not installed; install torch "
                "or use weights='safetensors' (AdapterHub: load_adapter(dir, use_safetensors=True))") from e
    refuse_non_empty(out, overwrite)
    ah_name = adapter_name or name
    modules, flags, leave_out = _locations(sites, model_key_map, num_layers)
    tensors = _ah_tensors(method, state, modules, name, ah_name, model_key_map)
    record = {"config": _bn_config(method, flags, leave_out),
              "hidden_size": hidden_size or _hidden_size(method, state, name), "model_class": model_class,
              "model_name": model_name, "model_type": model_type, "name": ah_name, "version": AH_VERSION}
    with atomic_directory(out) as tmp:
        (tmp / AH_CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if weights in ("safetensors", "both"):
            write_tensors(tmp / AH_SAFE_WEIGHTS, tensors)
        if weights in ("torch", "both"):
            _torch_save(tensors, tmp / AH_TORCH_WEIGHTS)
    return out


# --- AdapterHub -> ours ----------------------------------------------------------------------------
def _read_config(d: Path) -> dict[str, Any]:
    path = d / AH_CONFIG
    if not path.is_file():
        raise errors.CheckpointError(f"{d} has no {AH_CONFIG}; pass a directory written by AdapterHub's save_adapter")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.CheckpointError(f"{path} is not valid JSON ({e}); save the adapter again") from e
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or not isinstance(
            record.get("name"), str):
        raise errors.CheckpointError(f"{path} is not an AdapterHub adapter config (needs 'config' and 'name')")
    return record


def _method(cfg: dict[str, Any]) -> tuple[Bottleneck, dict[str, bool], list[int]]:
    arch = cfg.get("architecture")
    if arch not in (None, "bottleneck"):
        raise errors.InvalidConfigError(
            f"AdapterHub architecture {arch!r} is not supported here (only bottleneck adapters and Compacter)")
    known = set(BN_FIELDS) | set(PHM_FIELDS) | set(AH_ONLY_FIELDS) | {"architecture"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise errors.InvalidConfigError(
            f"unsupported AdapterHub config fields {unknown}; known: bottleneck (BnConfig) fields of adapters 1.3.0")
    for field in ("inv_adapter", "inv_adapter_reduction_factor"):
        if cfg.get(field) is not None:
            raise errors.InvalidConfigError(f"AdapterHub field {field}={cfg[field]!r} (an invertible adapter) "
                                            "is not supported; re-create the adapter without it")
    if cfg.get("cross_adapter"):
        raise errors.InvalidConfigError("AdapterHub field cross_adapter=True (after cross-attention) is not "
                                        "supported: the encoder has no cross-attention")
    kw = {f: cfg[f] for f in BN_FIELDS if f in cfg}
    if isinstance(kw.get("reduction_factor"), Mapping):
        kw["reduction_factor"] = dict(kw["reduction_factor"])
    if cfg.get("phm_layer"):
        kw["phm"] = Phm(**{f: cfg[f] for f in PHM_FIELDS if f in cfg})
    flags = {"mh_adapter": bool(cfg.get("mh_adapter")), "output_adapter": bool(cfg.get("output_adapter"))}
    return Bottleneck(**kw), flags, [int(i) for i in cfg.get("leave_out") or []]


def _read_weights(d: Path) -> dict[str, np.ndarray]:
    if (d / AH_SAFE_WEIGHTS).is_file():
        return read_tensors(d / AH_SAFE_WEIGHTS)
    path = d / AH_TORCH_WEIGHTS
    if not path.is_file():
        raise errors.CheckpointError(
            f"{d} has neither {AH_SAFE_WEIGHTS} nor {AH_TORCH_WEIGHTS}; save the adapter again")
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        raise errors.MissingPackageError(
            f"{path} is a torch pickle and torch is not installed; install torch, or save the adapter in "
            "AdapterHub with save_adapter(dir, name, use_safetensors=True)") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise errors.CheckpointError(f"{path} is not a readable torch weights file ({type(e).__name__}: {e}); "
                                     "save the adapter again") from e
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise errors.CheckpointError(f"{path} does not hold a state dict of tensors; save the adapter again")
    return {str(k): v.detach().to(torch.float32 if v.dtype == torch.bfloat16 else v.dtype).numpy()
            for k, v in loaded.items()}


def _split(tensors: dict[str, np.ndarray], ah_name: str, key_map: AhKeyMap) -> tuple[dict, dict]:
    """``({module: {param: array}}, {shared param: array})`` of adapter ``ah_name``."""
    site_re = re.compile(rf"(.+)\.adapters\.{re.escape(ah_name)}\.(.+)")
    shared_re = re.compile(rf"(?:.+\.)?shared_parameters\.{re.escape(ah_name)}\.(.+)")
    per_module: dict[str, dict[str, np.ndarray]] = {}
    shared: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if m := shared_re.fullmatch(key):
            shared[m.group(1)] = value
        elif (m := site_re.fullmatch(key)) and key_map.path(m.group(1)) is not None:
            per_module.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            raise errors.CheckpointError(
                f"weights entry {key!r} is not a bottleneck parameter of adapter {ah_name!r} at a known module; "
                "only bottleneck / Compacter adapters after attention or the FFN are read")
    return per_module, shared


def _take(found: dict[str, np.ndarray], entry: AhName, where: str) -> np.ndarray:
    alias = None
    if entry.key.startswith("adapter_norm_before."):
        alias = "adapter_down.0." + entry.key.split(".")[-1]
    key = entry.key if entry.key in found or alias not in found else alias
    if key not in found:
        raise errors.CheckpointError(f"the weights have no {where}{entry.key}; the file does not match its config")
    value = found.pop(key)
    if alias is not None:
        found.pop(alias if key == entry.key else entry.key, None)
    return value.T if entry.transpose else value


def import_adapterhub(in_dir: str | os.PathLike, *, module_paths: AhKeyMap = BERT_KEYS,
                      name: str = "default", num_layers: int | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """Reads an AdapterHub bottleneck / Compacter adapter into ``(config, canonical state)``.

    Args:
        in_dir: a directory written by AdapterHub's ``save_adapter`` (or `export_adapterhub`).
        module_paths: AdapterHub module names -> our tap paths (`peft_jax.io.adapterhub_keys.BERT_KEYS`).
        name: the adapter name of the returned state (``"<path>/<name>/<param>"``).
        num_layers: the model's layer count; needed only when no weights are per layer (shared PHM rule
            and W without bias), where the config's locations and ``leave_out`` alone say where it goes.

    Returns:
        A config placing the `Bottleneck` on the residual taps that have weights (attach it with
        ``name``) and the state for `peft_jax.nnx.load_adapter_state`.

    Raises:
        InvalidConfigError: another architecture, an unknown or unsupported config field.
        CheckpointError: a missing, damaged or mismatched config / weights file.
        MissingPackageError: only ``pytorch_adapter.bin`` is there and torch is not installed.

    Example:
        >>> import_adapterhub("/nonexistent")
        Traceback (most recent call last):
        ...
        peft_jax.errors.CheckpointError: /nonexistent has no adapter_config.json; pass a directory written by \
AdapterHub's save_adapter
    """
    d = Path(in_dir)
    record = _read_config(d)
    method, flags, leave_out = _method(record["config"])
    ah_name = record["name"]
    per_module, shared = _split(_read_weights(d), ah_name, module_paths)
    names = adapterhub_names(method)
    if all(entry.shared for entry in names.values()):  # no per-layer weights say where it goes
        if num_layers is None:
            raise errors.InvalidConfigError(
                "this adapter has no per-layer weights (shared PHM rule and W, no bias), so its files do not say "
                "which layers it is on; pass num_layers= (the model's layer count)")
        per_module = {module_paths.module_at(flag, i): {} for flag, on in flags.items() if on
                      for i in range(num_layers) if i not in leave_out}
    state: dict[str, np.ndarray] = {}
    paths = []
    for module in sorted(per_module, key=lambda m: module_paths.location(m)[::-1]):
        flag, index = module_paths.location(module)
        if not flags[flag] or index in leave_out:
            raise errors.CheckpointError(f"the weights have an adapter at {module}, where the config puts none "
                                         f"({flag}={flags[flag]}, leave_out={leave_out})")
        found = dict(per_module[module])
        path = module_paths.path(module)
        paths.append(path)
        for rel, entry in names.items():
            if not entry.shared:
                state[f"{path}/{name}/{rel}"] = _take(found, entry, f"{module}.adapters.{ah_name}.")
        if found:
            raise errors.CheckpointError(f"unexpected weights at {module}: {sorted(found)} (not in this config)")
    for rel, entry in names.items():
        if entry.shared:
            state[f"{name}/{rel}"] = _take(shared, entry, f"shared_parameters.{ah_name}.")
    if shared:
        raise errors.CheckpointError(f"unexpected shared weights {sorted(shared)} (not in this config)")
    if not paths:
        raise errors.CheckpointError(f"{d} holds no weights of adapter {ah_name!r}")
    config = at_taps("residual", method, targets="|".join(re.escape(p) for p in paths))
    return config, state


# --- one call on a model ---------------------------------------------------------------------------
def save_adapterhub(model: Any, directory: str | os.PathLike, *, name: str = "default", **kwargs: Any) -> Path:
    """`export_adapterhub` of adapter ``name`` of an NNX ``model`` (``kwargs`` go there).

    Example:
        >>> from flax import nnx
        >>> save_adapterhub(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "/tmp/x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        peft_jax.errors.AdapterNameError: ...
    """
    parts = frontends.nnx_parts(model, name)
    return export_adapterhub(parts.sites, parts.state, directory, name=name, **kwargs)


def load_adapterhub(model: Any, directory: str | os.PathLike, *, name: str = "default",
                    module_paths: AhKeyMap = BERT_KEYS, num_layers: int | None = None, rngs: Any = None) -> Any:
    """Attaches the AdapterHub adapter in ``directory`` to the NNX ``model`` as ``name``; returns it.

    Every check (config, weights, shapes against the model) runs before the model changes.

    Example:
        >>> load_adapterhub(None, "/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        peft_jax.errors.CheckpointError: /nonexistent has no adapter_config.json; ...
    """
    from flax import nnx  # noqa: PLC0415

    from peft_jax import nnx as peft_nnx  # noqa: PLC0415

    config, state = import_adapterhub(directory, module_paths=module_paths, name=name, num_layers=num_layers)
    plan = peft_nnx.plan(model, config, name)
    frontends.check_state(state, frontends.expected_shapes(plan, frontends.nnx_base(model)))
    peft_nnx.attach(model, config, rngs=rngs or nnx.Rngs(0), name=name)
    frontends.write_nnx(model, name, state)
    return model
