"""IA3, VeRA, LoHa, LoKr, OFT, LayerNorm tuning, BEFT and trainable tokens in HF PEFT's files:
one method per module, its tensors under ``base_model.model.<module>.`` in torch layout (VeRA's
shared projections as ``base_model.vera_A`` / ``vera_B``).

Each family is a table: its ``peft_type``, its method class, and which of the method's fields
``adapter_config.json`` holds (under HF's name; ``rank`` is HF's ``r``). Per-module ranks and
alphas go to ``rank_pattern`` / ``alpha_pattern``; IA3's per-module ``feedforward`` to
``feedforward_modules``; every other field must be one value for the adapter. Tensors keep HF's
names (``ia3_l``, ``hada_w1_a``, ``lokr_w2_b``, ``oft_R.weight``, ``ln_tuning_layers.weight``,
``beft_bias``, ``trainable_tokens_delta``); LoHa / LoKr factors are transposed (our ``(in, out)``
against torch's ``(out, in)``), IA3's vector is ``(out, 1)`` in HF, or ``(1, in)`` on a
feed-forward module, BEFT's bias ``(1, out)``.

Example:
    >>> import numpy as np
    >>> from peft_jax.methods import IA3
    >>> from peft_jax.io.hf_peft.keys import DECODER
    >>> sites = [("layers/0/mlp/down_proj", "linear", (IA3(feedforward=True),))]
    >>> state = {"layers/0/mlp/down_proj/default/ia3_l": np.ones(6, np.float32)}
    >>> config, tensors = export_per_module(sites, state, "default", DECODER)
    >>> config["peft_type"], config["feedforward_modules"], tensors[ROOT + "model.layers.0.mlp.down_proj.ia3_l"].shape
    ('IA3', ['model.layers.0.mlp.down_proj'], (1, 6))
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peft_jax import errors
from peft_jax.io.hf_peft.fields import most_common, one_value, pattern_value
from peft_jax.io.hf_peft.keys import ROOT, KeyMap
from peft_jax.methods import IA3, OFT, Beft, LnTuning, LoHa, LoKr, TrainableTokens, Vera
from peft_jax.methods.config import Placement, compose

__all__ = ["FAMILIES", "export_per_module", "family_of", "import_per_module"]

Sites = Sequence[tuple[str, str, tuple[Any, ...]]]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one method family sits in HF PEFT's files."""

    peft_type: str
    method: type
    #: our fields that adapter_config.json holds as one value for the adapter.
    uniform: tuple[str, ...]
    #: whether rank / alpha may differ per module (HF's rank_pattern / alpha_pattern).
    patterns: bool = False


