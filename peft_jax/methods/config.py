"""`LoraConfig`: every knob of the LoRA family, validated once, when it is built.

Example:
    >>> from peft_jax.methods import LoraConfig, PiSSA
    >>> cfg = LoraConfig(targets=["q_proj", "v_proj"], rank=8, alpha=16, rank_pattern={".*v_proj": 4})
    >>> cfg.settings_for("layers/0/attn/v_proj").rank, cfg.settings_for("layers/0/attn/q_proj").scale
    (4, 2.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from peft_jax import errors
from peft_jax.core.select import Rules, Selector
from peft_jax.methods.base import TargetSettings, WeightMethod
from peft_jax.methods.dora import DORA
from peft_jax.methods.initializers import KaimingUniform
from peft_jax.methods.lora import LORA

BIAS_MODES = ("none", "all", "lora_only")


def _check_rank(rank: Any, where: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise errors.InvalidConfigError(f"{where} must be a positive integer, got {rank!r}; "
                                        "LoRA ranks are typically 4 to 64")


def _check_alpha(alpha: Any, where: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise errors.InvalidConfigError(f"{where} must be a number > 0, got {alpha!r}; "
                                        "a common choice is alpha = rank or 2 * rank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA and its variants: rsLoRA, DoRA, PiSSA / OLoRA / Gaussian inits, per-target overrides.

    Args:
        targets: which layers to adapt: a regex (fullmatch on the "/"-joined module path), a list
            of names (exact or suffix match, as HF PEFT's ``target_modules``), or a callable.
        rank: the rank ``r`` of ``A: (in, r)`` and ``B: (r, out)``.
        alpha: ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: input dropout rate on the low-rank path while training.
        rank_pattern: ``{selector: rank}`` overrides, first match wins (HF PEFT ``rank_pattern``).
        alpha_pattern: ``{selector: alpha}`` overrides, first match wins.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (arXiv:2312.03732).
        use_dora: weight-decomposed LoRA (arXiv:2402.09353).
        init: how ``A`` and ``B`` start (`KaimingUniform`, `Gaussian`, `PiSSA`, `OLoRA`).
        bias: which existing biases train: ``"none"``, ``"all"``, or ``"lora_only"`` (those of
            adapted layers), as in HF PEFT.
        modules_to_save: modules trained fully (e.g. a classifier head), same selector rules.
    """

    targets: Selector
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rank_pattern: Mapping[Any, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[Any, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: Callable[..., Any] = KaimingUniform()
    bias: str = "none"
    modules_to_save: Selector = None

    def __post_init__(self) -> None:
        if self.targets is None:
            raise errors.InvalidConfigError("targets is required, e.g. targets=['q_proj', 'v_proj']")
        _check_rank(self.rank, "rank")
        _check_alpha(self.alpha, "alpha")
        for key, rank in dict(self.rank_pattern).items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in dict(self.alpha_pattern).items():
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise errors.InvalidConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise errors.InvalidConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not callable(self.init):
            raise errors.InvalidConfigError(
                f"init must be an initializer value such as peft_jax.methods.PiSSA(), got {self.init!r}")
        # Compile the selectors now so a bad regex fails here, not at attach time.
        Rules(dict(self.rank_pattern))
        Rules(dict(self.alpha_pattern))

    @property
    def method(self) -> WeightMethod:
        """The math this config runs: DoRA composes onto LoRA."""
        return DORA if self.use_dora else LORA

    def settings_for(self, path: str) -> TargetSettings:
        """The rank, alpha and scale of the layer at ``path`` after the pattern overrides."""
        rank = Rules(dict(self.rank_pattern), default=self.rank).lookup(path)
        alpha = float(Rules(dict(self.alpha_pattern), default=self.alpha).lookup(path))
        scale = alpha / (math.sqrt(rank) if self.use_rslora else rank)
        return TargetSettings(rank=rank, alpha=alpha, scale=scale, dropout=float(self.dropout))
