"""Configs for the module and input families: where bottleneck adapters, prompts, prefixes and
LLaMA-Adapter go, by role and by tap kind, and their combination as MAM.

Each function returns a config (anything with ``placements()``) for `peft_jax.nnx.attach` or
`peft_jax.linen.attach`. Bottleneck adapters are placed by `Roles` (the reference models ship
theirs as ``ROLES``); input and attention methods go on every tap of their kind, and a model
without one gets `MissingHookError` naming what to add.

Example:
    >>> from peft_jax.models.decoder import ROLES
    >>> cfg = adapters("double_seq_bn", roles=ROLES, reduction_factor=8)
    >>> [(p.targets, p.method.reduction_factor) for p in cfg.placements()]
    [('layers/\\\\d+/attention_residual', 8), ('layers/\\\\d+/ffn_residual', 8)]
"""

from __future__ import annotations

from typing import Any

from peft_jax.hooks.roles import Roles
from peft_jax.methods.adaption_prompt import AdaptionPrompt
from peft_jax.methods.bottleneck import Bottleneck, locations, preset
from peft_jax.methods.config import Composed, Placement, at_taps, compose
from peft_jax.methods.p_tuning import PTuning
from peft_jax.methods.prefix import PrefixTuning
from peft_jax.methods.prompt import PromptTuning
from peft_jax.methods.selection import LnTuning


def adapters(kind: str | Bottleneck = "seq_bn", *, roles: Roles, train_norms: bool = False,
             **overrides: Any) -> Composed:
    """Bottleneck adapters (AdapterHub's presets: ``seq_bn`` (Pfeiffer), ``double_seq_bn``
    (Houlsby), ``par_bn``, ``scaled_par_bn``, ``compacter``, ``compacter++``) after the
    sub-layers ``roles`` names.

    Args:
        kind: a preset name (or AdapterHub's old alias), or a `Bottleneck` value, which goes
            after the feed-forward only.
        roles: where the model's ``attention`` and ``ffn`` outputs are.
        train_norms: also train the model's layer norms (``roles.norms``), as the papers do.
        overrides: fields of the preset (``reduction_factor=8``, ``non_linearity="gelu"``, ...).

    Example:
        >>> from peft_jax.models.encoder import ROLES
        >>> [p.method.name for p in adapters("seq_bn", roles=ROLES, train_norms=True).placements()]
        ['bottleneck', 'ln_tuning']
    """
    if isinstance(kind, Bottleneck):
        method, where = kind, ("ffn",)
    elif kind in ("compacter", "compacter++"):
        from peft_jax.methods.phm import compacter, compacter_pp

        method = (compacter if kind == "compacter" else compacter_pp)(**overrides)
        where = ("attention", "ffn") if kind == "compacter" else ("ffn",)
    else:
        method, where = preset(kind, **overrides), locations(kind)
    parts: list[Any] = [Placement(roles.require(role, f"a {kind} adapter"), method,
                                  what=f"{role} role") for role in where]
    if train_norms:
        parts.append(Placement(roles.require("norms", "train_norms"), LnTuning(), what="norms role"))
    return compose(*parts)


def prompt_tuning(num_virtual_tokens: int = 20, **fields: Any) -> Placement:
    """Prompt tuning (`PromptTuning`) on the model's input tap.

    Example:
        >>> prompt_tuning(8, prompt_init="vocab").method.num_virtual_tokens
        8
    """
    return at_taps("inputs", PromptTuning(num_virtual_tokens=num_virtual_tokens, **fields))


def p_tuning(num_virtual_tokens: int = 20, **fields: Any) -> Placement:
    """P-tuning (`PTuning`: an MLP or LSTM prompt encoder) on the model's input tap."""
    return at_taps("inputs", PTuning(num_virtual_tokens=num_virtual_tokens, **fields))


