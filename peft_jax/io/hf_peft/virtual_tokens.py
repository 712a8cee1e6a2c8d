"""HF PEFT's adapter files for the prompt family: prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter.

What HF PEFT writes (``get_peft_model_state_dict``) and how it maps to ours:

* ``PROMPT_TUNING``: ``prompt_embeddings (N, d)`` is `PromptTuning`'s param of the same name.
* ``P_TUNING``: ``prompt_embeddings (N, d)`` is the *encoder's output* (HF saves no MLP / LSTM);
  export folds ours (`peft_jax.methods.p_tuning.fold_prompt`), import cannot invert it and gives
  plain prompt tuning with those embeddings, whose outputs are the same (HF itself serves the file
  that way in inference mode).
* ``PREFIX_TUNING``: ``prompt_embeddings (N, 2·L·KV·d)`` is the flat prefix of every layer
  (`peft_jax.methods.prefix.to_prompt_embeddings`); a reparameterized prefix is saved as its MLP's
  output and written with ``prefix_projection: false``, so HF loads the table as the prefix itself,
  trainable or not. Import gives the flat `PrefixTuning` (with HF's position shift). HF has no
  prefix gates: a gated prefix raises; the prefix dropout (training only) is not written.
* ``ADAPTION_PROMPT``: ``base_model.model.<attention module>.adaption_prompt (1, n, features)`` and
  ``.adaption_gate (1,)`` per adapted layer are `AdaptionPrompt`'s params (ours without the 1).

Paths: exporting reads the layer index from each attention site's path; importing needs our tap
paths, known for the reference models (`LAYOUTS`: the decoder, the encoder and its classifier,
whose backbone attribute ``backbone`` names). The caller adds the common config fields
(``base_model_name_or_path``, ``task_type``, ...) and reads / writes the files.

Example:
    >>> import numpy as np
    >>> hf = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 3, "task_type": "CAUSAL_LM"}
    >>> config, state = import_virtual_tokens(hf, {"prompt_embeddings": np.ones((2, 3))}, "Decoder", "mine")
    >>> config.method, {k: v.shape for k, v in state.items()}
    (PromptTuning(num_virtual_tokens=2, prompt_init='random', token_ids=None), {'input_tap/mine/prompt_embeddings': (2, 3)})
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from peft_jax import errors
from peft_jax.io.frontends import AdapterParts
from peft_jax.methods.adaption_prompt import AdaptionPrompt
from peft_jax.methods.base import AttentionSite
from peft_jax.methods.p_tuning import PTuning, fold_prompt
from peft_jax.methods.prefix import PrefixPositions, PrefixTuning, from_prompt_embeddings
from peft_jax.methods.prompt import PromptTuning
from peft_jax.methods.recipes import llama_adapter, prefix_tuning, prompt_tuning

__all__ = ["LAYOUTS", "VIRTUAL_TOKEN_TYPES", "Layout", "export_virtual_tokens", "import_virtual_tokens",
           "is_virtual_token"]

VIRTUAL_TOKEN_TYPES: frozenset[str] = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"})

_FAMILY = (PromptTuning, PTuning, PrefixTuning, PrefixPositions, AdaptionPrompt)
#: the key prefix of HF's adaption-prompt tensors (the PeftModel's ``base_model.model``).
_ROOT = "base_model.model."
#: config fields every PEFT config has, or that only steer HF's init: read and not needed.
_COMMON = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                     "auto_mapping", "peft_version", "modules_to_save"})
_PROMPT_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                            "num_layers"})
_FIELDS = {
    "PROMPT_TUNING": _PROMPT_FIELDS | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                       "tokenizer_kwargs"},
    "P_TUNING": _PROMPT_FIELDS | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                                  "encoder_dropout"},
    "PREFIX_TUNING": _PROMPT_FIELDS | {"encoder_hidden_size", "prefix_projection", "init_weights"},
    "ADAPTION_PROMPT": frozenset({"adapter_len", "adapter_layers", "target_modules"}),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a reference model's taps are: its input tap, its attention taps (``{i}``: the layer),
    and the HF module name of an attention tap's parent minus ``hf_root`` (HF's extra prefix)."""

    input: str
    attention: str
    hf_root: str = ""

    def attention_path(self, index: int) -> str:
        """Our attention tap path of layer ``index``.

        Example:
            >>> LAYOUTS["Decoder"].attention_path(3)
            'layers/3/self_attn/attention_tap'
        """
        return self.attention.format(i=index)

    def hf_module(self, path: str) -> str:
        """HF's module name of the attention module holding our tap at ``path``.

        Example:
            >>> LAYOUTS["Decoder"].hf_module("layers/1/self_attn/attention_tap")
            'model.layers.1.self_attn'
        """
        return self.hf_root + path.rsplit("/", 1)[0].replace("/", ".")

    def backbone(self, name: str) -> "Layout":
        """This layout under a classifier's backbone attribute ``name`` (``bert``, ``roberta``).

        Example:
            >>> LAYOUTS["Encoder"].backbone("roberta").input
            'roberta/input_tap'
        """
        return Layout(f"{name}/{self.input}", f"{name}/{self.attention}", self.hf_root)


