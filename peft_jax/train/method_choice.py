"""The methods `peft-jax train --method` offers, and their hyper-parameters as flags.

Each choice names the config class (or recipe function) whose keyword fields of a simple type
(int, float, bool, str) become ``--<method>.<field>`` flags, with the field's default; the run's
``method_options`` hold the values given (`option_specs`, `build_method`). Methods on linear
layers use ``--targets`` / ``--layers`` (a family preset by default); methods at the taps
(bottleneck adapters, Compacter, prompt / P- / prefix tuning, LLaMA-Adapter) go to every layer of
the reference models (their `ROLES`). The trained head (``--modules-to-save``) is composed with
any of them. LoRA and its variants keep their own flags (``--rank``, ``--alpha``,
``--lora-dropout``).

Example:
    >>> sorted(METHOD_CHOICES)[:4]
    ['bitfit', 'compacter', 'compacter++', 'dora']
    >>> [s.flag for s in option_specs("vera")][:2]
    ['--vera.rank', '--vera.projection_prng_key']
    >>> build_method("vera", {"rank": 4}, family="decoder", targets=["q_proj"], modules_to_save=[],
    ...              num_layers=2).placements()[0].method.rank
    4
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import peft_jax
from peft_jax import errors
from peft_jax.methods import (
    OFT,
    Bottleneck,
    LnTuning,
    LoHa,
    LoKr,
    LoraConfig,
    ModulesToSave,
    PiSSA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    TrainBias,
    Vera,
)

__all__ = ["METHOD_CHOICES", "MethodChoice", "OptionSpec", "build_method", "option_specs", "options_for"]

# The feed-forward layers IA3 scales at their input, and the norms LayerNorm tuning trains.
FEEDFORWARD = {"encoder": [r".*/output/dense(?<!attention/output/dense)"], "decoder": ["down_proj"]}
NORMS = {"encoder": ["LayerNorm"], "decoder": ["input_layernorm", "post_attention_layernorm", "norm"]}


@dataclasses.dataclass(frozen=True)
class Context:
    """What a builder sees: the family, the linear targets (``--targets`` / ``--layers``), the
    run's LoRA settings, the model's layer count and the method's options."""

    family: str
    targets: Any
    modules_to_save: Any
    num_layers: int | None
    options: Mapping[str, Any]
    lora: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class MethodChoice:
    """A ``--method`` value: its description, the callable whose keyword fields are its
    options (``None``: no options of its own), and how to build its config."""

    description: str
    fields_of: Callable[..., Any] | None
    build: Callable[[Context], Any]
    at_taps: bool = False
    preset: bool = False  # its options override a preset's values: no single default to show
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # shown instead


def _lora(**extra: Any) -> Callable[[Context], Any]:
    return lambda c: LoraConfig(targets=c.targets, modules_to_save=c.modules_to_save or None,
                                **c.lora, **extra)


def _on_linears(cls: type) -> Callable[[Context], Any]:
    return lambda c: peft_jax.place(c.targets, cls(**c.options))


def _roles(family: str) -> Any:
    if family == "decoder":
        from peft_jax.models.decoder import ROLES  # noqa: PLC0415
    else:
        from peft_jax.models.encoder import ROLES  # noqa: PLC0415
    return ROLES


def _adapters(kind: str) -> Callable[[Context], Any]:
    return lambda c: peft_jax.adapters(kind, roles=_roles(c.family), **c.options)


def _llama_adapter(c: Context) -> Any:
    options = {"adapter_layers": c.num_layers or 1, **c.options}
    return peft_jax.llama_adapter(options.pop("adapter_len", 10), options.pop("adapter_layers"))