def prefix_tuning(num_virtual_tokens: int = 20, *, count_positions: bool = True,
                  **fields: Any) -> Composed:
    """Prefix tuning (`PrefixTuning`) on every attention tap.

    Args:
        count_positions: start the real tokens' positions after the prefix, as HF PEFT does
            (needs an input tap; skipped on models without one). AdapterHub does not:
            ``False``.

    Example:
        >>> [p.method.name for p in prefix_tuning(10, projection=True).placements()]
        ['prefix_tuning', 'prefix_positions']
    """
    method = PrefixTuning(num_virtual_tokens=num_virtual_tokens, **fields)
    parts = [at_taps("attention", method)]
    if count_positions:
        parts.append(Placement(r".*", method.positions(), what="input tap", optional=True,
                               kind="inputs"))
    return compose(*parts)


def llama_adapter(adapter_len: int = 10, adapter_layers: int = 30) -> Placement:
    """LLaMA-Adapter (`AdaptionPrompt`) on the attention taps of the top ``adapter_layers``.

    Example:
        >>> llama_adapter(4, 2).method
        AdaptionPrompt(adapter_len=4, adapter_layers=2)
    """
    method = AdaptionPrompt(adapter_len=adapter_len, adapter_layers=adapter_layers)
    return at_taps("attention", method, where=method.applies_to)


def mam(*, roles: Roles, prefix_length: int = 30, bottleneck_size: int = 800,
        **adapter_overrides: Any) -> Composed:
    """Mix-and-match (He et al. 2021): prefix tuning (reparameterized, bottleneck 800) plus a
    parallel adapter after the feed-forward, AdapterHub's ``MAMConfig``."""
    return compose(prefix_tuning(prefix_length, projection=True, encoder_hidden_size=bottleneck_size,
                                 count_positions=False),
                   adapters("par_bn", roles=roles, **adapter_overrides))


def unipelt(*, roles: Roles, lora_targets: Any, prefix_length: int = 10, reduction_factor: int = 16,
            rank: int = 8, alpha: float = 2.0, bottleneck_size: int = 512) -> Composed:
    """UniPELT (Mao et al. 2022, arXiv:2110.07577), AdapterHub's ``UniPELTConfig``: three gated
    submodules in one adapter, each switched on or off per input by its own sigmoid gate.

    * prefix tuning, reparameterized (``Embedding -> Linear(bottleneck_size) -> tanh -> Linear``),
      ``prefix_length`` tokens, one shared gate for keys and values, positions not shifted
      (AdapterHub's convention, ``count_positions=False``);
    * a sequential bottleneck adapter (``seq_bn``, Pfeiffer) after the feed-forward, gated;
    * LoRA on ``lora_targets`` (AdapterHub: the self-attention's ``q`` and ``v``, e.g.
      ``["query", "value"]`` on the reference encoder), gated: `GatedLora`, whose gate replaces
      the ``alpha / rank`` scale (``alpha`` is kept for AdapterHub's config but not used).

    Not mergeable (the gates depend on the input). The gated LoRA needs its layers called on
    ``[batch, seq, features]`` inputs (`GatedLora`).

    Example:
        >>> from peft_jax.models.encoder import ROLES
        >>> cfg = unipelt(roles=ROLES, lora_targets=["query", "value"])
        >>> [p.method.name if hasattr(p.method, "name") else p.what for p in cfg.placements()]
        ['prefix_tuning', 'bottleneck', 'LoRA targets']
        >>> cfg.placements()[2].method_for("encoder/layer/0/attention/self/query")
        GatedLora(lora=Lora(rank=8, alpha=2.0, dropout=0.0, use_rslora=False, init_weights=KaimingUniform(), lora_bias=False), gating_heads=1)
    """  # noqa: E501
    from peft_jax.methods.config import LoraConfig

    return compose(
        prefix_tuning(prefix_length, projection=True, encoder_hidden_size=bottleneck_size,
                      use_gating=True, shared_gating=True, count_positions=False),
        adapters("seq_bn", roles=roles, reduction_factor=reduction_factor, use_gating=True),
        LoraConfig(targets=lora_targets, rank=rank, alpha=alpha, use_gating=True))