FAMILIES = {f.peft_type: f for f in (
    Family("IA3", IA3, ()),
    Family("LOHA", LoHa, ("rank_dropout", "module_dropout", "init_weights"), patterns=True),
    Family("LOKR", LoKr, ("decompose_both", "decompose_factor", "rank_dropout", "rank_dropout_scale",
                          "module_dropout", "init_weights"), patterns=True),
    Family("OFT", OFT, ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share", "use_cayley_neumann",
                        "num_cayley_neumann_terms", "init_weights")),
    Family("LN_TUNING", LnTuning, ()),
    Family("BEFT", Beft, ()),
    Family("TRAINABLE_TOKENS", TrainableTokens, ("indices",)),
    Family("VERA", Vera, ("rank", "projection_prng_key", "d_initial", "dropout")),
)}
_HF_FIELD = {"rank": "r", "indices": "token_indices", "dropout": "vera_dropout"}
#: VeRA's projections shared by all layers sit outside the per-module prefix.
_SHARED_ROOT = "base_model."
# our leaf <-> HF's, where they differ
_LEAF_TO_HF = {"oft_r": "oft_R.weight", "scale": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"}
_LEAF_TO_OURS = {v: k for k, v in _LEAF_TO_HF.items()}
# Fields every family's config may carry that do not change what the saved adapter computes.
_IGNORED = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
            "exclude_modules", "init_ia3_weights", "init_weights", "use_effective_conv2d", "modules_to_save",
            "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "save_projection"}
_MUST_BE_EMPTY = ("modules_to_save", "layers_to_transform", "layers_pattern", "fan_in_fan_out")


def family_of(sites: Sites) -> Family | None:
    """The family every site's single method belongs to, or ``None``."""
    kinds = {type(ms[0]) for _, _, ms in sites if len(ms) == 1}
    if len(kinds) != 1 or any(len(ms) != 1 for _, _, ms in sites):
        return None
    kind = kinds.pop()
    return next((f for f in FAMILIES.values() if f.method is kind), None)


def _to_hf(leaf: str, value: np.ndarray, method: Any) -> tuple[str, np.ndarray]:
    if leaf == "ia3_l":
        return leaf, value.reshape((1, -1) if method.feedforward else (-1, 1))
    if leaf == "beft_bias":
        return leaf, value.reshape(1, -1)
    if leaf in _LEAF_TO_HF:
        return _LEAF_TO_HF[leaf], value
    transpose = value.ndim == 2 and leaf.startswith(("hada_", "lokr_"))
    return leaf, value.T if transpose else value


def _to_ours(hf_leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if hf_leaf in ("ia3_l", "beft_bias"):
        return hf_leaf, value.reshape(-1)
    if hf_leaf in _LEAF_TO_OURS:
        return _LEAF_TO_OURS[hf_leaf], value
    transpose = value.ndim == 2 and hf_leaf.startswith(("hada_", "lokr_"))
    return hf_leaf, value.T if transpose else value


def export_per_module(sites: Sites, state: Mapping[str, np.ndarray], name: str,
                      key_map: KeyMap) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json fields, tensors by their keys in adapter_model.safetensors)``."""
    family = family_of(sites)
    if family is None:
        raise errors.InvalidConfigError("the sites do not hold one IA3, LoHa, LoKr or OFT method each")
    methods = {key_map.to_hf(path): ms[0] for path, _, ms in sites}
    tensors = {}
    for path, _, (method,) in sites:
        prefix = f"{path}/{name}/"
        for key, value in state.items():
            if key.startswith(prefix):
                hf_leaf, array = _to_hf(key[len(prefix):], np.asarray(value), method)
                tensors[f"{ROOT}{key_map.to_hf(path)}.{hf_leaf}"] = array
    shared = f"{name}/shared/"
    tensors.update({_SHARED_ROOT + k[len(shared):]: np.asarray(v) for k, v in state.items() if k.startswith(shared)})
    config: dict[str, Any] = {"peft_type": family.peft_type, "target_modules": sorted(methods)}
    if family.method is Vera:  # always with the projections: HF would redraw them with torch's RNG
        config["save_projection"] = True
    for field in family.uniform:
        value = one_value([getattr(m, field) for m in methods.values()], f"{family.peft_type} {field}")
        config[_HF_FIELD.get(field, field)] = list(value) if isinstance(value, tuple) else value
    if family.patterns:
        for field, pattern in (("rank", "rank_pattern"), ("alpha", "alpha_pattern")):
            values = {hf: getattr(m, field) for hf, m in methods.items()}
            common = most_common(list(values.values()))
            config[_HF_FIELD.get(field, field)] = common
            config[pattern] = {re.escape(hf): v for hf, v in values.items() if v != common}
    if family.method is IA3:
        config["feedforward_modules"] = sorted(hf for hf, m in methods.items() if m.feedforward)
    return config, tensors


def _matches(selector: Any, hf: str) -> bool:
    """HF PEFT's module matching: a string is a regex on the whole name; a list holds names
    matched exactly or as a dotted suffix."""
    if isinstance(selector, str):
        return re.fullmatch(selector, hf) is not None
    return any(hf == s or hf.endswith("." + s) for s in selector or ())


def _check_fields(config: Mapping[str, Any], family: Family) -> None:
    known = {"peft_type", "target_modules", "feedforward_modules", "rank_pattern", "alpha_pattern", "r", "alpha",
             *(_HF_FIELD.get(f, f) for f in family.uniform)} | _IGNORED
    unknown = sorted(set(config) - known)
    if unknown:
        raise errors.InvalidConfigError(
            f"adapter_config.json ({family.peft_type}) has field(s) {unknown} this reader does not know; they may "
            "change what the adapter computes, so it is not loaded")
    for field in _MUST_BE_EMPTY:
        if config.get(field) not in (None, False, [], {}, ""):
            raise errors.InvalidConfigError(
                f"adapter_config.json ({family.peft_type}) sets {field}={config[field]!r}, which this reader does "
                "not support yet; save the adapter without it, or use the LoRA family")
    if config.get("bias", "none") != "none":
        raise errors.InvalidConfigError(f"adapter_config.json sets bias={config['bias']!r}; only 'none' is read")


def import_per_module(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], base: Mapping[str, Any],
                      name: str, key_map: KeyMap) -> tuple[Any, dict[str, np.ndarray]]:
    """``(peft_jax config, canonical state)`` of an HF PEFT IA3 / LoHa / LoKr / OFT adapter."""
    family = FAMILIES[config["peft_type"]]
    _check_fields(config, family)
    by_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    placements, state = [], {}
    for key, value in tensors.items():
        if key.startswith(_SHARED_ROOT) and not key.startswith(ROOT):
            state[f"{name}/shared/{key[len(_SHARED_ROOT):]}"] = np.asarray(value)
            continue
        rest = key.removeprefix(ROOT)
        hf_leaf = next((two for two in _LEAF_TO_OURS if rest.endswith("." + two)), rest.rpartition(".")[2])
        by_module[rest[: -len(hf_leaf) - 1]][hf_leaf] = np.asarray(value)
    if family.method is Vera and not any(k.startswith(f"{name}/shared/") for k in state):
        raise errors.CheckpointError(
            "this VeRA adapter was saved without its projections (save_projection=False): HF PEFT redraws them "
            "with torch's random generator, which peft_jax cannot reproduce; save it with save_projection=True")
    for hf, leaves in sorted(by_module.items()):
        path = key_map.to_ours(hf)
        if not any(k.startswith(path + "/") for k in base):
            raise errors.CheckpointError(f"the adapter adapts {hf!r}, but the model has no such layer ({path!r})")
        fields = {f: config[_HF_FIELD.get(f, f)] for f in family.uniform if _HF_FIELD.get(f, f) in config}
        if "indices" in fields:
            fields["indices"] = tuple(int(i) for i in fields["indices"])
        if family.patterns:
            fields["rank"] = pattern_value(config.get("rank_pattern") or {}, hf, config.get("r", 8))
            fields["alpha"] = float(pattern_value(config.get("alpha_pattern") or {}, hf, config.get("alpha", 8)))
        if family.method is IA3:
            fields["feedforward"] = _matches(config.get("feedforward_modules"), hf)
        try:
            method = family.method(**fields)
        except (TypeError, ValueError) as e:
            raise errors.InvalidConfigError(f"adapter_config.json's {family.peft_type} fields do not build a "
                                            f"method for {hf!r}: {e}") from e
        placements.append(Placement(re.escape(path), method, what="HF PEFT adapter"))
        for hf_leaf, value in leaves.items():
            leaf, array = _to_ours(hf_leaf, value)
            state[f"{path}/{name}/{leaf}"] = array
    if not placements:
        raise errors.CheckpointError(f"adapter_model.safetensors holds no {family.peft_type} tensors")
    return compose(*placements), state
