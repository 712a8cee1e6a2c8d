"""PEFT methods as NNX modules a user puts into their own model definition.

Each module here *is* an `peft_jax.nnx.AdaptedLayer`, built by `peft_jax.nnx.attach` itself, so it
has exactly the state layout, the behaviour and the tools of a method attached to the equivalent
plain model: ``<path>/base_layer/<kernel|bias>`` and ``<path>/<adapter>/<param>`` (shared state at
``<adapter>/shared/...`` in `peft_jax.nnx.adapter_state`), `AdapterParam` variables
(``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only them), and `peft_jax.nnx.merge`,
`split`, `summary`, `adapter_state`, `set_active`, `disabled` all work on a model that contains
them. The math is the methods' own (`peft_jax.methods`); nothing is re-implemented here.

* `LoraLinear`: a drop-in ``nnx.Linear`` with LoRA (or DoRA) adapter ``"default"``.
* `BottleneckAdapter`: a bottleneck adapter (Houlsby, Pfeiffer, parallel, Compacter, ...) where a
  sub-layer's output meets the residual stream: ``adapter(Residual(y, x, norm))``, or on a plain
  hidden state: ``adapter(h)`` is ``h + f(h)``.
* `adapt`: any method on any module (LoRA on an ``nnx.Conv`` / ``nnx.Einsum`` / ``nnx.Embed``,
  IA3 on a ``nnx.Linear``, a bottleneck adapter around a user's own MLP).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft_jax
    >>> class Mlp(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.up = LoraLinear(4, 8, rank=2, rngs=rngs)
    ...         self.down = nnx.Linear(8, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(nnx.relu(self.up(x)))
    >>> model = Mlp(nnx.Rngs(0))
    >>> sorted(peft_jax.nnx.adapter_state(model))
    ['up/default/lora_a', 'up/default/lora_b']
    >>> print(peft_jax.nnx.summary(model))
    trainable params: 24 || all params: 100 || trainable%: 24.0000
"""

from __future__ import annotations

import re
from typing import Any

import jax
from flax import nnx

from peft_jax import errors
from peft_jax import nnx as peft_nnx
from peft_jax.hooks.taps import ResidualTap
from peft_jax.methods.base import Method, ModuleSite
from peft_jax.methods.bottleneck import Bottleneck
from peft_jax.methods.config import place
from peft_jax.methods.initializers import KaimingUniform
from peft_jax.methods.sites import Residual
from peft_jax.modules import lora_method, module_form
from peft_jax.nnx import AdaptedLayer
from peft_jax.sites import run_site
from peft_jax.sites.composition import run_block

__all__ = ["BottleneckAdapter", "LoraLinear", "adapt"]

#: the name under which `adapt` attaches (the ``path`` of the modules' sites).
SITE_NAME = "layer"


class _Holder(nnx.Module):
    """A one-child model, so `peft_jax.nnx.attach` can adapt a module on its own."""

    def __init__(self, layer: nnx.Module):
        setattr(self, SITE_NAME, layer)


def adapt(module: nnx.Module, method: Method, *, rngs: nnx.Rngs, adapter: str = "default") -> AdaptedLayer:
    """``module`` with ``method`` attached as adapter ``adapter``, by `peft_jax.nnx.attach`.

    The result replaces ``module`` in a model definition: it holds ``module`` as ``base_layer``
    and runs it through the method, with the layout of attaching ``method`` to ``module`` in
    place (the site's ``path`` reads ``"layer"``: the module does not know where it will live).
    Adapting an `AdaptedLayer` again adds a second adapter (another ``adapter`` name).

    Args:
        module: the layer to adapt (``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum``, ``nnx.Embed``,
            ``nnx.LinearGeneral``, a `peft_jax.hooks` tap, or any module for module-site methods).
        method: a method value (``Lora(rank=4)``, ``IA3()``, ``Bottleneck(features=8)``, ...).
        rngs: draws the adapter's init (and its dropout stream, if it has dropout).
        adapter: the adapter's name.

    Raises:
        InvalidConfigError: ``module`` is not an NNX module or ``method`` not a method value.
        UnsupportedLayerError: ``method`` cannot go on this layer (raised before anything is built).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from peft_jax.methods import Lora
        >>> conv = adapt(nnx.Conv(3, 4, kernel_size=(3,), rngs=nnx.Rngs(0)), Lora(rank=2), rngs=nnx.Rngs(1))
        >>> conv.default.lora_a.shape, conv(jnp.ones((1, 5, 3))).shape
        ((3, 3, 2), (1, 5, 4))
    """
    if not isinstance(module, nnx.Module):
        raise errors.InvalidConfigError(f"adapt() takes an nnx.Module to adapt, got {module!r}")
    if not isinstance(method, Method):
        raise errors.InvalidConfigError(f"adapt() takes a method value such as Lora(rank=8), got {method!r}")
    holder = _Holder(module)
    peft_nnx.attach(holder, place(re.escape(SITE_NAME), method), rngs=rngs, name=adapter)
    return getattr(holder, SITE_NAME)