_ENCODER = Layout("input_tap", "encoder/layer/{i}/attention/self/attention_tap")
#: the reference models' layouts by class name.
LAYOUTS: dict[str, Layout] = {"Decoder": Layout("input_tap", "layers/{i}/self_attn/attention_tap", "model."),
                              "Encoder": _ENCODER, "EncoderForSequenceClassification": _ENCODER.backbone("bert")}


def _layout(architecture: str, backbone: str | None) -> Layout:
    cls = architecture.rsplit(".", 1)[-1]
    if cls not in LAYOUTS:
        raise errors.UnsupportedArchitectureError(
            f"cannot place an HF PEFT prompt-family adapter on {architecture!r}: our tap paths are known for "
            f"{sorted(LAYOUTS)}; load the adapter onto one of those, or write the state yourself")
    layout = LAYOUTS[cls]
    return layout if backbone is None or cls != "EncoderForSequenceClassification" else _ENCODER.backbone(backbone)


# --- export --------------------------------------------------------------------------------------------
def is_virtual_token(parts: AdapterParts) -> bool:
    """Whether ``parts`` holds a prompt-family method (prompt / P- / prefix tuning, LLaMA-Adapter).

    Example:
        >>> m = PromptTuning(num_virtual_tokens=2)
        >>> is_virtual_token(AdapterParts("a", "Decoder", (("input_tap", "inputs", (m,)),), {}, {}))
        True
    """
    return any(isinstance(m, _FAMILY) for _, _, methods in parts.sites for m in methods)


def _params(parts: AdapterParts, path: str) -> dict[str, np.ndarray]:
    root = f"{path}/{parts.name}/"
    return {k[len(root):]: np.asarray(v) for k, v in parts.state.items() if k.startswith(root)}


def _shared(parts: AdapterParts) -> dict[str, np.ndarray]:
    root = f"{parts.name}/shared/"
    return {k[len(root):]: np.asarray(v) for k, v in parts.state.items() if k.startswith(root)}


def _one_method(parts: AdapterParts) -> tuple[type, list[tuple[str, str, Any]]]:
    """The prompt-family method class of ``parts`` and its sites ``(path, kind, method)``."""
    found, other = [], []
    for path, kind, methods in parts.sites:
        for m in methods:
            (found if isinstance(m, _FAMILY) else other).append((path, kind, m))
    if other:
        names = sorted({type(m).__name__ for _, _, m in other})
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} combines a prompt-family method with {', '.join(names)}: an HF PEFT adapter "
            "file holds one method type; save them as separate adapters")
    main = {type(m) for _, _, m in found} - {PrefixPositions}
    if len(main) != 1:
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} holds {sorted(c.__name__ for c in main) or 'only PrefixPositions'}: an HF PEFT "
            "file holds exactly one of prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter")
    cls = main.pop()
    if PrefixPositions in {type(m) for _, _, m in found} and cls is not PrefixTuning:
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} shifts positions (PrefixPositions) without prefix tuning; HF PEFT has no such "
            "adapter")
    return cls, found


