"""How ``adapter_config.json`` holds per-module values: one common value, exceptions in a
pattern table keyed by module-name regexes (HF PEFT's ``rank_pattern`` / ``alpha_pattern``).

Example:
    >>> pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8), most_common([4, 4, 2])
    (2, 4)
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Any

from peft_jax import errors

__all__ = ["most_common", "one_value", "pattern_value", "plain_number"]


def pattern_value(pattern: Mapping[str, Any], hf: str, default: Any) -> Any:
    """HF PEFT's lookup: the first key matching the module name as a dotted suffix, else ``default``."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", hf)), default)


def most_common(values: list[Any]) -> Any:
    """The value most modules share: the config's common value."""
    return collections.Counter(values).most_common(1)[0][0]


def one_value(values: list[Any], what: str) -> Any:
    """The single value of a field HF PEFT holds once per adapter; a typed error when modules differ."""
    if len(set(values)) > 1:
        raise errors.InvalidConfigError(
            f"HF PEFT's {what} is one value for the whole adapter, but this adapter mixes "
            f"{sorted(set(values), key=str)}; save it with peft_jax.save_adapter")
    return values[0]


def plain_number(x: float) -> int | float:
    """A config number as JSON writes it: ``16.0`` -> ``16``, ``0.5`` stays.

    Example:
        >>> plain_number(16.0), plain_number(0.5)
        (16, 0.5)
    """
    return int(x) if float(x).is_integer() else float(x)
