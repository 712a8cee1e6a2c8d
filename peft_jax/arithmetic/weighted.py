"""Weighted combinations of LoRA adapters: HF PEFT's ``add_weighted_adapter``, as pure functions.

``weighted_lora(adapters, weights, combination_type)`` takes LoRA adapters as
``(sites, state, name)`` (see `peft_jax.arithmetic.state`) and returns a new one as
``(sites, state)`` with HF PEFT's semantics (``peft/tuners/lora/model.py``):

* ``"cat"``: ``A = [w_1 s_1 A_1, ...]`` along the rank axis, ``B = [B_1; ...]``, so the update is
  exactly ``sum_i w_i s_i A_i B_i``; the new rank is the sum of the adapters' ranks (sites an
  adapter does not cover get zero components).
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: the rule
  (`peft_jax.arithmetic.rules`) is applied to the ``A``'s and to the ``B``'s separately, with
  weights ``sign * sqrt|w_i s_i|`` on ``A`` and ``sqrt|w_i s_i|`` on ``B``; all adapters need the
  same rank. This is an approximation with cross terms, not ``sum_i w_i s_i A_i B_i``.
* ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``:
  the rule is applied to the full updates ``s_i A_i B_i`` with weights ``w_i``, and the result is
  factored by truncated SVD (`peft_jax.arithmetic.svd`) to ``svd_rank`` (default: the largest rank),
  optionally clamped at the ``svd_clamp`` quantile.

The new adapter is ``Lora(rank=r, alpha=r)`` (scale 1) on the union of the sites, with the
first adapter's dropout. A single adapter forces ``"linear"``, as in HF PEFT. One deviation:
HF copies the first adapter's ``use_rslora``, which makes the new adapter's scale
``sqrt(r)`` instead of 1 when that adapter is rsLoRA; here the factors are HF's and the scale is
always 1, so the update is the combination the docs describe.

DARE's masks are drawn from ``key`` (one independent draw per tensor) or given as ``masks``:
``{"<path>/<adapter>/lora_a" | ".../lora_b": mask like that factor}`` for the factor rules,
``{"<path>/<adapter>/delta": mask (fan_in, fan_out)}`` for the SVD rules.

Example:
    >>> import jax.numpy as jnp
    >>> from peft_jax.methods import Lora
    >>> one = ({"q": Lora(rank=1, alpha=1.0)}, {"q/a/lora_a": jnp.ones((2, 1)), "q/a/lora_b": jnp.ones((1, 2))}, "a")
    >>> two = ({"q": Lora(rank=1, alpha=2.0)}, {"q/b/lora_a": jnp.ones((2, 1)), "q/b/lora_b": -jnp.ones((1, 2))}, "b")
    >>> sites, state = weighted_lora([one, two], [1.0, 0.5], "cat", name="ab")
    >>> sites["q"].rank, (state["q/ab/lora_a"] @ state["q/ab/lora_b"]).tolist()
    (2, [[0.0, 0.0], [0.0, 0.0]])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.arithmetic import rules
from peft_jax.arithmetic.state import Sites, State, site_methods
from peft_jax.arithmetic.svd import check_clamp, svd_factors
from peft_jax.methods.initializers import KaimingUniform
from peft_jax.methods.lora import Lora

__all__ = ["COMBINATION_TYPES", "weighted_lora"]

#: combination type -> (how it applies, the rule in `peft_jax.arithmetic.rules.RULES`)
COMBINATION_TYPES: dict[str, tuple[str, str | None]] = {
    "cat": ("cat", None),
    "linear": ("factors", "task_arithmetic"),
    "ties": ("factors", "ties"),
    "dare_linear": ("factors", "dare_linear"),
    "dare_ties": ("factors", "dare_ties"),
    "magnitude_prune": ("factors", "magnitude_prune"),
    "svd": ("svd", "task_arithmetic"),
    "ties_svd": ("svd", "ties"),
    "dare_linear_svd": ("svd", "dare_linear"),
    "dare_ties_svd": ("svd", "dare_ties"),
    "magnitude_prune_svd": ("svd", "magnitude_prune"),
}


@dataclasses.dataclass(frozen=True)
class _Site:
    """One source adapter's LoRA at one path."""

    lora: Lora
    a: jax.Array
    b: jax.Array

    @property
    def a2(self) -> jax.Array:
        return self.a.reshape(-1, self.lora.rank)

    @property
    def b2(self) -> jax.Array:
        return self.b.reshape(self.lora.rank, -1)


