"""Configs: which methods go where. A config is anything with ``placements()``.

`place` puts one method on the paths a selector matches; `compose` combines configs into one
adapter (methods on the same layer fold in the order given); `LoraConfig` is the HF-compatible
front door of the LoRA family and builds the same values.

Example:
    >>> from peft_jax.methods import IA3, LnTuning
    >>> cfg = compose(LoraConfig(targets=["q_proj", "v_proj"], rank=8, alpha=16,
    ...                          rank_pattern={".*v_proj": 4}),
    ...               place(["down_proj"], IA3(feedforward=True)),
    ...               place(["input_layernorm"], LnTuning()))
    >>> [p.method_for("layers/0/attn/v_proj").name for p in cfg.placements()]
    ['lora', 'ia3', 'ln_tuning']
    >>> cfg.placements()[0].method_for("layers/0/attn/v_proj").rank
    4
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from peft_jax import errors
from peft_jax.core.select import Rules, Selector, compile_selector
from peft_jax.methods.base import Method
from peft_jax.methods.dora import Dora
from peft_jax.methods.gated_lora import GatedLora
from peft_jax.methods.ia3 import IA3
from peft_jax.methods.initializers import KaimingUniform, OLoRA, PiSSA
from peft_jax.methods.lora import Lora, check_positive, check_positive_int, check_rate
from peft_jax.methods.selection import ModulesToSave, TrainBias

BIAS_MODES = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class Placement:
    """One method on the paths ``targets`` selects.

    Attributes:
        targets: a selector (regex fullmatch, list of names with suffix match, or callable).
        method: a `Method`, or ``path -> Method`` for per-path settings (rank patterns).
        what: how error messages name these targets.
        optional: skip layers the method cannot take (e.g. biases of layers that have none)
            instead of raising, and allow matching nothing.
        kind: only the taps of this site kind (``"inputs"``, ``"attention"``, ``"residual"``)
            among the targets; a model with none raises `MissingHookError` naming what to add.
        where: keep only the sites for which ``where(site)`` holds (LLaMA-Adapter's top layers).
    """

    targets: Selector
    method: Method | Callable[[str], Method]
    what: str = "targets"
    optional: bool = False
    kind: str | None = None
    where: Callable[[Any], bool] | None = None

    def method_for(self, path: str) -> Method:
        return self.method if isinstance(self.method, Method) else self.method(path)

    def placements(self) -> tuple["Placement", ...]:
        return (self,)


def place(targets: Selector, method: Method, *, optional: bool = False) -> Placement:
    """``method`` on every layer ``targets`` selects (a config on its own, or part of `compose`).

    Example:
        >>> from peft_jax.methods import IA3
        >>> place(["k_proj", "v_proj"], IA3()).method_for("k_proj")
        IA3(feedforward=False)
    """
    if targets is None:
        raise errors.InvalidConfigError("targets is required, e.g. place(['q_proj'], method)")
    if not isinstance(method, Method):
        raise errors.InvalidConfigError(f"place() needs a method value such as Lora(rank=8), got {method!r}")
    return Placement(targets, method, what=f"{type(method).__name__} targets", optional=optional)


def at_taps(kind: str, method: Method, *, targets: Selector = r".*",
            where: Callable[[Any], bool] | None = None) -> Placement:
    """``method`` on every tap of ``kind`` among ``targets`` (all of them by default).

    Example:
        >>> from peft_jax.methods.prefix import PrefixPositions
        >>> at_taps("inputs", PrefixPositions(num_virtual_tokens=4)).kind
        'inputs'
    """
    if not isinstance(method, Method):
        raise errors.InvalidConfigError(f"at_taps() needs a method value, got {method!r}")
    return Placement(targets, method, what=f"{type(method).__name__} targets", kind=kind, where=where)


@dataclasses.dataclass(frozen=True)
class Composed:
    """Several configs as one adapter; see `compose`."""

    parts: tuple[Any, ...]

    def placements(self) -> tuple[Placement, ...]:
        return tuple(p for part in self.parts for p in part.placements())


def compose(*configs: Any) -> Composed:
    """One adapter made of several configs (LoRA on attention + IA3 on the FFN + LN tuning ...)."""
    for c in configs:
        if not hasattr(c, "placements"):
            raise errors.InvalidConfigError(f"compose() takes configs (LoraConfig, place(...)), got {c!r}")
    return Composed(tuple(configs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA and its variants: rsLoRA, DoRA, gated LoRA (UniPELT), PiSSA / OLoRA / Gaussian inits,
    per-target overrides.

    Args:
        targets: which layers to adapt: a regex (fullmatch on the "/"-joined module path), a list
            of names (exact or suffix match, as HF PEFT's ``target_modules``), or a callable.
        rank: the rank ``r`` of ``A: (in, r)`` and ``B: (r, out)``.
        alpha: ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: input dropout rate on the low-rank path while training.
        rank_pattern: ``{selector: rank}`` overrides, first match wins (HF PEFT ``rank_pattern``).
        alpha_pattern: ``{selector: alpha}`` overrides, first match wins.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (arXiv:2312.03732).
        use_dora: weight-decomposed LoRA (arXiv:2402.09353), `Dora` composed on `Lora`.
        use_gating: UniPELT's gated LoRA (AdapterHub ``LoRAConfig(use_gating=True)``), `GatedLora`
            composed on `Lora`: the update is scaled by ``mean_seq sigmoid(Linear(x))`` instead of
            ``alpha / rank`` (so ``alpha`` is not used); not mergeable. Takes neither ``use_dora``,
            ``use_rslora``, ``lora_bias``, PiSSA / OLoRA inits nor ``target_parameters``.
        init: how ``A`` and ``B`` start (`KaimingUniform`, `Gaussian`, `PiSSA`, `OLoRA`).
        lora_bias: a trainable bias on ``B`` (HF PEFT ``lora_bias``).
        bias: which existing biases train (`TrainBias`): ``"none"``, ``"all"``, or
            ``"lora_only"`` (those of adapted layers), as in HF PEFT.
        modules_to_save: modules trained fully as copies (`ModulesToSave`), e.g. a head.
        target_parameters: raw params that are not layers, e.g. MoE experts
            ``["experts/w_up"]`` (HF PEFT ``target_parameters``; see `RawParamLora`).
    """

    targets: Selector = None
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rank_pattern: Mapping[Any, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[Any, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    use_gating: bool = False
    init: Callable[..., Any] = KaimingUniform()
    lora_bias: bool = False
    bias: str = "none"
    modules_to_save: Selector = None
    target_parameters: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if self.targets is None and not self.target_parameters:
            raise errors.InvalidConfigError("targets is required, e.g. targets=['q_proj', 'v_proj']")
        if self.target_parameters and (self.use_dora or self.lora_bias):
            raise errors.InvalidConfigError("target_parameters takes neither use_dora nor lora_bias "
                                            "(nor in HF PEFT)")
        if self.target_parameters:
            from peft_jax.methods.raw_params import RawParamLora

            RawParamLora(param="check", lora=self.settings_for(""))  # its init checks, now
        if self.targets is None and self.bias == "lora_only":
            raise errors.InvalidConfigError('bias="lora_only" needs targets (layers whose biases train)')
        check_positive_int(self.rank, "rank")
        check_positive(self.alpha, "alpha")
        for key, rank in dict(self.rank_pattern).items():
            check_positive_int(rank, f"rank_pattern[{key!r}]")
        for key, alpha in dict(self.alpha_pattern).items():
            check_positive(alpha, f"alpha_pattern[{key!r}]")
        check_rate(self.dropout, "dropout")
        if self.bias not in BIAS_MODES:
            raise errors.InvalidConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not callable(self.init):
            raise errors.InvalidConfigError(
                f"init must be an initializer value such as peft_jax.PiSSA(), got {self.init!r}")
        if self.use_dora and self.lora_bias:
            raise errors.InvalidConfigError("use_dora and lora_bias cannot be combined (nor in HF PEFT)")
        if not isinstance(self.use_gating, bool):
            raise errors.InvalidConfigError(f"use_gating must be True or False, got {self.use_gating!r}")
        if self.use_gating:
            clashes = [name for name, on in (
                ("use_dora", self.use_dora), ("use_rslora", self.use_rslora),
                ("lora_bias", self.lora_bias), ("target_parameters", bool(self.target_parameters)),
                (f"init={type(self.init).__name__}()", isinstance(self.init, (PiSSA, OLoRA)))) if on]
            if clashes:
                raise errors.InvalidConfigError(
                    f"use_gating (UniPELT's gated LoRA) cannot be combined with {', '.join(clashes)}: "
                    "the gate replaces LoRA's fixed scale (nor does AdapterHub combine them)")
        # Compile the selectors now so a bad regex fails here, not at attach time.
        Rules(dict(self.rank_pattern))
        Rules(dict(self.alpha_pattern))

    def settings_for(self, path: str) -> Lora:
        """The `Lora` of the layer at ``path`` after the pattern overrides (rank, alpha, scale)."""
        rank = Rules(dict(self.rank_pattern), default=self.rank).lookup(path)
        alpha = float(Rules(dict(self.alpha_pattern), default=self.alpha).lookup(path))
        return Lora(rank=rank, alpha=alpha, dropout=float(self.dropout), use_rslora=self.use_rslora,
                    init_weights=self.init, lora_bias=self.lora_bias)

    def method_for(self, path: str) -> Method:
        """The method at ``path``: `Lora`, or `Dora` / `GatedLora` built on it."""
        lora = self.settings_for(path)
        if self.use_gating:
            return GatedLora(lora=lora)
        return Dora(lora=lora) if self.use_dora else lora

    def placements(self) -> tuple[Placement, ...]:
        out = [] if self.targets is None else [Placement(self.targets, self.method_for, what="LoRA targets")]
        if self.target_parameters:
            from peft_jax.methods.raw_params import target_parameters  # raw_params imports this file

            out.extend(target_parameters(self.target_parameters, self.settings_for))
        if self.bias == "lora_only":
            out.append(Placement(self.targets, TrainBias(), what="LoRA targets", optional=True))
        elif self.bias == "all":
            out.append(Placement(r".*", TrainBias(), what="biases", optional=True))
        if self.modules_to_save is not None:
            out.append(Placement(self.modules_to_save, ModulesToSave(), what="modules_to_save"))
        return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config:
    """(IA)^3 as HF PEFT configures it: ``targets``, of which those ``feedforward_modules`` also
    matches scale their input instead of their output (e.g. ``targets=["k_proj", "v_proj", "down_proj"]``,
    ``feedforward_modules=["down_proj"]``).

    Example:
        >>> cfg = IA3Config(targets=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
        >>> [cfg.placements()[0].method_for(p).feedforward for p in ("l/k_proj", "l/down_proj")]
        [False, True]
    """

    targets: Selector
    feedforward_modules: Selector = None

    def __post_init__(self) -> None:
        if self.targets is None:
            raise errors.InvalidConfigError("targets is required, e.g. targets=['k_proj', 'v_proj', 'down_proj']")

    def placements(self) -> tuple[Placement, ...]:
        feedforward = compile_selector(self.feedforward_modules)
        return (Placement(self.targets, lambda path: IA3(feedforward=bool(feedforward(path, None))),
                          what="IA3 targets"),)
