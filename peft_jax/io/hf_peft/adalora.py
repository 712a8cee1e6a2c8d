"""AdaLoRA in HF PEFT's files (``peft_type: "ADALORA"``), both ways.

``adapter_model.safetensors`` holds, per adapted module, ``<module>.lora_A`` ``(r_i, in)``,
``lora_E`` ``(r_i, 1)`` and ``lora_B`` ``(out, r_i)`` (bare parameters: no ``.weight``; ours are
``lora_a`` ``(in, init_r)``, ``lora_e`` ``(init_r,)``, ``lora_b`` ``(init_r, out)``).
``adapter_config.json`` holds one `AdaLora` for the adapter (``init_r``, ``target_r``,
``lora_alpha``, ``lora_dropout``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step``) and HF's allocator mask ``rank_pattern``:
``{"<module>.lora_E": [init_r booleans]}``. HF saves only the kept rows (``r_i`` = the number
of ``True``), and its scale stays ``lora_alpha / init_r``.

Import puts the kept rows back at their places in full ``init_r`` factors; the rows HF dropped
are zeros (``E = 0`` there, so the outputs are HF's). Our masks live in the allocator's optimizer
state, not in the adapter, so export writes every ``init_r`` row and ``rank_pattern: null``:
pruned ranks stay as rows with ``E = 0``, which HF computes the same way.

Example:
    >>> import numpy as np
    >>> from peft_jax.methods import AdaLora
    >>> from peft_jax.io.hf_peft.keys import DECODER
    >>> sites = [("layers/0/self_attn/q_proj", "linear", (AdaLora(init_r=2, target_r=1, total_step=10),))]
    >>> state = {"layers/0/self_attn/q_proj/default/lora_a": np.ones((8, 2), np.float32),
    ...          "layers/0/self_attn/q_proj/default/lora_e": np.ones(2, np.float32),
    ...          "layers/0/self_attn/q_proj/default/lora_b": np.ones((2, 6), np.float32)}
    >>> config, tensors = export_adalora(sites, state, "default", DECODER)
    >>> config["peft_type"], config["init_r"], tensors[ROOT + "model.layers.0.self_attn.q_proj.lora_E"].shape
    ('ADALORA', 2, (2, 1))
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peft_jax import errors
from peft_jax.io.hf_peft.fields import one_value, plain_number
from peft_jax.io.hf_peft.keys import ROOT, KeyMap
from peft_jax.io.hf_peft.lora import IGNORED_FIELDS as LORA_IGNORED
from peft_jax.io.hf_peft.lora import MUST_BE_EMPTY as LORA_MUST_BE_EMPTY
from peft_jax.methods import AdaLora
from peft_jax.methods.config import Placement, compose

__all__ = ["export_adalora", "import_adalora", "is_adalora"]

Sites = Sequence[tuple[str, str, tuple[Any, ...]]]

#: our AdaLora field -> HF's AdaLoraConfig field.
_FIELDS = {"init_r": "init_r", "target_r": "target_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
           "tinit": "tinit", "tfinal": "tfinal", "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2",
           "orth_reg_weight": "orth_reg_weight", "total_step": "total_step"}
#: LoraConfig fields AdaLoRA inherits but HF's AdaLoRA layers never read (its rank is init_r, its
#: scale lora_alpha / init_r), or bookkeeping.
_IGNORED = LORA_IGNORED | {"r", "alpha_pattern", "use_rslora", "init_lora_weights"}
#: ... and fields that would change the adapter unless unset (or false).
_MUST_BE_EMPTY = (*LORA_MUST_BE_EMPTY, "modules_to_save", "use_dora", "lora_bias", "fan_in_fan_out")
#: HF's tensor leaves of a module, in the order A, E, B.
_LEAVES = ("lora_A", "lora_E", "lora_B")
_PATTERN_KEY = re.compile(r"(?P<module>.+)\.lora_[AEB](\.[^.]+)?")


def is_adalora(sites: Sites) -> bool:
    """Whether every site holds exactly one `AdaLora`."""
    return bool(sites) and all(len(ms) == 1 and isinstance(ms[0], AdaLora) for _, _, ms in sites)


def export_adalora(sites: Sites, state: Mapping[str, np.ndarray], name: str,
                   key_map: KeyMap) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json fields, tensors by their keys in adapter_model.safetensors)``.

    Raises:
        InvalidConfigError: sites that are not one AdaLora each, AdaLora fields that differ
            between modules (HF holds one config), or factors that are not 2-D.
    """
    if not is_adalora(sites):
        raise errors.InvalidConfigError("HF PEFT's AdaLoRA format holds one AdaLora per module, and nothing else")
    methods = {key_map.to_hf(path): ms[0] for path, _, ms in sites}
    config: dict[str, Any] = {"peft_type": "ADALORA", "target_modules": sorted(methods)}
    for ours, hf in _FIELDS.items():
        config[hf] = one_value([getattr(m, ours) for m in methods.values()], f"AdaLoRA {ours}")
    config["lora_alpha"] = plain_number(config["lora_alpha"])
    config.update(rank_pattern=None, bias="none", fan_in_fan_out=False, use_dora=False,
                  init_lora_weights=True, modules_to_save=None)
    tensors = {}
    for path, _, _ in sites:
        a, e, b = (np.asarray(state[f"{path}/{name}/{leaf}"]) for leaf in ("lora_a", "lora_e", "lora_b"))
        if a.ndim != 2 or b.ndim != 2:
            raise errors.InvalidConfigError(
                f"{path!r} has AdaLoRA factors of shapes {a.shape} / {b.shape}; HF PEFT's format holds 2-D "
                "(Linear) factors only; save it in peft_jax's format (peft_jax.save_adapter)")
        hf = key_map.to_hf(path)
        tensors.update({f"{ROOT}{hf}.lora_A": a.T, f"{ROOT}{hf}.lora_E": e.reshape(-1, 1),
                        f"{ROOT}{hf}.lora_B": b.T})
    return config, tensors