def _input_site(parts: AdapterParts, sites: list) -> tuple[str, Any]:
    inputs = [(path, m) for path, kind, m in sites if not isinstance(m, PrefixPositions)]
    if len(inputs) != 1:
        raise errors.UnsupportedArchitectureError(
            f"adapter {parts.name!r} has {len(inputs)} input sites ({[p for p, _ in inputs]}); this exporter writes "
            "one prompt (num_transformer_submodules=1, decoder-only or encoder-only models)")
    return inputs[0]


def _prompt_common(n: int, width: int) -> dict[str, Any]:
    # num_layers / num_attention_heads: HF fills them from the base model's config (unused by prompts).
    return {"num_virtual_tokens": n, "token_dim": width, "num_transformer_submodules": 1,
            "num_attention_heads": None, "num_layers": None}


def _export_prompt(parts: AdapterParts, sites: list) -> tuple[dict, dict[str, np.ndarray]]:
    path, method = _input_site(parts, sites)
    params = _params(parts, path)
    if isinstance(method, PTuning):
        table = np.asarray(fold_prompt(method, params), np.float32)
        fields = {"peft_type": "P_TUNING", "encoder_reparameterization_type": method.encoder.upper(),
                  "encoder_hidden_size": method.encoder_hidden_size or table.shape[1],
                  "encoder_num_layers": method.encoder_num_layers, "encoder_dropout": method.encoder_dropout}
    else:
        table = np.asarray(params["prompt_embeddings"], np.float32)
        # the values are in the file: HF's init (TEXT would need a tokenizer) only matters for a new prompt.
        fields = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                  "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    return {**fields, **_prompt_common(*table.shape)}, {"prompt_embeddings": table}


_INDEX = re.compile(r"(?:^|/)(\d+)(?:/|$)")


def _layer_index(path: str) -> int:
    found = _INDEX.search(path)
    if found is None:
        raise errors.UnsupportedArchitectureError(
            f"the attention site {path!r} has no layer number in its path; HF PEFT's prefix table is per layer")
    return int(found.group(1))


def _export_prefix(parts: AdapterParts, sites: list) -> tuple[dict, dict[str, np.ndarray]]:
    attention = sorted(((_layer_index(p), p, m) for p, kind, m in sites if kind == "attention"))
    method = attention[0][2]
    if not any(isinstance(m, PrefixPositions) for _, _, m in sites):
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} does not count the prefix in positions (count_positions=False, AdapterHub's "
            "convention); HF PEFT always does, so it would compute other outputs. Train with prefix_tuning(...) "
            "defaults to export to HF PEFT")
    if method.use_gating:
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} has prefix gates (use_gating=True, AdapterHub / UniPELT); HF PEFT's prefix "
            "tuning has none. Save it in the native format instead")
    layers = [i for i, _, _ in attention]
    if layers != list(range(len(layers))):
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} puts prefixes on layers {layers}; HF PEFT's table has one for every layer "
            "0..L-1: target every attention layer")
    if method.projection:
        s = _shared(parts)
        hidden = np.tanh(s["prefix_embedding"] @ s["prefix_hidden_kernel"] + s["prefix_hidden_bias"])
        table = hidden @ s["prefix_out_kernel"] + s["prefix_out_bias"]
        kv_heads = None  # not in the MLP's shapes: HF takes it from the base model's config
        token_dim = s["prefix_embedding"].shape[1]
    else:
        columns = []
        for _, path, _ in attention:
            p = _params(parts, path)
            n, kv_heads, head_dim = p["prefix_key"].shape
            columns += [p["prefix_key"].reshape(n, -1), p["prefix_value"].reshape(n, -1)]
        table, token_dim = np.concatenate(columns, axis=-1), kv_heads * head_dim
    fields = {"peft_type": "PREFIX_TUNING", "prefix_projection": False, "encoder_hidden_size": token_dim,
              "init_weights": None, "num_virtual_tokens": method.num_virtual_tokens, "token_dim": token_dim,
              "num_transformer_submodules": 1, "num_attention_heads": kv_heads, "num_layers": len(attention)}
    return fields, {"prompt_embeddings": np.asarray(table, np.float32)}


