"""The LoRA family in HF PEFT's files: LoRA, rsLoRA, DoRA, per-module rank and alpha, LoRA on
embeddings, ``lora_bias`` and ``modules_to_save``.

HF PEFT's ``adapter_config.json`` (``peft_type: "LORA"``) names the adapted modules in
``target_modules`` (here the full dotted names, so exactly those modules match), the common
``r`` / ``lora_alpha`` and the exceptions in ``rank_pattern`` / ``alpha_pattern``.
``adapter_model.safetensors`` holds, under ``base_model.model.<module>.`` (the tensors here are
keyed without that prefix, which `peft_jax.io.hf_peft.files` adds), torch layouts:
``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)`` (our ``lora_a`` ``(in, r)`` and
``lora_b`` ``(r, out)`` transposed), ``lora_embedding_A`` ``(r, vocab)`` / ``lora_embedding_B``
``(dim, r)`` on embeddings, ``lora_B.bias``, ``lora_magnitude_vector`` ``(out,)`` for DoRA, and a
module trained whole as ``<module>.weight`` / ``.bias``.

Example:
    >>> import numpy as np
    >>> from peft_jax.methods import Lora
    >>> from peft_jax.io.hf_peft.keys import DECODER
    >>> sites = [("layers/0/self_attn/q_proj", "linear", (Lora(rank=2, alpha=4),))]
    >>> state = {"layers/0/self_attn/q_proj/default/lora_a": np.ones((8, 2), np.float32),
    ...          "layers/0/self_attn/q_proj/default/lora_b": np.zeros((2, 8), np.float32)}
    >>> config, tensors = export_lora(sites, state, {}, "default", DECODER)
    >>> config["target_modules"], config["r"], config["lora_alpha"]
    (['model.layers.0.self_attn.q_proj'], 2, 4)
    >>> sorted(tensors)[0], tensors[sorted(tensors)[0]].shape
    ('model.layers.0.self_attn.q_proj.lora_A.weight', (2, 8))
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peft_jax import errors
from peft_jax.io.hf_peft.fields import most_common, one_value, pattern_value, plain_number
from peft_jax.io.hf_peft.keys import ROOT, KeyMap
from peft_jax.methods import Dora, Lora, ModulesToSave
from peft_jax.methods.config import Placement, compose

__all__ = ["export_lora", "import_lora", "is_lora_family"]

Sites = Sequence[tuple[str, str, tuple[Any, ...]]]

# adapter_config.json fields: read and used, or harmless to ignore (inits, bookkeeping) ...
_USED = {"peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
         "use_dora", "lora_bias", "modules_to_save", "lora_dropout", "bias", "fan_in_fan_out"}
IGNORED_FIELDS = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
            "init_lora_weights", "megatron_core", "qalora_group_size", "ensure_weight_tying", "loftq_config",
            "eva_config", "corda_config", "kasa_config", "lora_ga_config", "monteclora_config",
            "target_parameters", "layers_to_transform", "layers_pattern", "layer_replication", "exclude_modules",
            "megatron_config", "alora_invocation_tokens", "arrow_config", "use_bdlora", "use_qalora",
            "trainable_token_indices", "velora_config"}
# ... unless set: these change what the adapter computes, which this reader does not model.
MUST_BE_EMPTY = ("loftq_config", "layers_to_transform", "layers_pattern", "layer_replication",
                  "megatron_config", "alora_invocation_tokens", "arrow_config", "use_bdlora", "use_qalora",
                  "trainable_token_indices", "target_parameters", "velora_config")
_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_embedding_A": "lora_a",
           "lora_embedding_B": "lora_b", "lora_B.bias": "lora_bias", "lora_magnitude_vector": "magnitude"}


def _lora_of(method: Any) -> Lora | None:
    if isinstance(method, Dora):
        return method.lora
    return method if type(method) is Lora else None


def is_lora_family(sites: Sites) -> bool:
    """Whether every method on ``sites`` is LoRA, DoRA or a module trained whole."""
    return all(_lora_of(m) is not None or isinstance(m, ModulesToSave) for _, _, ms in sites for m in ms)


def export_lora(sites: Sites, state: Mapping[str, np.ndarray], base: Mapping[str, Any], name: str,
                key_map: KeyMap) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json fields, adapter_model.safetensors tensors)`` of a LoRA-family adapter.

    ``base`` holds the frozen base leaves by path (an ``<path>/embedding`` entry marks an
    embedding site); ``state`` is the canonical flat state of adapter ``name``.

    Raises:
        InvalidConfigError: a method outside the family, several methods on one site, or
            rsLoRA / DoRA / lora_bias mixed within the adapter.
    """
    loras, saved, tensors = {}, [], {}
    for path, _, methods in sites:
        if len(methods) != 1 or not is_lora_family([(path, "", methods)]):
            raise errors.InvalidConfigError(
                f"HF PEFT's LoRA format holds one LoRA, DoRA or modules_to_save per module; {path!r} has "
                f"{[type(m).__name__ for m in methods]}; save it in peft_jax's format (peft_jax.save_adapter)")
        hf = key_map.to_hf(path)
        own = {k.removeprefix(f"{path}/{name}/"): v for k, v in state.items() if k.startswith(f"{path}/{name}/")}
        if isinstance(methods[0], ModulesToSave):
            saved.append(hf)
            for leaf, value in own.items():
                torch_leaf = "bias" if leaf == "bias" else "weight"
                tensors[f"{hf}.{torch_leaf}"] = np.asarray(value).T if leaf == "kernel" else value
            continue
        loras[hf] = (methods[0], f"{path}/embedding" in base)
        a, b = (np.asarray(own[k]) for k in ("lora_a", "lora_b"))
        if a.ndim != 2 or b.ndim != 2:
            raise errors.InvalidConfigError(
                f"{path!r} has LoRA factors of shapes {a.shape} / {b.shape}; HF PEFT's format holds 2-D "
                "(Linear / Embedding) factors only; save it in peft_jax's format")
        embed = loras[hf][1]
        tensors[f"{hf}.{'lora_embedding_A' if embed else 'lora_A.weight'}"] = a.T
        tensors[f"{hf}.{'lora_embedding_B' if embed else 'lora_B.weight'}"] = b.T
        if "lora_bias" in own:
            tensors[f"{hf}.lora_B.bias"] = np.asarray(own["lora_bias"]).reshape(-1)
        if "magnitude" in own:
            tensors[f"{hf}.lora_magnitude_vector"] = np.asarray(own["magnitude"]).reshape(-1)
    if not loras:
        raise errors.InvalidConfigError("the adapter has no LoRA or DoRA module; HF PEFT's LoRA format needs one")
    lora = {hf: _lora_of(m) for hf, (m, _) in loras.items()}
    r = most_common([x.rank for x in lora.values()])
    alpha = most_common([x.alpha for x in lora.values()])
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": plain_number(alpha), "target_modules": sorted(loras),
        "rank_pattern": {re.escape(hf): x.rank for hf, x in lora.items() if x.rank != r},
        "alpha_pattern": {re.escape(hf): plain_number(x.alpha) for hf, x in lora.items() if x.alpha != alpha},
        "use_rslora": one_value([x.use_rslora for x in lora.values()], "use_rslora"),
        "use_dora": one_value([isinstance(m, Dora) for m, _ in loras.values()], "use_dora"),
        "lora_bias": one_value([x.lora_bias for x in lora.values()], "lora_bias"),
        "lora_dropout": most_common([x.dropout for x in lora.values()]),
        "modules_to_save": sorted(saved) or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return config, tensors


