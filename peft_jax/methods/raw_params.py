"""LoRA on raw parameters: kernels that are not layers, above all stacked MoE expert weights.

HF PEFT's ``LoraConfig(target_parameters=[...])`` (huggingface/peft PR #2638, ``ParamWrapper``)
adapts an ``nn.Parameter`` a model uses directly, such as ``experts.gate_up_proj`` of shape
``(experts, in, out)``. `RawParamLora` is that for JAX: it attaches to the param's *owner*
module (a module site) and gives each expert its own factors::

    W: (*batch, in, out)    A: (*batch, in, r)    B: (*batch, r, out)
    y = einsum(x, W) + s * einsum(einsum(x, A), B)        (or two ``ragged_dot`` calls)

with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The last axis is ``out``, the one before
it ``in`` and any leading ones are batch (experts): HF's layout for MoE experts. The training path
never forms the ``(*batch, in, out)`` delta; only `RawParamLora.merge` does. Params are stored
under the param's name, ``<owner path>/<adapter>/<param>/lora_a``, so several params of one owner
compose in one adapter.

How it works (and its limits). A raw param has no call of its own, so while the owner module
runs, `RawParamLora.apply` temporarily replaces ``jax.numpy.einsum`` and ``jax.lax.ragged_dot``
(restored in ``finally``). A call one of whose operands *is* the param's array (``base[param]``,
the very object NNX's ``self.w[...]`` and Linen's ``self.param(...)`` return) gets the low-rank
path added; every other call goes to the function that was there before, untouched. So:

* the model must pass the param as-is to ``jnp.einsum(spec, a, b)`` (two operands, string spec)
  or ``jax.lax.ragged_dot(x, w, group_sizes)`` (``w`` as ``rhs``); a param first transformed
  (``w.astype(...)``, ``w.T``), used with ``@`` / ``jnp.matmul`` / ``dot_general``, or read
  through a name bound before the call (``from jax.numpy import einsum``) is never seen, and the
  call raises `UnsupportedLayerError` rather than silently training nothing;
* an einsum spec must keep the layout: the param's batch letters in the other operand and the
  output, its ``in`` letter in the other operand only, its ``out`` letter in the output only
  (otherwise `UnsupportedLayerError` names the spec);
* the einsum must run inside the owner module's ``__call__``, in the same trace (Linen
  ``nn.jit`` / ``nn.remat`` lifting of the owner's own call re-creates the arrays; the error
  above then says so);
* other uses of the param (a norm, a regulariser) see the frozen base weight;
* unlike HF (which materialises the delta and so refuses ``lora_dropout``), dropout works: it is
  applied to the low-rank input only.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods import Context, Lora, ModuleSite
    >>> site = ModuleSite(path="experts", layer="Experts", param_shapes={"w_up": (4, 8, 16)})
    >>> method = RawParamLora(param="w_up", lora=Lora(rank=2, alpha=4.0))
    >>> base = {"w_up": jnp.ones((4, 8, 16))}
    >>> params, _ = method.init(jax.random.key(0), site, base, {})
    >>> jax.tree.map(jnp.shape, params)
    {'w_up': {'lora_a': (4, 8, 2), 'lora_b': (4, 2, 16)}}
    >>> call = lambda x: jnp.einsum("etd,edf->etf", x, base["w_up"])
    >>> x = jnp.ones((4, 3, 8))
    >>> y = method.apply(params, {}, site, call, x, base, Context())
    >>> bool(jnp.array_equal(y, call(x)))  # B starts at zero
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import string
import warnings
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import Context, Mergeable, Method, ModuleSite, Params
from peft_jax.methods.config import Placement
from peft_jax.methods.initializers import Gaussian, KaimingUniform
from peft_jax.methods.lora import Lora, input_dropout

_RAGGED_SIGNATURE = inspect.signature(jax.lax.ragged_dot)


# --- nested names ------------------------------------------------------------------------------
def _parts(name: str) -> list[str]:
    return name.split("/")


def _get(tree: Any, name: str) -> Any:
    for part in _parts(name):
        tree = tree[part]
    return tree


def _nest(name: str, value: Any) -> dict:
    for part in reversed(_parts(name)):
        value = {part: value}
    return value


def _replace(tree: dict, name: str, value: Any) -> dict:
    """A copy of the nested ``tree`` with ``value`` at ``name`` (dicts on the way copied)."""
    head, _, rest = name.partition("/")
    return {**tree, head: _replace(tree[head], rest, value) if rest else value}


def _leaf_names(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _leaf_names(v, f"{prefix}{k}/")]
    return [prefix[:-1]]


def _find_shape(shapes: Any, name: str) -> tuple[int, ...] | None:
    try:
        found = _get(shapes, name)
    except (KeyError, TypeError):
        return None
    return None if isinstance(found, dict) else tuple(found)


# --- the method ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RawParamLora(Method, Mergeable):
    """LoRA on the raw param ``param`` of the module it is attached to (HF ``target_parameters``).

    Args:
        param: the param's name on its owner module (``"w_up"``; nested names as ``"sub/w"``).
        lora: rank, alpha, rsLoRA, dropout and init (`KaimingUniform` or `Gaussian` only).
    """

    name: ClassVar[str] = "lora_raw_param"
    sites: ClassVar[tuple[str, ...]] = ("module",)
    param: str
    lora: Lora = Lora()

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param or "" in _parts(self.param):
            raise errors.InvalidConfigError(
                f"param must be a param name such as 'w_up' (nested: 'sub/w'), got {self.param!r}")
        if not isinstance(self.lora, Lora):
            raise errors.InvalidConfigError(f"lora must be a Lora(...) value, got {self.lora!r}")
        if not isinstance(self.lora.init_weights, (KaimingUniform, Gaussian)):
            raise errors.InvalidConfigError(
                f"LoRA on the raw param {self.param!r} supports the KaimingUniform and Gaussian "
                f"inits only, got {type(self.lora.init_weights).__name__} (PiSSA / OLoRA need one "
                "kernel matrix, not a stack of experts)")
        if self.lora.lora_bias:
            raise errors.InvalidConfigError(
                f"LoRA on the raw param {self.param!r} does not take lora_bias (nor in HF PEFT)")

    @property
    def scale(self) -> float:
        return self.lora.scale

    @property
    def needs_rng(self) -> bool:
        return self.lora.dropout > 0

    def check(self, site) -> None:
        super().check(site)
        shape = _find_shape(site.param_shapes, self.param)
        if shape is None:
            names = ", ".join(sorted(_leaf_names(dict(site.param_shapes)))) or "none"
            raise errors.InvalidConfigError(
                f"target parameter {self.param!r} does not exist on module {site.path!r} "
                f"({site.layer}); its params are: {names}")
        if len(shape) < 2:
            raise errors.InvalidConfigError(
                f"target parameter {self.param!r} of {site.path!r} ({site.layer}) has shape {shape}: "
                "LoRA needs at least 2 dims laid out (*experts, in, out); target a kernel instead")
        fan_in, fan_out = shape[-2], shape[-1]
        if self.lora.rank > min(fan_in, fan_out):
            warnings.warn(
                f"LoRA rank {self.lora.rank} on {site.path}/{self.param} is larger than "
                f"min(in, out) = {min(fan_in, fan_out)}; the extra rank adds parameters but no "
                "expressiveness", UserWarning, stacklevel=2)

    # -- state ------------------------------------------------------------------------------------
    def init(self, key, site: ModuleSite, base: Params, shared: Params):
        w = _get(base, self.param)
        *batch, fan_in, fan_out = w.shape
        rank, dtype = self.lora.rank, w.dtype
        a_shape = (*batch, fan_in, rank)
        init = self.lora.init_weights
        if isinstance(init, Gaussian):
            std = init.std if init.std is not None else 1.0 / rank
            a = std * jax.random.normal(key, a_shape, dtype)
        else:  # KaimingUniform, per expert: bound 1 / sqrt(in)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        b = jnp.zeros((*batch, rank, fan_out), dtype)
        return _nest(self.param, {"lora_a": a, "lora_b": b}), {}

    # -- merging (the only place the full delta exists) -------------------------------------------
    def delta(self, params: Params, dtype: Any) -> jax.Array:
        """``s * A @ B`` per expert, shaped like the param."""
        own = _get(params, self.param)
        return (self.scale * jnp.matmul(own["lora_a"], own["lora_b"])).astype(dtype)

    def merge(self, params, shared, site, base):
        w = _get(base, self.param)
        return self._top(base, w + self.delta(params, w.dtype)), None

    def unmerge(self, params, shared, site, base, record):
        w = _get(base, self.param)
        return self._top(base, w - self.delta(params, w.dtype))

    def _top(self, base: Params, value: jax.Array) -> Params:
        top = _parts(self.param)[0]
        return {top: _replace(dict(base), self.param, value)[top]}

    # -- running ----------------------------------------------------------------------------------
    def apply(self, params, shared, site, call, x, base, ctx: Context):
        w = _get(base, self.param)
        own = _get(params, self.param)
        seen = [0]
        prev_einsum, prev_ragged = jnp.einsum, jax.lax.ragged_dot

        def key() -> jax.Array | None:
            k = None if ctx.key is None else jax.random.fold_in(ctx.key, seen[0])
            seen[0] += 1
            return k

        def einsum(*args, **kwargs):
            if not any(a is w for a in args):
                return prev_einsum(*args, **kwargs)
            out = prev_einsum(*args, **kwargs)
            return out + self._einsum_delta(site, prev_einsum, args, kwargs, w, own, out.dtype, key())

        def ragged_dot(*args, **kwargs):
            bound = _RAGGED_SIGNATURE.bind(*args, **kwargs)
            lhs, rhs = bound.arguments["lhs"], bound.arguments["rhs"]
            if lhs is not w and rhs is not w:
                return prev_ragged(*args, **kwargs)
            if lhs is w or w.ndim != 3:
                raise errors.UnsupportedLayerError(
                    f"LoRA on the raw param {site.path}/{self.param} (shape {tuple(w.shape)}): "
                    "jax.lax.ragged_dot must take it as rhs of shape (experts, in, out)")
            out = prev_ragged(*args, **kwargs)
            extra = {k: v for k, v in bound.arguments.items()
                     if k in ("precision", "group_offset") and v is not None}
            groups = bound.arguments["group_sizes"]
            h = input_dropout(lhs.astype(out.dtype), self.lora.dropout, key())
            h = prev_ragged(h, own["lora_a"].astype(out.dtype), groups, **extra)
            h = h * jnp.asarray(self.scale, out.dtype)
            return out + prev_ragged(h, own["lora_b"].astype(out.dtype), groups, **extra)

        jnp.einsum, jax.lax.ragged_dot = einsum, ragged_dot
        try:
            out = call(x)
        finally:
            jnp.einsum, jax.lax.ragged_dot = prev_einsum, prev_ragged
        if not seen[0]:
            raise errors.UnsupportedLayerError(
                f"LoRA on the raw param {site.path}/{self.param} ({site.layer}): the module's call "
                "never passed that param as-is to jnp.einsum or jax.lax.ragged_dot, so the adapter "
                "would train nothing. It must be used as-is by jnp.einsum(spec, x, w) or "
                "jax.lax.ragged_dot(x, w, group_sizes) (not transformed first, e.g. w.astype(...) or "
                "w.T, nor used with @ / jnp.matmul / dot_general)")
        return out

    def _einsum_delta(self, site, einsum: Callable, args: Sequence[Any], kwargs: dict, w, own,
                      dtype, key) -> jax.Array:
        """``s * einsum(einsum(x, A), B)`` for one intercepted ``einsum(spec, x, w)``."""
        where = f"LoRA on the raw param {site.path}/{self.param} (shape {tuple(w.shape)})"
        if len(args) != 3 or not isinstance(args[0], str) or args[1] is args[2]:
            raise errors.UnsupportedLayerError(
                f"{where}: jnp.einsum must be called as jnp.einsum('<spec>', x, w) with two "
                "distinct operands for the param to be adapted")
        spec, first, second = args
        w_pos = 1 if first is w else 2
        inputs, output = _parse_spec(spec)
        p_spec, x_spec = inputs[w_pos - 1], inputs[2 - w_pos]
        other = second if w_pos == 1 else first
        _check_layout(p_spec, x_spec, output, spec, where)
        out_letter = p_spec[-1]
        r = next(c for c in string.ascii_letters if c not in spec)
        a_spec = p_spec[:-1] + r
        h_spec = output.replace(out_letter, r)
        b_spec = p_spec[:-2] + r + out_letter
        extra = {k: kwargs[k] for k in ("precision",) if kwargs.get(k) is not None}
        x = input_dropout(other.astype(dtype), self.lora.dropout, key)
        h = einsum(f"{x_spec},{a_spec}->{h_spec}", x, own["lora_a"].astype(dtype), **extra)
        h = h * jnp.asarray(self.scale, dtype)
        return einsum(f"{h_spec},{b_spec}->{output}", h, own["lora_b"].astype(dtype), **extra)


def _parse_spec(spec: str) -> tuple[list[str], str]:
    """``(input specs, output spec)`` of an einsum string (implicit output made explicit)."""
    spec = spec.replace(" ", "")
    if "->" in spec:
        ins, output = spec.split("->")
        return ins.split(","), output
    inputs = ins = spec.split(",")
    letters = "".join(ins).replace(".", "")
    output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return inputs, ("..." if "..." in spec else "") + output


def _check_layout(p_spec: str, x_spec: str, output: str, spec: str, where: str) -> None:
    """The param's letters must read ``(*batch, in, out)``: batch in both the other operand and
    the output, ``in`` in the other operand only, ``out`` in the output only."""
    problem = None
    if "." in p_spec or len(set(p_spec)) != len(p_spec) or len(p_spec) < 2:
        problem = "the param's subscripts have an ellipsis or a repeated letter"
    else:
        *batch, fan_in, fan_out = p_spec
        if not (fan_out in output and fan_out not in x_spec):
            problem = f"its last axis {fan_out!r} (out) must be in the output only"
        elif not (fan_in in x_spec and fan_in not in output):
            problem = f"its axis {fan_in!r} (in) must be contracted with the other operand"
        else:
            bad = [c for c in batch if c not in x_spec or c not in output]
            if bad:
                problem = f"its leading axes {bad} (experts) must be in the other operand and the output"
    if problem:
        raise errors.UnsupportedLayerError(
            f"{where}: jnp.einsum({spec!r}) does not use it laid out as (*experts, in, out): "
            f"{problem}; the param's subscripts are {p_spec!r}. Store it as (*experts, in, out) "
            "or adapt it another way")


# --- configs ---------------------------------------------------------------------------------------
class Placements(tuple):
    """A tuple of placements that is itself a config (``placements()``)."""

    def placements(self) -> tuple[Placement, ...]:
        return tuple(self)


def _split_name(target: Any) -> tuple[Any, str]:
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], str):
        return target
    if not isinstance(target, str) or not target:
        raise errors.InvalidConfigError(
            "target_parameters entries are 'owner/param' names (e.g. 'experts/w_up', HF's "
            f"'mlp.experts.gate_up_proj') or (owner selector, param) pairs, got {target!r}")
    name = target if "/" in target else target.replace(".", "/")
    owner, _, param = name.rpartition("/")
    if not owner:
        raise errors.InvalidConfigError(
            f"target parameter {target!r} needs its owner module: 'experts/{target}' (module "
            "name suffix + '/' + param name), or an (owner selector, param) pair")
    return [owner], param


def target_parameters(names: Sequence[Any], lora: Lora | Callable[[str], Lora] = Lora()
                      ) -> Placements:
    """`RawParamLora` placements from HF-style ``target_parameters`` names.

    Each name is ``"<owner module suffix>/<param>"`` (``"experts/w_up"``; HF's dotted
    ``"mlp.experts.gate_up_proj"`` too) or an ``(owner selector, param)`` pair for nested param
    names or regex owners. ``lora`` is a `Lora` or ``owner path -> Lora`` (per-path settings).
    The result is a config (``placements()`` of each) for ``attach`` and `compose`.

    Example:
        >>> from peft_jax.methods import Lora
        >>> cfg = target_parameters(["experts/w_up", "experts/w_down"], Lora(rank=4))
        >>> [(p.targets, p.method_for("moe/experts").param) for p in cfg]
        [(['experts'], 'w_up'), (['experts'], 'w_down')]
    """
    if isinstance(names, str):
        names = [names]
    out = []
    for target in names:
        owner, param = _split_name(target)
        if isinstance(lora, Lora):
            method: Any = RawParamLora(param=param, lora=lora)
        elif callable(lora):
            method = (lambda param: lambda path: RawParamLora(param=param, lora=lora(path)))(param)
        else:
            raise errors.InvalidConfigError(f"lora must be a Lora(...) value, got {lora!r}")
        out.append(Placement(owner, method, what=f"target_parameters {target!r}"))
    return Placements(out)


__all__ = ["RawParamLora", "target_parameters"]
