"""Role presets: where a model's attention, feed-forward, embedding and blocks are.

A role is a selector (`peft_jax.core.select`): a regex fullmatched on "/"-joined module paths,
or a list of names. Configs that place methods by role (bottleneck adapters after attention and
after the feed-forward) read them; the reference models ship theirs as ``ROLES``, and a user
passes one for their own model.

``attention`` and ``ffn`` name where each sub-layer's *output* is collected: a `ResidualTap`
that follows it (the AdapterHub placement, with the residual and layer norm), or the sub-layer
module itself (the adapter then wraps its output: ``y + f(y)``).

Example:
    >>> roles = Roles(attention=r"blocks/\\d+/attn", ffn=r"blocks/\\d+/mlp")
    >>> roles.require("ffn", "Bottleneck")
    'blocks/\\\\d+/mlp'
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peft_jax import errors


@dataclasses.dataclass(frozen=True)
class Roles:
    """Selectors for the parts of a model (``None``: the model has no such part, or unnamed)."""

    attention: Any = None
    ffn: Any = None
    embed: Any = None
    layers: Any = None
    norms: Any = None

    def require(self, role: str, who: str) -> Any:
        """The selector of ``role``; a typed error naming what to pass when it is unset."""
        value = getattr(self, role)
        if value is None:
            raise errors.InvalidConfigError(
                f"{who} is placed by the {role!r} role, which these roles leave unset; pass "
                f"roles=Roles({role}=r'<regex of the {role} modules>') (the reference models ship "
                "theirs as ROLES)")
        return value