def _lora_of(value: Any, path: str, name: str) -> Lora:
    methods = site_methods(value, path)
    kinds = [type(m).__name__ for m in methods]
    if len(methods) != 1 or type(methods[0]) is not Lora:
        raise errors.InvalidConfigError(
            f"adapter {name!r} has {kinds} on {path!r}; weighted combinations take plain LoRA adapters "
            "only (no DoRA, gated LoRA, AdaLoRA or other methods, as in HF PEFT); convert it first with "
            "peft_jax.arithmetic.to_lora")
    lora = methods[0]
    if lora.lora_bias:
        raise errors.InvalidConfigError(
            f"adapter {name!r} on {path!r} has lora_bias=True, which a weighted combination would drop; "
            "combine adapters without lora_bias")
    return lora


def _read(adapter: Any, ops: Mapping[str, Any] | None) -> tuple[str, dict[str, _Site]]:
    try:
        sites, state, name = adapter
    except (TypeError, ValueError):
        raise errors.InvalidConfigError(
            f"each adapter must be a (sites, state, name) triple, got {type(adapter).__name__}") from None
    out = {}
    for path, value in sites.items():
        lora = _lora_of(value, path, name)
        try:
            a, b = jnp.asarray(state[f"{path}/{name}/lora_a"]), jnp.asarray(state[f"{path}/{name}/lora_b"])
        except KeyError as e:
            raise errors.StateError(f"adapter {name!r} has no state {e.args[0]!r}; pass "
                                    "peft_jax.nnx.adapter_state(model, name) as its state") from None
        op = None if ops is None else ops.get(path)
        if op is not None and (getattr(op, "batched", False) or getattr(op, "groups", 1) > 1):
            raise errors.InvalidConfigError(
                f"{path!r} is a stacked (expert) kernel or a grouped convolution; weighted combinations "
                "support plain kernels only (HF PEFT neither combines target_parameters)")
        r = lora.rank
        if a.shape[-1] != r or b.shape[0] != r:
            raise errors.StateError(
                f"adapter {name!r} on {path!r}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not "
                f"have rank {r} as their last / first axis (a stacked kernel? pass ops= to check)")
        out[path] = _Site(lora, a, b)
    if not out:
        raise errors.InvalidConfigError(f"adapter {name!r} has no sites")
    return name, out