class _Built(AdaptedLayer):
    """An `AdaptedLayer` whose constructor builds itself through `adapt`."""

    def _adopt(self, built: AdaptedLayer) -> None:
        AdaptedLayer.__init__(self, built.base_layer, built.site)
        for name in built.adapter_order:
            setattr(self, name, getattr(built, name))
        self.adapter_order = built.adapter_order


class LoraLinear(_Built):
    """A drop-in ``nnx.Linear(in_features, out_features)`` with a LoRA (or DoRA) adapter.

    Exactly what ``peft_jax.nnx.attach(model, LoraConfig(targets=[<its path>], ...))`` makes of
    an ``nnx.Linear`` at the same place: the linear layer is ``base_layer`` (its params stay
    ``nnx.Param``, frozen), the factors are `AdapterParam` ``<adapter>/lora_a`` ``(in, rank)`` and
    ``lora_b`` ``(rank, out)`` (DoRA adds ``magnitude``), and the output is
    ``x W + b + (alpha / rank) (x A) B`` without ever forming ``W + s A B``. `peft_jax.nnx.merge`
    folds it into the kernel.

    Args:
        in_features, out_features: as ``nnx.Linear``.
        rank, alpha, dropout, use_rslora, init_weights, lora_bias: the `Lora` settings.
        use_dora: weight-decomposed LoRA (`Dora` on that `Lora`).
        adapter: the adapter's name.
        rngs: draws the linear layer's and the adapter's init (and the dropout stream).
        **linear_kwargs: ``nnx.Linear``'s (``use_bias``, ``dtype``, ``param_dtype``,
            ``kernel_init``, ...).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import optax
        >>> layer = LoraLinear(3, 2, rank=1, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((4, 3))
        >>> bool(jnp.allclose(layer(x), layer.base_layer(x)))  # B starts at zero
        True
        >>> opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.LoRAParam)
        >>> grads = nnx.grad(lambda m: (m(x) ** 2).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
        >>> _ = opt.update(layer, grads)
        >>> bool(jnp.allclose(layer(x), layer.base_layer(x)))  # the adapter trained, W did not
        False
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 init_weights: Any = KaimingUniform(), lora_bias: bool = False, adapter: str = "default",
                 rngs: nnx.Rngs, **linear_kwargs: Any):
        method = lora_method(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                             use_dora=use_dora, init_weights=init_weights, lora_bias=lora_bias)
        linear = nnx.Linear(in_features, out_features, rngs=rngs, **linear_kwargs)
        self._adopt(adapt(linear, method, rngs=rngs, adapter=adapter))


class BottleneckAdapter(_Built):
    """A bottleneck adapter (any `Bottleneck`: `seq_bn`, `double_seq_bn`, `par_bn`,
    `scaled_par_bn`, `adapter_plus`, `compacter`, `compacter_pp`) as a layer.

    Called on ``Residual(y, x, norm)`` (a sub-layer's output ``y``, the residual stream ``x``, the
    post-sum norm or ``None``) it replaces ``norm(x + y)`` and computes what the method computes
    on a `peft_jax.hooks.ResidualTap` (e.g. `seq_bn`: ``LN(x + y + f(LN(x + y)))``); its
    ``base_layer`` *is* such a tap, so the layout is that of attaching the method to a model with
    ``ResidualTap(features, role=role, index=index)`` at the same path. Called on a plain hidden
    state ``h`` it is the method's module-site form on an identity layer: ``h + f(h)``.

    Args:
        features: the hidden width ``d``.
        method: the `Bottleneck` (``m = d // reduction_factor``; a per-block mapping reads ``index``).
        rngs: draws the adapter's init (and the dropout stream).
        role: ``"attention"`` or ``"ffn"``: the sub-layer whose output arrives here.
        index: the transformer block it belongs to.
        adapter: the adapter's name.
        shared: another `BottleneckAdapter` whose shared state (Compacter's PHM rule) this one
            uses, as one adapter attached to several taps shares it; ``None``: its own. Pass it to
            every Compacter module of an adapter but the first: `peft_jax.nnx.adapter_state` keeps
            one ``<adapter>/shared/...`` entry per adapter name.

    Raises:
        InvalidConfigError: ``method`` is not a `Bottleneck`, or ``features`` disagrees with it.
        IncompatibleMethodsError: ``shared`` holds another method or other shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from peft_jax.methods import seq_bn
        >>> from peft_jax.methods.sites import Residual
        >>> adapter = BottleneckAdapter(8, seq_bn(reduction_factor=4, init_weights="zero_up"), rngs=nnx.Rngs(0))
        >>> norm = nnx.LayerNorm(8, rngs=nnx.Rngs(1))
        >>> y, x = jnp.ones((2, 3, 8)), jnp.arange(8.0) * jnp.ones((2, 3, 8))
        >>> bool(jnp.allclose(adapter(Residual(y, x, norm)), norm(x + y)))  # f = 0 at init
        True
        >>> adapter(y).shape, sorted(nnx.to_pure_dict(nnx.state(adapter, nnx.LoRAParam))["default"])
        ((2, 3, 8), ['down', 'up'])
    """

    def __init__(self, features: int, method: Bottleneck, *, rngs: nnx.Rngs, role: str = "ffn",
                 index: int = 0, adapter: str = "default", shared: "BottleneckAdapter | None" = None):
        if not isinstance(method, Bottleneck):
            raise errors.InvalidConfigError(
                f"BottleneckAdapter takes a Bottleneck (seq_bn(), par_bn(), compacter(), ...), got {method!r}")
        self._adopt(adapt(ResidualTap(features, role=role, index=index), method, rngs=rngs, adapter=adapter))
        if shared is not None:
            _share(self, shared, adapter)

    def __call__(self, x, *args, **kwargs):
        if isinstance(x, Residual):
            return super().__call__(x, *args, **kwargs)
        live = self._live()
        if not live:
            return x
        # module-site semantics on an identity layer (d from the tap's width): y = h, h + f(h)
        site = ModuleSite(path=self.site.path, layer=type(self).__name__, param_shapes={})
        d = self.site.features

        def entries(slot):
            return [(module_form(m, d), p, s, c) for m, p, s, c in slot.entries()]

        if self.composition is not None:
            groups = {name: entries(slot) for name, slot in self.slots() if slot in live}
            return run_block(self.composition, groups, site, lambda y, params=None: y, x, {})
        return run_site([e for slot in live for e in entries(slot)], site, lambda y: y, x, {})


def _share(layer: AdaptedLayer, other: Any, adapter: str) -> None:
    """Points ``layer``'s slot ``adapter`` at ``other``'s shared bank (one bank, stored once)."""
    if not isinstance(other, AdaptedLayer) or adapter not in other.adapter_order:
        raise errors.AdapterNameError(
            f"shared= must be a BottleneckAdapter with an adapter named {adapter!r}, got {type(other).__name__}")
    mine, theirs = getattr(layer, adapter), getattr(other, adapter)
    if mine.methods != theirs.methods:
        raise errors.IncompatibleMethodsError(
            f"shared= holds {theirs.methods} but this adapter is {mine.methods}; only one method value "
            "(as one attached adapter) shares its state")
    if mine.shared is None:
        return  # nothing to share (a method without shared state)
    shapes = jax.tree.map(lambda v: v.shape, (mine.shared.all(), theirs.shared.all()))
    if shapes[0] != shapes[1]:
        raise errors.IncompatibleMethodsError(
            f"shared= holds shared state of shapes {shapes[1]}, this adapter needs {shapes[0]}; "
            "give both the same features and bottleneck size (or shared_W_phm=False)")
    mine.shared = theirs.shared
