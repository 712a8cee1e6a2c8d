"""The one interface every PEFT method implements: a method is its config, and it wraps a call.

A method is a frozen, keyword-only dataclass holding its hyper-parameters (``Lora(rank=8)``,
``IA3()``, ``Vera(rank=256)``) and its pure math. It is attached at a *site* of a model and
wraps the base call there::

    out = method.apply(params, shared, site, call, x, base, ctx)

``call(x)`` runs what the model would have run (the base layer, or the methods attached before
this one, which fold in attach order). ``base`` holds the site's own frozen arrays (``"kernel"``,
``"bias"``, or a module's whole param tree). LoRA returns ``call(x) + s * (x A) B``; IA3 on a
feed-forward input returns ``call(l * x)``; a trained copy calls the base with other params.

Sites (a small closed set, each front-end implements them once):

* ``"linear"``: a layer that is a linear map of its kernel (Dense ... Embed; see `peft_jax.ops`).
* ``"module"``: any module, whose params the method may replace (LayerNorm tuning,
  ``modules_to_save``) or train in place (BitFit).

* ``"residual"``: where a sub-layer's output meets the residual stream (a tap the model places);
  bottleneck adapters return ``call(Residual(y + f(y), x, norm))`` and friends.
* ``"inputs"``: the model's input embeddings and mask (an input tap); prompt tuning returns
  ``call(Inputs([P; e], [1; m]))``.
* ``"attention"``: an attention tap's ``(q, k, v, mask)``; prefix tuning returns
  ``call(Attention(q, [Pk; k], [Pv; v], [1; m]))``.

The sites and the tuples their calls take are in `peft_jax.methods.sites`.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import Lora, LinearSite
    >>> from peft_jax.ops import dense_op
    >>> site = LinearSite(path="q", op=dense_op(4, 3), layer="Linear", has_bias=False)
    >>> method = Lora(rank=2, alpha=4.0)
    >>> method.scale, sorted(method.param_shapes(site))
    (2.0, ['lora_a', 'lora_b'])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax

from peft_jax import errors
from peft_jax.methods.sites import (
    Attention,
    AttentionSite,
    Inputs,
    InputSite,
    LinearSite,
    ModuleSite,
    Residual,
    ResidualSite,
    Site,
)
from peft_jax.ops import LinearOp

Params = dict[str, Any]
Call = Callable[..., Any]

__all__ = ["Attention", "AttentionSite", "AddsToKernel", "Call", "Context", "InputSite", "Inputs",
           "LinearSite", "Mergeable", "Method", "ModuleSite", "Params", "Residual", "ResidualSite",
           "Site", "combine_regularizers", "fold_result_for", "is_mergeable", "require_mergeable"]


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-call facts: the dropout key (``None`` in eval mode or without randomness), and where
    to report values worth reading after a call (UniPELT's gates), when the front-end records."""

    key: jax.Array | None = None
    record: Callable[[str, jax.Array], None] | None = None

    def fold(self, salt: int) -> "Context":
        """A context whose key is independent of this one's (for a second random draw)."""
        return self if self.key is None else Context(jax.random.fold_in(self.key, salt), self.record)

    def report(self, name: str, value: jax.Array) -> None:
        """Hands ``value`` to the front-end (read with `peft_jax.nnx.recorded` or Linen's
        ``"intermediates"``); does nothing unless recording is on."""
        if self.record is not None:
            self.record(name, value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """Base class of every method; fields live only on the final dataclasses.

    Subclasses set ``sites`` (the site kinds they attach to) and ``name`` (their table entry,
    used by ``io/`` and `summary`), and implement `init` and `apply`.
    """

    name: ClassVar[str] = "method"
    sites: ClassVar[tuple[str, ...]] = ("linear",)
    #: base leaves (of the site's own params) this method trains in place, e.g. ``("bias",)``.
    trains_base: ClassVar[tuple[str, ...]] = ()
    #: whether the math holds on grouped convolutions (``feature_group_count > 1``) and on
    #: batched einsum kernels (a stack of experts with factors per entry).
    grouped_conv: ClassVar[bool] = False
    batched_kernels: ClassVar[bool] = False
    #: how the front-ends combine this method's `regularizer` terms over its sites: ``"sum"``,
    #: or ``"mean"`` (AdaLoRA: HF PEFT averages its penalty over the adapted matrices).
    regularizer_reduction: ClassVar[str] = "sum"

    # -- before anything is built ------------------------------------------------------------
    def check(self, site: Site) -> None:
        """Raises a typed error if this method cannot go on ``site`` (runs before any compile)."""
        if site.kind not in self.sites:
            raise errors.UnsupportedLayerError(
                f"{type(self).__name__} cannot be attached to {site.path!r} ({site.layer}): it "
                f"needs a {' or '.join(self.sites)} site; narrow its targets")
        if getattr(getattr(site, "op", None), "groups", 1) > 1 and not self.grouped_conv:
            raise errors.UnsupportedLayerError(
                f"{type(self).__name__} cannot adapt the grouped convolution {site.path!r} "
                f"({site.layer}, feature_group_count={site.op.groups}); LoRA, LoHa, LoKr and BEFT can")
        if getattr(getattr(site, "op", None), "batched", False) and not self.batched_kernels:
            raise errors.UnsupportedLayerError(
                f"{type(self).__name__} cannot adapt {site.path!r} ({site.layer}), whose kernel is a "
                f"stack over einsum axes {site.op.batch_letters!r} (e.g. experts); LoRA can")

    @property
    def needs_rng(self) -> bool:
        """Whether `apply` draws random numbers in training (dropout)."""
        return False

    # -- state ------------------------------------------------------------------------------------
    def init_shared(self, key: jax.Array, sites: list[Site], dtype: Any) -> Params:
        """State created once per adapter for all its sites (VeRA's projections); frozen."""
        return {}

    def init_shared_params(self, key: jax.Array, sites: list[Site], dtype: Any) -> Params:
        """Trainable params created once per adapter and used by all its sites (Compacter's
        shared PHM rule, prefix tuning's reparameterization MLP). `apply` finds them in
        ``shared`` next to the frozen state; their names must not clash with it."""
        return {}

    def init(self, key: jax.Array, site: Site, base: Params, shared: Params) -> tuple[Params, Params]:
        """``(params, base_updates)``: the trainable params and any replaced base arrays
        (PiSSA moves part of the kernel into the adapter; ``{}`` otherwise)."""
        raise NotImplementedError

    def param_shapes(self, site: Site) -> Params:
        """Shapes of the params `init` returns (for counting without building)."""
        import jax.numpy as jnp

        def build(base):
            key = jax.random.key(0)
            shared = {**self.init_shared(key, [site], jnp.float32),
                      **self.init_shared_params(key, [site], jnp.float32)}
            return self.init(key, site, base, shared)[0]

        return jax.tree.map(lambda s: tuple(s.shape), jax.eval_shape(build, _abstract_base(site)))

    # -- running ----------------------------------------------------------------------------------
    def apply(self, params: Params, shared: Params, site: Site, call: Call, x: Any, base: Params,
              ctx: Context) -> Any:
        """What the site returns with this method attached."""
        raise NotImplementedError

    def attend(self, params: Params, shared: Params, site: Site, query: jax.Array, out: jax.Array,
               base: Params) -> jax.Array:
        """``query @ W'.T`` for a tied embedding head, given ``out = query @ W.T``."""
        raise errors.UnsupportedLayerError(
            f"{type(self).__name__} on {site.path!r} cannot be used through Embed.attend (a tied "
            "output head); leave the embedding out of its targets")

    def regularizer(self, params: Params, shared: Params, site: Site) -> jax.Array | None:
        """A term to add to the loss (AdaLoRA's orthogonality), or ``None``."""
        return None

    def fold(self, shared: Params, sites: list[Site], params: dict[str, Params]
             ) -> tuple["Method | dict[str, Method]", dict[str, Params]] | None:
        """A cheaper method with identical outputs (one for all sites, or one per site path)
        and its params per site path (prefix tuning's MLP evaluated once into flat prefixes;
        AdaLoRA to LoRA with per-layer ranks), or ``None`` when there is nothing to fold.
        Front-ends' ``fold`` calls it; shared params the new method does not use go."""
        return None

    def shared_keys(self, sites: list[Site]) -> set[str]:
        """Names of the trainable shared params this method keeps (``init_shared_params``)."""
        import jax.numpy as jnp

        return set(jax.eval_shape(lambda: self.init_shared_params(jax.random.key(0), sites, jnp.float32)))


class Mergeable:
    """Mixin of methods whose effect folds into the site's base arrays."""

    def merge(self, params: Params, shared: Params, site: Site, base: Params) -> tuple[Params, Any]:
        """``(updated base arrays, record)``: outputs unchanged up to rounding."""
        raise NotImplementedError

    def unmerge(self, params: Params, shared: Params, site: Site, base: Params, record: Any) -> Params:
        """The base arrays before `merge` (up to rounding)."""
        raise NotImplementedError


class AddsToKernel(Mergeable):
    """Mixin of methods whose merged form is ``W + delta``: they define `kernel_delta` only."""

    def kernel_delta(self, params: Params, shared: Params, op: LinearOp) -> jax.Array:
        """The update laid out like the kernel (materialised only here, for merging)."""
        raise NotImplementedError

    def merge(self, params: Params, shared: Params, site: Site, base: Params) -> tuple[Params, Any]:
        kernel = base["kernel"]
        return {"kernel": kernel + self.kernel_delta(params, shared, site.op).astype(kernel.dtype)}, None

    def unmerge(self, params: Params, shared: Params, site: Site, base: Params, record: Any) -> Params:
        kernel = base["kernel"]
        return {"kernel": kernel - self.kernel_delta(params, shared, site.op).astype(kernel.dtype)}


def combine_regularizers(terms: list[tuple[Method, jax.Array]]) -> jax.Array:
    """The loss term of all sites' ``(method, term)`` pairs: summed, except that the terms of
    a method type whose ``regularizer_reduction`` is ``"mean"`` are averaged over its sites
    first. ``0.0`` (float32) without terms.

    Example:
        >>> import jax.numpy as jnp
        >>> float(combine_regularizers([(Method(), jnp.array(1.0)), (Method(), jnp.array(2.0))]))
        3.0
    """
    import jax.numpy as jnp

    total = jnp.zeros((), jnp.float32)
    means: dict[type, list[jax.Array]] = {}
    for method, term in terms:
        term = term.astype(jnp.float32)
        if method.regularizer_reduction == "mean":
            means.setdefault(type(method), []).append(term)
        else:
            total = total + term
    for group in means.values():
        total = total + sum(group[1:], group[0]) / len(group)
    return total


def fold_result_for(new: "Method | dict[str, Method]", path: str) -> Method:
    """The method `Method.fold` gives the site at ``path`` (one for all, or per path)."""
    return new if isinstance(new, Method) else new[path]


def is_mergeable(method: Method) -> bool:
    return isinstance(method, Mergeable)


def require_mergeable(method: Method, path: str) -> None:
    if not is_mergeable(method):
        raise errors.NotMergeableError(
            f"{type(method).__name__} (on {path!r}) cannot be merged into the base weights; "
            "keep it unmerged for serving, or detach it before merging the others")


def _abstract_base(site: Site) -> Params:
    import jax.numpy as jnp

    if site.kind in ("residual", "attention"):
        return {}
    if site.kind == "inputs":
        return {"embedding": jax.ShapeDtypeStruct((site.vocab_size, site.features), jnp.float32)}
    if site.kind == "linear":
        kernel = jax.ShapeDtypeStruct(site.op.kernel_shape, jnp.float32)
        base = {"kernel": kernel}
        if site.has_bias:
            base["bias"] = jax.ShapeDtypeStruct(site.op.out_shape, jnp.float32)
        return base
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), dict(site.param_shapes),
                        is_leaf=lambda s: isinstance(s, tuple))