def _check_options(combination_type, weights, n, density, majority_sign_method, svd_rank):
    if combination_type not in COMBINATION_TYPES:
        raise errors.InvalidConfigError(
            f"unknown combination_type {combination_type!r}; choose one of {sorted(COMBINATION_TYPES)}")
    if len(weights) != n:
        raise errors.InvalidConfigError(f"got {len(weights)} weights for {n} adapters; pass one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise errors.InvalidConfigError(f"weights must be finite numbers, got {w!r}")
    if majority_sign_method not in rules.SIGN_METHODS:
        raise errors.InvalidConfigError(
            f"majority_sign_method must be one of {rules.SIGN_METHODS}, got {majority_sign_method!r}")
    rule = COMBINATION_TYPES[combination_type][1]
    if rule is not None and rules.RULES[rule].needs_density and density is None:
        raise errors.InvalidConfigError(f"combination_type {combination_type!r} needs density= in (0, 1]")
    if density is not None:
        rules.check_density(density)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise errors.InvalidConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")


def weighted_lora(adapters: Sequence[tuple[Sites, State, str]], weights: Sequence[float],
                  combination_type: str = "svd", *, name: str = "merged", svd_rank: int | None = None,
                  svd_clamp: float | None = None, density: float | None = None,
                  majority_sign_method: str = "total", key: jax.Array | None = None,
                  masks: Mapping[str, jax.Array] | None = None, ops: Mapping[str, Any] | None = None,
                  ) -> tuple[dict[str, Lora], dict[str, jax.Array]]:
    """A new LoRA adapter ``name`` combining ``adapters`` with ``weights``; see the module.

    Args:
        adapters: ``(sites, state, name)`` per adapter: ``sites`` maps paths to a `Lora`,
            ``state`` holds its canonical ``<path>/<name>/lora_a`` / ``lora_b``.
        weights: one number per adapter (negative subtracts).
        combination_type: one of `COMBINATION_TYPES`.
        name: the new adapter's name (in the returned state's keys).
        svd_rank, svd_clamp: rank and clamp quantile of the SVD types.
        density: fraction kept by the pruning rules, in ``(0, 1]``.
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES rules).
        key, masks: DARE's masks: drawn from ``key``, or given (see the module).
        ops: optional ``{path: LinearOp}`` to refuse stacked / grouped kernels up front.

    Returns:
        ``(sites, state)``: ``{path: Lora(rank=r, alpha=r)}`` and ``{"<path>/<name>/lora_a": ...}``.

    Raises:
        InvalidConfigError: unknown type, wrong number of weights, unequal ranks where the type
            needs equal ones, non-LoRA methods, ``density`` outside ``(0, 1]`` or missing, ...
    """
    if not adapters:
        raise errors.InvalidConfigError("weighted_lora needs at least one adapter")
    _check_options(combination_type, weights, len(adapters), density, majority_sign_method, svd_rank)
    svd_clamp = check_clamp(svd_clamp)
    read = [_read(adapter, ops) for adapter in adapters]
    names = [n for n, _ in read]
    if len(set(names)) != len(names):
        raise errors.InvalidConfigError(f"adapter names must differ, got {names}")
    if len(adapters) == 1:
        combination_type = "linear"  # as HF PEFT: one adapter can only be scaled
    how, rule = COMBINATION_TYPES[combination_type]
    ranks = [max(s.lora.rank for s in sites.values()) for _, sites in read]
    if how == "factors" and len(set(ranks)) != 1:
        raise errors.InvalidConfigError(
            f"combination_type {combination_type!r} needs adapters of one rank, got ranks {dict(zip(names, ranks))}; "
            "use 'cat' or an SVD type ('svd', 'ties_svd', ...) for different ranks")
    new_rank = {"cat": sum(ranks), "factors": ranks[0], "svd": svd_rank or max(ranks)}[how]
    options = dict(density=density, majority_sign_method=majority_sign_method)
    if masks is not None and not (rule is not None and rules.RULES[rule].random):
        raise errors.InvalidConfigError(f"masks= is for the DARE combination types, not {combination_type!r}")
    draws = _MaskSource(key, masks, density if rule is not None and rules.RULES[rule].random else None)

    paths = list(dict.fromkeys(p for _, sites in read for p in sites))
    first = read[0][1][next(iter(read[0][1]))].lora
    new = dataclasses.replace(first, rank=new_rank, alpha=float(new_rank), use_rslora=False,
                              init_weights=KaimingUniform())
    out_sites, out_state = {}, {}
    for path in paths:
        present = [(n, float(w), sites[path]) for (n, sites), w in zip(read, weights) if path in sites]
        _check_shapes(path, present)
        if how == "cat":
            a, b = _cat(present, new_rank)
        elif how == "factors":
            a, b = _factors(path, present, new_rank, rule, options, draws)
        else:
            a, b = _svd(path, present, new_rank, rule, options, draws, svd_clamp)
        out_sites[path] = new
        out_state[f"{path}/{name}/lora_a"], out_state[f"{path}/{name}/lora_b"] = a, b
    draws.check_used()
    return out_sites, out_state


def _check_shapes(path: str, present: list) -> None:
    shapes = {(tuple(s.a.shape[:-1]), tuple(s.b.shape[1:])) for _, _, s in present}
    if len(shapes) != 1:
        raise errors.InvalidConfigError(f"the adapters' factors on {path!r} disagree in shape ({sorted(shapes)}); "
                                        "combine adapters of the same model")


def _cat(present: list, new_rank: int) -> tuple[jax.Array, jax.Array]:
    a = jnp.concatenate([s.a * jnp.asarray(w * s.lora.scale, s.a.dtype) for _, w, s in present], axis=-1)
    b = jnp.concatenate([s.b for _, _, s in present], axis=0)
    pad = new_rank - a.shape[-1]
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b, [(0, pad)] + [(0, 0)] * (b.ndim - 1))
    return a, b