def _check_fields(config: Mapping[str, Any]) -> None:
    unknown = sorted(set(config) - _USED - IGNORED_FIELDS)
    if unknown:
        raise errors.InvalidConfigError(
            f"adapter_config.json has field(s) {unknown} this reader does not know; they may change what the "
            "adapter computes, so it is not loaded (remove them if they are defaults)")
    for field in MUST_BE_EMPTY:
        if config.get(field) not in (None, False, {}, [], ""):
            raise errors.InvalidConfigError(
                f"adapter_config.json sets {field}={config[field]!r}, which peft_jax does not support; "
                "merge or convert the adapter in HF PEFT first")
    if config.get("bias", "none") != "none":
        raise errors.InvalidConfigError(
            f"adapter_config.json sets bias={config['bias']!r} (trained base biases), which this reader does "
            "not support; only bias='none' is read")
    if config.get("fan_in_fan_out"):
        raise errors.InvalidConfigError(
            "adapter_config.json sets fan_in_fan_out=True (GPT-2 Conv1D layers); the reference models use "
            "Linear layers, so the factors would be read transposed")


def _group(tensors: Mapping[str, np.ndarray], saved: Sequence[str]) -> tuple[dict, dict]:
    """HF tensors by module: ``({module: {our leaf: array}}, {saved module: {torch leaf: array}})``."""
    adapted: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    whole: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        rest = key.removeprefix(ROOT)
        leaf = next((suffix for suffix in _LEAVES if rest.endswith("." + suffix)), None)
        if leaf is not None:
            adapted[rest[: -len(leaf) - 1]][_LEAVES[leaf]] = value
            continue
        if rest.endswith(".base_layer.weight"):
            continue  # HF also writes a targeted embedding's base weight: the base is ours
        module, _, torch_leaf = rest.rpartition(".")
        if any(module == s or module.endswith("." + s) for s in saved) and torch_leaf in ("weight", "bias"):
            whole[module][torch_leaf] = value
            continue
        raise errors.CheckpointError(f"adapter_model.safetensors holds {key!r}, which is no LoRA tensor this "
                                     "reader knows; the file may be of another method or damaged")
    return adapted, whole