def _check_fields(config: Mapping[str, Any]) -> None:
    unknown = sorted(set(config) - {"peft_type", "target_modules", "rank_pattern", "bias", *_FIELDS.values()}
                     - _IGNORED - set(_MUST_BE_EMPTY))
    if unknown:
        raise errors.InvalidConfigError(
            f"adapter_config.json (ADALORA) has field(s) {unknown} this reader does not know; they may change "
            "what the adapter computes, so it is not loaded")
    for field in _MUST_BE_EMPTY:
        if config.get(field) not in (None, False, {}, [], ""):
            raise errors.InvalidConfigError(
                f"adapter_config.json (ADALORA) sets {field}={config[field]!r}, which peft_jax's AdaLoRA does not "
                "support; save the adapter without it")
    if config.get("bias", "none") != "none":
        raise errors.InvalidConfigError(f"adapter_config.json sets bias={config['bias']!r}; only 'none' is read")
    if not isinstance(config.get("lora_alpha", 8), (int, float)) or config.get("lora_alpha", 8) <= 0:
        raise errors.InvalidConfigError(
            f"adapter_config.json (ADALORA) sets lora_alpha={config['lora_alpha']!r}; this reader needs "
            "lora_alpha > 0 (HF then scales by rank, which changes when the ranks are resized)")


def _method(config: Mapping[str, Any]) -> AdaLora:
    defaults = AdaLora.__dataclass_fields__
    fields = {ours: config.get(hf, defaults[ours].default) for ours, hf in _FIELDS.items()}
    fields["alpha"], fields["dropout"] = float(fields["alpha"]), float(fields["dropout"])
    try:
        return AdaLora(**fields)
    except (TypeError, errors.InvalidConfigError) as e:
        raise errors.InvalidConfigError(f"adapter_config.json's ADALORA fields do not build an AdaLora: {e}") from e