def _factors(path, present, new_rank, rule, options, draws) -> tuple[jax.Array, jax.Array]:
    wrong = {n: s.lora.rank for n, _, s in present if s.lora.rank != new_rank}
    if wrong:
        raise errors.InvalidConfigError(
            f"on {path!r} the adapters {wrong} have another rank than {new_rank} (a rank pattern); "
            "use 'cat' or an SVD combination type")
    split = [rules.signed_sqrt_weights(w * s.lora.scale) for _, w, s in present]
    out = []
    for side, side_weights in (("lora_a", [a for a, _ in split]), ("lora_b", [b for _, b in split])):
        tensors = [s.a if side == "lora_a" else s.b for _, _, s in present]
        keys = [f"{path}/{n}/{side}" for n, _, _ in present]
        merged = rules.RULES[rule](tensors, side_weights, masks=draws.get(keys, tensors), **options)
        out.append(merged.astype(tensors[0].dtype))
    return out[0], out[1]


def _svd(path, present, new_rank, rule, options, draws, clamp) -> tuple[jax.Array, jax.Array]:
    deltas = [jnp.asarray(s.lora.scale, s.a.dtype) * (s.a2 @ s.b2) for _, _, s in present]
    keys = [f"{path}/{n}/delta" for n, _, _ in present]
    delta = rules.RULES[rule](deltas, [w for _, w, _ in present], masks=draws.get(keys, deltas), **options)
    a2, b2, _ = svd_factors(delta, new_rank, clamp)
    ref = present[0][2]
    dtype = ref.a.dtype
    return (a2.reshape(*ref.a.shape[:-1], new_rank).astype(dtype),
            b2.reshape(new_rank, *ref.b.shape[1:]).astype(dtype))


class _MaskSource:
    """DARE's masks by canonical key: given ones, or one draw per tensor from ``key``."""

    def __init__(self, key: jax.Array | None, masks: Mapping[str, jax.Array] | None, density: float | None):
        self.active = density is not None and density < 1.0
        if self.active and key is None and masks is None:
            raise errors.InvalidConfigError(
                "DARE combinations draw random masks: pass key=jax.random.key(...) or masks={...}")
        self.key, self.masks, self.density = key, masks, density
        self.count, self.used = 0, set()

    def get(self, keys: list[str], tensors: list[jax.Array]) -> list[jax.Array] | None:
        if not self.active:
            return None
        if self.masks is not None:
            missing = [k for k in keys if k not in self.masks]
            if missing:
                raise errors.InvalidConfigError(f"masks= lacks {missing[:3]}; give one mask per tensor "
                                                "(see peft_jax.arithmetic.weighted)")
            self.used.update(keys)
            return [jnp.asarray(self.masks[k]) for k in keys]
        drawn = [jax.random.bernoulli(jax.random.fold_in(self.key, self.count + i), self.density, t.shape)
                 for i, t in enumerate(tensors)]
        self.count += len(tensors)
        return drawn

    def check_used(self) -> None:
        if self.active and self.masks is not None:
            extra = sorted(set(self.masks) - self.used)
            if extra:
                raise errors.InvalidConfigError(f"masks= has entries no tensor uses: {extra[:3]}")