def _export_adaption(parts: AdapterParts, sites: list) -> tuple[dict, dict[str, np.ndarray]]:
    layout = _layout(parts.architecture, None)
    method = sites[0][2]
    if len(sites) != method.adapter_layers:
        raise errors.InvalidConfigError(
            f"adapter {parts.name!r} adapts {len(sites)} layers, but its AdaptionPrompt says adapter_layers="
            f"{method.adapter_layers}; HF PEFT adapts exactly the top adapter_layers")
    tensors, targets = {}, set()
    for path, _, _ in sites:
        module = layout.hf_module(path)
        targets.add(module.rsplit(".", 1)[-1])
        p = _params(parts, path)
        tensors[f"{_ROOT}{module}.adaption_prompt"] = np.asarray(p["adaption_prompt"], np.float32)[None]
        tensors[f"{_ROOT}{module}.adaption_gate"] = np.asarray(p["adaption_gate"], np.float32).reshape(1)
    fields = {"peft_type": "ADAPTION_PROMPT", "adapter_len": method.adapter_len,
              "adapter_layers": method.adapter_layers, "target_modules": targets.pop()}
    return fields, tensors


def export_virtual_tokens(parts: AdapterParts) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config.json fields, adapter_model.safetensors tensors)`` of a prompt-family adapter.

    The fields include ``peft_type`` and every field HF PEFT's config class for it reads (the caller
    adds ``base_model_name_or_path``, ``task_type``, ``revision``, ``inference_mode``); the tensors are
    float32, by their final keys, in torch's layout. Fields `AdapterParts` cannot tell are null, and
    HF fills them from the base model's config: ``num_layers`` / ``num_attention_heads`` of prompts,
    and ``num_attention_heads`` (key/value heads) of a reparameterized prefix, whose MLP does not
    show how its width splits into heads (importing such a file back needs ``num_kv_heads=``).

    Raises:
        InvalidConfigError: the adapter mixes methods, or uses what HF cannot express (prefix gates,
            unshifted prefix positions, prefixes on some layers only).
        UnsupportedArchitectureError: several input sites, or sites whose paths this cannot map.

    Example:
        >>> import numpy as np
        >>> m = PromptTuning(num_virtual_tokens=2)
        >>> parts = AdapterParts("a", "Decoder", (("input_tap", "inputs", (m,)),),
        ...                      {"input_tap/a/prompt_embeddings": np.ones((2, 4))}, {})
        >>> fields, tensors = export_virtual_tokens(parts)
        >>> fields["peft_type"], fields["token_dim"], {k: v.shape for k, v in tensors.items()}
        ('PROMPT_TUNING', 4, {'prompt_embeddings': (2, 4)})
    """
    cls, sites = _one_method(parts)
    if cls in (PromptTuning, PTuning):
        return _export_prompt(parts, sites)
    if cls is PrefixTuning:
        return _export_prefix(parts, sites)
    return _export_adaption(parts, sites)


# --- import --------------------------------------------------------------------------------------------
def _check_fields(hf_config: Mapping[str, Any], peft_type: str) -> None:
    unknown = sorted(set(hf_config) - _COMMON - _FIELDS[peft_type])
    if unknown:
        raise errors.InvalidConfigError(
            f"the {peft_type} adapter_config.json has fields this importer does not know: {unknown}; they may "
            "change the adapter's outputs, so it is refused (remove them if they are at their defaults)")
    if hf_config.get("modules_to_save"):
        raise errors.InvalidConfigError(
            f"the {peft_type} adapter also saves whole modules (modules_to_save={hf_config['modules_to_save']}); "
            "importing those with a prompt-family adapter is not supported")
    if hf_config.get("num_transformer_submodules", 1) not in (None, 1):
        raise errors.UnsupportedArchitectureError(
            f"the {peft_type} adapter has num_transformer_submodules={hf_config['num_transformer_submodules']} "
            "(an encoder-decoder model); only decoder-only and encoder-only models are supported")


def _tensor(tensors: Mapping[str, np.ndarray], key: str, peft_type: str) -> np.ndarray:
    if key not in tensors:
        raise errors.CheckpointError(
            f"the {peft_type} adapter_model.safetensors has no {key!r} (it has {sorted(tensors)[:6]}); the file is "
            "incomplete or of another adapter type")
    return np.asarray(tensors[key], np.float32)


def _prompt_table(hf_config, tensors, peft_type) -> np.ndarray:
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise errors.CheckpointError(f"the {peft_type} adapter file has tensors {extra} besides prompt_embeddings; "
                                     "it is not an HF PEFT prompt-learning adapter")
    table = _tensor(tensors, "prompt_embeddings", peft_type)
    n, dim = hf_config.get("num_virtual_tokens"), hf_config.get("token_dim")
    if table.ndim != 2 or (n is not None and table.shape[0] != n):
        raise errors.CheckpointError(
            f"the {peft_type} prompt_embeddings has shape {list(table.shape)}, but the config says "
            f"num_virtual_tokens={n}; the config and the tensors do not belong together")
    if peft_type != "PREFIX_TUNING" and dim is not None and table.shape[1] != dim:
        raise errors.CheckpointError(
            f"the {peft_type} prompt_embeddings is {table.shape[1]} wide, but the config says token_dim={dim}")
    return table


def _import_prefix(hf_config, table: np.ndarray, layout: Layout, name: str, num_kv_heads: int | None):
    num_layers, kv_heads, token_dim = (hf_config.get(k) for k in ("num_layers", "num_attention_heads", "token_dim"))
    if kv_heads is None:
        kv_heads = num_kv_heads
    elif num_kv_heads is not None and num_kv_heads != kv_heads:
        raise errors.CheckpointError(
            f"the PREFIX_TUNING config says num_attention_heads={kv_heads} key/value heads, but num_kv_heads="
            f"{num_kv_heads} was passed; load it onto the model it was saved for")
    if not all(isinstance(v, int) and v > 0 for v in (num_layers, kv_heads, token_dim)) or token_dim % kv_heads:
        raise errors.CheckpointError(
            f"the PREFIX_TUNING config needs num_layers, num_attention_heads (key/value heads) and token_dim to "
            f"split its table, got {num_layers}, {kv_heads}, {token_dim}; HF PEFT writes them when it saves "
            "(a reparameterized prefix exported by peft_jax leaves the heads null: pass num_kv_heads=)")
    sites = [AttentionSite(path=layout.attention_path(i), layer="AttentionTap", num_heads=kv_heads,
                           num_kv_heads=kv_heads, head_dim=token_dim // kv_heads, index=i, num_layers=num_layers)
             for i in range(num_layers)]
    per_site = from_prompt_embeddings(table, sites)
    state = {f"{path}/{name}/{k}": np.asarray(v) for path, p in per_site.items() for k, v in p.items()}
    return prefix_tuning(table.shape[0]), state


def _import_adaption(hf_config, tensors, layout: Layout, name: str):
    n, layers = hf_config.get("adapter_len"), hf_config.get("adapter_layers")
    if not all(isinstance(v, int) and v > 0 for v in (n, layers)):
        raise errors.CheckpointError(f"the ADAPTION_PROMPT config needs adapter_len and adapter_layers, got {n}, "
                                     f"{layers}")
    template = _ROOT + layout.hf_module(layout.attention)  # base_model.model.model.layers.{i}.self_attn
    pattern = re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + r"\.adaption_(prompt|gate)")
    state = {}
    for key, value in tensors.items():
        found = pattern.fullmatch(key)
        if found is None:
            raise errors.CheckpointError(
                f"the ADAPTION_PROMPT tensor {key!r} is not {template}.adaption_prompt / _gate of this architecture; "
                "load the adapter onto the model type it was saved from")
        path = layout.attention_path(int(found.group(1)))
        value = np.asarray(value, np.float32)
        state[f"{path}/{name}/adaption_{found.group(2)}"] = value[0] if found.group(2) == "prompt" else value
    if len(state) != 2 * layers:
        raise errors.CheckpointError(
            f"the ADAPTION_PROMPT file holds {len(state)} tensors, its config (adapter_layers={layers}) needs "
            f"{2 * layers} (a prompt and a gate per layer)")
    return llama_adapter(n, layers), state


def import_virtual_tokens(hf_config: dict, tensors: dict[str, np.ndarray], architecture: str, name: str,
                          *, backbone: str | None = None,
                          num_kv_heads: int | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """``(config, canonical state)`` of an HF PEFT prompt-family adapter, to attach with
    `peft_jax.nnx.attach(model, config, name=name)` and write with ``load_adapter_state``.

    A ``P_TUNING`` file comes back as prompt tuning (HF saves the encoder's output, not the encoder;
    the outputs are the same, the encoder cannot be trained further). A ``PREFIX_TUNING`` file comes
    back as a flat prefix (``prefix_projection`` files hold the MLP's output too).

    Args:
        hf_config: the whole adapter_config.json.
        tensors: adapter_model.safetensors, by its keys.
        architecture: the target model's class name (``Decoder``, ``peft_jax.models.encoder.Encoder`` ...).
        name: the adapter name for the state's keys.
        backbone: a classifier's backbone attribute (``"bert"`` by default, ``"roberta"``).
        num_kv_heads: the model's key/value heads, for a prefix file whose ``num_attention_heads`` is
            null (checked against it otherwise).

    Raises:
        InvalidConfigError: a ``peft_type`` outside the family, or config fields this does not know (named).
        CheckpointError: tensors missing, extra or misshapen for the config.
        UnsupportedArchitectureError: an architecture whose tap paths are unknown, or an
            encoder-decoder adapter.

    Example:
        >>> import numpy as np
        >>> hf = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_layers": 2,
        ...       "num_attention_heads": 1, "token_dim": 4, "prefix_projection": True}
        >>> config, state = import_virtual_tokens(hf, {"prompt_embeddings": np.ones((3, 16))}, "Encoder", "a")
        >>> [p.method.name for p in config.placements()]
        ['prefix_tuning', 'prefix_positions']
        >>> state["encoder/layer/1/attention/self/attention_tap/a/prefix_value"].shape
        (3, 1, 4)
    """
    peft_type = hf_config.get("peft_type")
    if peft_type not in VIRTUAL_TOKEN_TYPES:
        raise errors.InvalidConfigError(
            f"peft_type {peft_type!r} is not a prompt-family adapter ({sorted(VIRTUAL_TOKEN_TYPES)})")
    _check_fields(hf_config, peft_type)
    layout = _layout(architecture, backbone)
    if peft_type == "ADAPTION_PROMPT":
        return _import_adaption(hf_config, tensors, layout, name)
    table = _prompt_table(hf_config, tensors, peft_type)
    if peft_type == "PREFIX_TUNING":
        return _import_prefix(hf_config, table, layout, name, num_kv_heads)
    return prompt_tuning(table.shape[0]), {f"{layout.input}/{name}/prompt_embeddings": table}
