"""Which transformer layers an adapter goes on: ``--layers`` specs and layer-restricted targets.

A spec is ``"all"``, indices and ranges (``"3-5"``, ``"0,2"``; HF PEFT's ``layers_to_transform``),
or ``"top:K"``, the K highest layers of whatever model is loaded. `restrict_to_layers` turns a
target selector (names or a regex) into one regex that also requires ``layer/<i>/`` in the path.

Example:
    >>> parse_layers("top:3", num_layers=6)
    [3, 4, 5]
    >>> import re
    >>> sel = restrict_to_layers(["query"], [4, 5])
    >>> [bool(re.fullmatch(sel, f"bert/encoder/layer/{i}/attention/self/query")) for i in (3, 4)]
    [False, True]
"""

from __future__ import annotations

import re

from peft_jax import errors

__all__ = ["check_layers", "parse_layers", "restrict_to_layers"]

_HELP = "use 'all', indices or ranges such as '3-5' or '0,2', or 'top:K' for the K highest layers"


def check_layers(spec: str | None) -> None:
    """Checks the syntax of a spec without knowing the model.

    Raises:
        InvalidConfigError: not a valid spec.
    """
    parse_layers(spec, num_layers=None)


def parse_layers(spec: str | None, num_layers: int | None) -> list[int] | None:
    """Resolves a spec to sorted layer indices (``None``: every layer).

    Args:
        spec: ``None``/``"all"``, ``"3-5"``, ``"0,2"`` or ``"top:K"``.
        num_layers: the model's layer count; ``None`` only checks the syntax (and returns
            ``None`` for ``"top:K"``).

    Raises:
        InvalidConfigError: a malformed spec, or an index the model does not have.
    """
    if spec is None or str(spec).strip() == "all":
        return None
    text = str(spec).strip()
    if text.startswith("top:"):
        try:
            k = int(text[4:])
        except ValueError:
            k = 0
        if k < 1:
            raise errors.InvalidConfigError(f"layers {spec!r}: K in 'top:K' must be >= 1; {_HELP}")
        return None if num_layers is None else list(range(max(0, num_layers - k), num_layers))
    indices: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            indices.update(range(int(low), int(high or low) + 1))
    except ValueError:
        indices = set()
    if not indices or min(indices) < 0:
        raise errors.InvalidConfigError(f"layers must be a layer spec, got {spec!r}; {_HELP}")
    if num_layers is not None and max(indices) >= num_layers:
        raise errors.InvalidConfigError(
            f"layers {spec!r} names layer {max(indices)}, but the model has {num_layers} layers "
            f"(0..{num_layers - 1}); {_HELP}")
    return sorted(indices)


def restrict_to_layers(selector: str | list[str], indices: list[int] | None) -> str | list[str]:
    """A selector that matches what ``selector`` matches, inside the given layers only.

    Names keep their HF PEFT meaning (the path equals the name or ends in ``/name``); a regex
    must still match the whole path. The result is a regex string (JSON-serialisable).
    """
    if indices is None:
        return selector
    layer = r"(?:.*/)?layers?/(?:" + "|".join(str(i) for i in indices) + r")/"
    if isinstance(selector, str):
        return rf"(?={layer})(?:{selector})"
    names = "|".join(re.escape(n) for n in selector)
    return rf"{layer}(?:.*/)?(?:{names})"