def import_lora(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], base: Mapping[str, Any],
                name: str, key_map: KeyMap) -> tuple[Any, dict[str, np.ndarray]]:
    """``(peft_jax config, canonical state)`` of an HF PEFT LoRA adapter, for a model whose frozen
    base leaves are ``base`` (by path: used to find each module and its shapes).

    Raises:
        InvalidConfigError: a field this reader does not support (named).
        CheckpointError: a tensor for a module the model lacks, or of another shape (named).
    """
    _check_fields(config)
    adapted, whole = _group(tensors, config.get("modules_to_save") or ())
    placements, state = [], {}
    for hf, leaves in sorted(adapted.items()):
        path = key_map.to_ours(hf)
        embed = f"{path}/embedding" in base
        if f"{path}/kernel" not in base and not embed:
            raise errors.CheckpointError(f"the adapter adapts {hf!r}, but the model has no such layer ({path!r})")
        if "lora_a" not in leaves or "lora_b" not in leaves:
            raise errors.CheckpointError(f"the adapter's {hf!r} lacks lora_A or lora_B; the file is incomplete")
        a, b = np.asarray(leaves["lora_a"]).T, np.asarray(leaves["lora_b"]).T
        full = tuple(np.shape(base[f"{path}/embedding" if embed else f"{path}/kernel"]))
        if (a.shape[0], b.shape[1]) != full or a.shape[1] != b.shape[0]:
            raise errors.CheckpointError(
                f"tensor {ROOT}{hf}.lora_A/B of shapes {a.T.shape} / {b.T.shape} does not fit the model's "
                f"{path!r} of shape {full}; load it onto the base it was made for")
        rank = a.shape[1]
        want = pattern_value(config.get("rank_pattern") or {}, hf, config.get("r", rank))
        if want != rank:
            raise errors.CheckpointError(
                f"tensor {ROOT}{hf}.lora_A has rank {rank}, but adapter_config.json gives {hf!r} rank {want}; "
                "the file does not match its config")
        lora = Lora(rank=rank, alpha=float(pattern_value(config.get("alpha_pattern") or {}, hf,
                                                          config.get("lora_alpha", 8))),
                    dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora")),
                    lora_bias="lora_bias" in leaves)
        dora = bool(config.get("use_dora"))
        if dora != ("magnitude" in leaves):
            raise errors.CheckpointError(f"use_dora={dora} but {hf!r} {'lacks' if dora else 'has'} "
                                         "lora_magnitude_vector; the file does not match its config")
        placements.append(Placement(re.escape(path), Dora(lora=lora) if dora else lora, what="HF PEFT adapter"))
        state[f"{path}/{name}/lora_a"], state[f"{path}/{name}/lora_b"] = a, b
        for leaf in ("lora_bias", "magnitude"):
            if leaf in leaves:
                state[f"{path}/{name}/{leaf}"] = np.asarray(leaves[leaf]).reshape(-1)
    for hf, leaves in sorted(whole.items()):
        path = key_map.to_ours(hf)
        placements.append(Placement(re.escape(path), ModulesToSave(), what="HF PEFT modules_to_save"))
        kernel_leaf = "embedding" if f"{path}/embedding" in base else "kernel"
        if f"{path}/{kernel_leaf}" not in base:
            raise errors.CheckpointError(f"modules_to_save names {hf!r}, but the model has no such module")
        for torch_leaf, value in leaves.items():
            leaf = "bias" if torch_leaf == "bias" else kernel_leaf
            state[f"{path}/{name}/{leaf}"] = np.asarray(value).T if leaf == "kernel" else np.asarray(value)
    if not placements:
        raise errors.CheckpointError("adapter_model.safetensors holds no LoRA tensors")
    return compose(*placements), state
