"""AdapterDrop (Rücklé et al. 2021, arXiv:2010.11918): no adapters in the lowest ``n`` layers.

Without adapters below layer ``n`` the backward pass stops at layer ``n`` (nothing below it
trains), and at inference the lowest layers run as the base model does. Two uses:

* **training** without them: `adapter_drop(config, n, roles=ROLES)` is ``config`` with its
  targets narrowed to the layers ``>= n`` (the paper's specialised AdapterDrop), for both
  front-ends, so the dropped layers get no params at all;
* **inference** on an adapter trained everywhere: `peft_jax.nnx.drop_adapters(model, n, roles)`,
  or Linen's ``peft.apply(..., skip=lowest_layers(n, roles))``, switch the adapters of the
  lowest layers off (a static choice: one compiled program per ``n``).

A layer is a path inside a match of ``roles.layers`` (e.g. ``encoder/layer/3``); its index is
the last integer of that match.

Example:
    >>> import peft_jax
    >>> from peft_jax.models.encoder import ROLES
    >>> low = lowest_layers(2, ROLES)
    >>> low("encoder/layer/1/output/residual"), low("encoder/layer/2/output/residual")
    (True, False)
    >>> cfg = adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), 2, roles=ROLES)
    >>> p = cfg.placements()[0]
    >>> from peft_jax.core.select import compile_selector
    >>> match = compile_selector(p.targets)
    >>> match("encoder/layer/1/output/residual", None), match("encoder/layer/5/output/residual", None)
    (False, True)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from peft_jax import errors
from peft_jax.core.select import compile_selector
from peft_jax.hooks.roles import Roles

__all__ = ["AdapterDrop", "adapter_drop", "layer_index", "lowest_layers"]


def _layers_regex(roles: Roles) -> re.Pattern:
    layers = roles.require("layers", "AdapterDrop")
    if not isinstance(layers, str):
        raise errors.InvalidConfigError(
            f"AdapterDrop needs roles.layers as a regex of the layer modules (e.g. r'layers/\\d+'), "
            f"got {layers!r}")
    try:
        return re.compile(rf"(?:^|(?<=/))(?:{layers})(?=/|$)")
    except re.error as e:
        raise errors.InvalidConfigError(f"roles.layers {layers!r} does not compile ({e})") from e


def layer_index(path: str, roles: Roles) -> int | None:
    """The index of the layer ``path`` lies in (``None``: outside every layer).

    Example:
        >>> from peft_jax.models.decoder import ROLES
        >>> layer_index("layers/7/self_attn/q_proj", ROLES), layer_index("lm_head", ROLES)
        (7, None)
    """
    found = _layers_regex(roles).search(path)
    if found is None:
        return None
    digits = re.findall(r"\d+", found.group(0))
    return int(digits[-1]) if digits else None


def lowest_layers(n: int, roles: Roles) -> Callable[[str], bool]:
    """``path -> bool``: whether ``path`` lies in one of the layers ``0 .. n - 1``."""
    _check_n(n)
    regex = _layers_regex(roles)

    def inside(path: str) -> bool:
        found = regex.search(path)
        digits = re.findall(r"\d+", found.group(0)) if found else []
        return bool(digits) and int(digits[-1]) < n

    return inside


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise errors.InvalidConfigError(f"the number of dropped layers must be an integer >= 0, got {n!r}")


@dataclasses.dataclass(frozen=True)
class AdapterDrop:
    """A config whose placements skip the lowest ``n`` layers; see `adapter_drop`."""

    config: Any
    n: int
    roles: Roles

    def placements(self) -> tuple[Any, ...]:
        dropped = lowest_layers(self.n, self.roles)

        def narrowed(placement):
            match = compile_selector(placement.targets)
            return dataclasses.replace(
                placement, targets=lambda path, leaf=None: match(path, leaf) and not dropped(path),
                what=f"{placement.what} above layer {self.n - 1}" if self.n else placement.what)

        return tuple(narrowed(p) for p in self.config.placements())


def adapter_drop(config: Any, n: int, *, roles: Roles) -> AdapterDrop:
    """``config`` without its methods in the layers ``0 .. n - 1`` (``roles.layers``).

    Raises:
        InvalidConfigError: ``n`` is not an integer >= 0, ``config`` is not a config, or the
            roles name no layers.
    """
    _check_n(n)
    if not hasattr(config, "placements"):
        raise errors.InvalidConfigError(f"adapter_drop() takes a config (e.g. adapters(...)), got {config!r}")
    _layers_regex(roles)
    return AdapterDrop(config, n, roles)