def _masks(pattern: Any, init_r: int) -> dict[str, np.ndarray]:
    """HF's ``rank_pattern`` as ``{module: kept-rank mask (init_r,) bool}``."""
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise errors.InvalidConfigError(f"adapter_config.json (ADALORA) has rank_pattern={pattern!r}; "
                                        "it must be a mapping or null")
    masks = {}
    for key, value in pattern.items():
        match = _PATTERN_KEY.fullmatch(key)
        ok = isinstance(value, list) and len(value) == init_r and all(isinstance(v, bool) for v in value)
        if match is None or not ok:
            raise errors.InvalidConfigError(
                f"adapter_config.json (ADALORA) has rank_pattern[{key!r}] = {value!r}; AdaLoRA's rank_pattern "
                f"maps '<module>.lora_E' to a list of init_r={init_r} booleans (the ranks kept)")
        masks[match["module"]] = np.asarray(value, bool)
    return masks


def _group(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    by_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        module, _, leaf = key.removeprefix(ROOT).rpartition(".")
        if leaf not in _LEAVES:
            raise errors.CheckpointError(f"adapter_model.safetensors holds {key!r}, which is no AdaLoRA tensor "
                                         "(lora_A, lora_E, lora_B); the file may be of another method or damaged")
        by_module[module][leaf] = np.asarray(value)
    return by_module


def _full_factors(hf: str, leaves: Mapping[str, np.ndarray], keep: np.ndarray,
                  kernel_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Our ``init_r`` factors of one module from HF's kept rows (the dropped rows are zeros)."""
    if set(leaves) != set(_LEAVES):
        raise errors.CheckpointError(f"the adapter's {hf!r} lacks {sorted(set(_LEAVES) - set(leaves))}")
    a, e, b = (leaves[k] for k in _LEAVES)
    n = int(keep.sum())
    if len(kernel_shape) != 2 or a.shape != (n, kernel_shape[0]) or e.shape != (n, 1) or b.shape != (
            kernel_shape[1], n):
        raise errors.CheckpointError(
            f"tensors {ROOT}{hf}.lora_A/E/B of shapes {a.shape} / {e.shape} / {b.shape} do not fit the model's "
            f"layer of shape {kernel_shape} (in, out) with {n} of {keep.size} ranks kept (rank_pattern); load "
            "it onto the base it was made for")
    full_a = np.zeros((kernel_shape[0], keep.size), a.dtype)
    full_e = np.zeros((keep.size,), e.dtype)
    full_b = np.zeros((keep.size, kernel_shape[1]), b.dtype)
    full_a[:, keep], full_e[keep], full_b[keep] = a.T, e.reshape(-1), b.T
    return {"lora_a": full_a, "lora_e": full_e, "lora_b": full_b}


def import_adalora(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], base: Mapping[str, Any],
                   name: str, key_map: KeyMap) -> tuple[Any, dict[str, np.ndarray]]:
    """``(peft_jax config, canonical state)`` of an HF PEFT AdaLoRA adapter.

    Raises:
        InvalidConfigError: a field this reader does not support, or a malformed rank_pattern (named).
        CheckpointError: tensors for a layer the model lacks, or that do not fit it or the rank_pattern.
    """
    _check_fields(config)
    method = _method(config)
    masks = _masks(config.get("rank_pattern"), method.init_r)
    by_module = _group(tensors)
    stray = sorted(set(masks) - set(by_module))
    if stray:
        raise errors.CheckpointError(f"adapter_config.json's rank_pattern names {stray}, which "
                                     "adapter_model.safetensors holds no tensors for")
    placements, state = [], {}
    for hf, leaves in sorted(by_module.items()):
        path = key_map.to_ours(hf)
        if f"{path}/kernel" not in base:
            raise errors.CheckpointError(f"the adapter adapts {hf!r}, but the model has no such layer ({path!r})")
        keep = masks.get(hf, np.ones(method.init_r, bool))
        for leaf, value in _full_factors(hf, leaves, keep, tuple(np.shape(base[f"{path}/kernel"]))).items():
            state[f"{path}/{name}/{leaf}"] = value
        placements.append(Placement(re.escape(path), method, what="HF PEFT adapter"))
    if not placements:
        raise errors.CheckpointError("adapter_model.safetensors holds no AdaLoRA tensors")
    return compose(*placements), state