METHOD_CHOICES: dict[str, MethodChoice] = {
    "lora": MethodChoice("LoRA (rank --rank, scale --alpha / --rank)", None, _lora()),
    "dora": MethodChoice("DoRA: LoRA on the direction, a trained magnitude per column", None,
                         _lora(use_dora=True)),
    "rslora": MethodChoice("rank-stabilized LoRA (scale alpha / sqrt(rank))", None, _lora(use_rslora=True)),
    "pissa": MethodChoice("LoRA started from the top singular vectors of each weight (PiSSA)", None,
                          _lora(init=PiSSA())),
    "ia3": MethodChoice("(IA)^3: learned scales of the targets' outputs (feed-forward: inputs)", None,
                        lambda c: peft_jax.IA3Config(targets=c.targets, feedforward_modules=FEEDFORWARD[c.family])),
    "vera": MethodChoice("VeRA: shared frozen random projections, trained scaling vectors", Vera, _on_linears(Vera)),
    "loha": MethodChoice("LoHa: Hadamard product of two low-rank products", LoHa, _on_linears(LoHa)),
    "lokr": MethodChoice("LoKr: Kronecker product with a low-rank factor", LoKr, _on_linears(LoKr)),
    "oft": MethodChoice("OFT: block-diagonal orthogonal rotation of each weight", OFT, _on_linears(OFT)),
    "bitfit": MethodChoice("BitFit: train the biases of the target layers", None,
                           lambda c: peft_jax.place(c.targets, TrainBias())),
    "ln-tuning": MethodChoice("LayerNorm tuning: train the normalization layers", None,
                              lambda c: peft_jax.place(NORMS[c.family], LnTuning())),
    **{kind: MethodChoice(f"bottleneck adapters, AdapterHub's {kind} configuration", Bottleneck,
                          _adapters(kind), at_taps=True, preset=True)
       for kind in ("seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn")},
    "compacter": MethodChoice("Compacter: PHM bottlenecks after attention and FFN", Bottleneck,
                              _adapters("compacter"), at_taps=True, preset=True),
    "compacter++": MethodChoice("Compacter++: a PHM bottleneck after the FFN", Bottleneck,
                                _adapters("compacter++"), at_taps=True, preset=True),
    "prompt": MethodChoice("prompt tuning: trained virtual tokens before the input", PromptTuning,
                           lambda c: peft_jax.prompt_tuning(**c.options), at_taps=True),
    "p-tuning": MethodChoice("P-tuning: virtual tokens from a prompt encoder", PTuning,
                             lambda c: peft_jax.p_tuning(**c.options), at_taps=True),
    "prefix": MethodChoice("prefix tuning: trained keys and values before every attention", PrefixTuning,
                           lambda c: peft_jax.prefix_tuning(**c.options), at_taps=True),
    "llama-adapter": MethodChoice("LLaMA-Adapter: gated adaption prompts in the top layers",
                                  peft_jax.llama_adapter, _llama_adapter, at_taps=True,
                                  defaults={"adapter_layers": "every layer"}),
}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One ``--<method>.<field>`` flag: its field, type (int, float, bool, str) and default."""

    method: str
    field: str
    type: type
    default: Any

    @property
    def flag(self) -> str:
        return f"--{self.method}.{self.field}"


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str}


def option_specs(method: str) -> list[OptionSpec]:
    """The options ``method`` takes as flags, in the order its config declares them."""
    choice = METHOD_CHOICES[method]
    fields_of = choice.fields_of
    if fields_of is None:
        return []
    specs = []
    for name, param in inspect.signature(fields_of).parameters.items():
        if param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            continue
        first = str(param.annotation).split("|")[0].strip().strip("'\"")
        if first in _SIMPLE:
            default = None if param.default is inspect.Parameter.empty else param.default
            if choice.preset:
                default = "the configuration's"
            specs.append(OptionSpec(method, name, _SIMPLE[first], choice.defaults.get(name, default)))
    return specs


def build_method(method: str, options: Mapping[str, Any], *, family: str, targets: Any,
                 modules_to_save: Any, num_layers: int | None,
                 lora: Mapping[str, Any] | None = None) -> Any:
    """The config of ``--method method`` with its ``options``, composed with the trained
    ``modules_to_save`` (the classifier head).

    Raises:
        UnknownNameError: an unknown method.
        InvalidConfigError: an option the method does not take, or a value it refuses.
    """
    if method not in METHOD_CHOICES:
        raise errors.UnknownNameError(f"unknown method {method!r}; known methods: {sorted(METHOD_CHOICES)}")
    choice = METHOD_CHOICES[method]
    known = {s.field for s in option_specs(method)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise errors.InvalidConfigError(
            f"method {method!r} takes no option(s) {unknown}; its options: {sorted(known) or 'none'}")
    context = Context(family, targets, modules_to_save, num_layers, dict(options), dict(lora or {}))
    try:
        config = choice.build(context)
    except (TypeError, ValueError) as e:
        if isinstance(e, errors.PeftError):
            raise
        raise errors.InvalidConfigError(f"method {method!r} with options {dict(options)}: {e}") from e
    uses_own_head = method in ("lora", "dora", "rslora", "pissa")  # LoraConfig's modules_to_save
    if modules_to_save and not uses_own_head:
        config = peft_jax.compose(config, peft_jax.place(modules_to_save, ModulesToSave()))
    return config


def options_for(method: str, given: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
    """The ``{field: value}`` options of ``method`` from flags given as ``{(method, field):
    value}``.

    Raises:
        InvalidConfigError: a flag of another method (it would be ignored).

    Example:
        >>> options_for("vera", {("vera", "rank"): 4})
        {'rank': 4}
    """
    other = sorted(f"--{m}.{f}" for m, f in given if m != method)
    if other:
        raise errors.InvalidConfigError(f"{', '.join(other)} belong to another method than --method {method}; "
                                        f"drop them or pass that --method")
    return {f: v for (_, f), v in given.items()}
