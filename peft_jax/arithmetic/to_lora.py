"""Any mergeable weight adapter (DoRA, LoHa, LoKr, OFT, IA3, VeRA, ...) as a LoRA, by truncated SVD.

At each site the adapter's merged kernel ``W'`` (what `peft_jax.nnx.merge` would write, from
the methods' own ``merge``) gives the update ``D = W' - W`` as a ``(fan_in, fan_out)`` matrix,
and its best rank-``r`` factorisation (`peft_jax.arithmetic.svd`) becomes ``Lora(rank=r, alpha=r)``
(scale 1). A change of the layer's bias (IA3 on outputs, BEFT, ``lora_bias``) is kept exactly as
the new LoRA's ``lora_bias``. The report gives, per layer, the relative Frobenius error
``||D - A B|| / ||D||`` and the energy kept ``sum_{i<r} s_i^2 / sum_i s_i^2``; at
``r = min(fan_in, fan_out)`` the conversion is exact up to float rounding.

Methods that cannot merge (bottleneck adapters, prompts, gated LoRA, ...) raise
`NotMergeableError` naming themselves; so do methods that replace a module's params (LayerNorm
tuning, ``modules_to_save``), which no LoRA on a kernel expresses.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods import IA3
    >>> kernel = jax.random.normal(jax.random.key(0), (4, 3))
    >>> state = {"q/a/ia3_l": jnp.array([1.0, 2.0, 0.5])}
    >>> sites, new, report = to_lora({"q": IA3()}, state, 3, base={"q": {"kernel": kernel}})
    >>> sites["q"].rank, report.layers["q"].error < 1e-6
    (3, True)
    >>> delta = kernel * jnp.array([0.0, 1.0, -0.5])
    >>> bool(jnp.allclose(new["q/default/lora_a"] @ new["q/default/lora_b"], delta, atol=1e-6))
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.arithmetic.state import (
    Sites,
    State,
    adapter_name,
    method_params,
    shared_params,
    site_methods,
    site_params,
)
from peft_jax.arithmetic.svd import svd_factors
from peft_jax.methods.base import Context, LinearSite, is_mergeable
from peft_jax.methods.lora import Lora, check_positive_int
from peft_jax.ops import LinearOp, dense_op
from peft_jax.sites import merge_site

__all__ = ["ConversionReport", "LayerFit", "to_lora"]


@dataclasses.dataclass(frozen=True)
class LayerFit:
    """How well the LoRA of one layer approximates the adapter's update there."""

    rank: int
    full_rank: int
    error: float
    energy: float
    bias: bool

    @property
    def exact(self) -> bool:
        return self.rank >= self.full_rank


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Per-layer `LayerFit` of a `to_lora` conversion."""

    layers: dict[str, LayerFit]

    @property
    def max_error(self) -> float:
        return max((f.error for f in self.layers.values()), default=0.0)

    def __str__(self) -> str:
        width = max([len(p) for p in self.layers] + [5])
        rows = [f"{'layer':<{width}}  rank  full  rel. error  energy kept"]
        rows += [f"{p:<{width}}  {f.rank:>4}  {f.full_rank:>4}  {f.error:>10.3e}  {f.energy:>11.6f}"
                 for p, f in self.layers.items()]
        return "\n".join(rows)


def _check_methods(path: str, methods) -> None:
    for m in methods:
        kind = type(m).__name__
        if not is_mergeable(m):
            raise errors.NotMergeableError(
                f"{kind} on {path!r} cannot be merged into the kernel, so it has no LoRA form; convert "
                "an adapter without it (detach it, or attach it as a separate adapter)")
        if "linear" not in m.sites:
            raise errors.NotMergeableError(
                f"{kind} on {path!r} replaces a module's own params, which no LoRA on a kernel can "
                "express; leave that site out of the conversion")


def _op(path: str, kernel: jax.Array, ops: Mapping[str, LinearOp] | None) -> LinearOp:
    op = None if ops is None else ops.get(path)
    if op is None:
        if kernel.ndim != 2:
            raise errors.InvalidConfigError(
                f"the kernel of {path!r} has shape {tuple(kernel.shape)}; pass ops={{path: LinearOp}} for "
                "kernels that are not (in, out) matrices (or use convert_to_lora on the model)")
        op = dense_op(*kernel.shape)
    if getattr(op, "batched", False) or getattr(op, "groups", 1) > 1:
        raise errors.NotMergeableError(
            f"{path!r} is a stacked (expert) kernel or a grouped convolution, where a LoRA is not a "
            "kernel update; leave it out of the conversion")
    return op


def _rank_for(rank: int | Mapping[str, int], path: str) -> int:
    r = rank.get(path) if isinstance(rank, Mapping) else rank
    check_positive_int(r, f"rank for {path!r}")
    return r


@functools.partial(jax.jit, static_argnames=("path", "methods", "op"))
def _site_update(params, shared, base_p, *, path, methods, op) -> tuple[jax.Array, jax.Array | None]:
    """``(D (fan_in, fan_out), bias change or None)`` of one site."""
    site = LinearSite(path=path, op=op, layer="kernel", has_bias="bias" in base_p)
    per_method = method_params(methods, site, params)
    entries = [(m, p, shared, Context()) for m, p in zip(methods, per_method)]
    merged, _ = merge_site(entries, site, dict(base_p), keep_original=False)
    changed = [k for k in merged if k not in ("kernel", "bias")]
    if changed:
        raise errors.NotMergeableError(f"the adapter on {path!r} changes {changed}, which a LoRA cannot express")
    f32 = jnp.float32
    delta = op.kernel_to_matrix(merged["kernel"].astype(f32)) - op.kernel_to_matrix(base_p["kernel"].astype(f32))
    bias = merged["bias"].astype(f32) - base_p["bias"].astype(f32) if "bias" in base_p else None
    return delta, bias


@functools.partial(jax.jit, static_argnames=("rank",))
def _fit(delta: jax.Array, rank: int):
    """``(A, B, ||D||, ||D - A B||, kept energy, total energy)`` of the rank-``rank`` SVD fit."""
    a, b, s = svd_factors(delta, rank)
    energy = s * s
    return a, b, jnp.linalg.norm(delta), jnp.linalg.norm(delta - a @ b), jnp.sum(energy[:rank]), jnp.sum(energy)


def to_lora(sites: Sites, state: State, rank: int | Mapping[str, int], *,
            base: Mapping[str, Mapping[str, jax.Array]], ops: Mapping[str, LinearOp] | None = None,
            name: str = "default") -> tuple[dict[str, Lora], dict[str, jax.Array], ConversionReport]:
    """A LoRA adapter ``name`` approximating a mergeable adapter at ``rank``; see the module.

    Args:
        sites: ``{path: method or tuple of methods}`` of the adapter.
        state: its canonical flat state (one adapter).
        rank: the LoRA rank, or ``{path: rank}``; capped at each layer's ``min(fan_in, fan_out)``,
            so a large rank gives the exact conversion.
        base: ``{path: {"kernel": array[, "bias": array]}}``: the frozen arrays of each site.
        ops: ``{path: LinearOp}`` for kernels that are not ``(in, out)`` matrices (Conv,
            DenseGeneral, Einsum); a 2-D kernel defaults to a Dense layer's op.
        name: the new adapter's name (in the returned state's keys).

    Returns:
        ``(sites, state, report)``: ``{path: Lora(...)}``, its canonical state, a `ConversionReport`.
    """
    source = adapter_name(sites, state)
    shared = shared_params(state, source)
    work = []
    for path, value in sites.items():
        methods = site_methods(value, path)
        _check_methods(path, methods)
        if path not in base or "kernel" not in base[path]:
            raise errors.StateError(f"base= has no kernel for {path!r}; pass base={{path: {{'kernel': ...}}}}")
        work.append((path, methods, _op(path, jnp.asarray(base[path]["kernel"]), ops), _rank_for(rank, path)))
    new_sites, new_state, fits = {}, {}, {}
    for path, methods, op, r in work:
        base_p = {k: jnp.asarray(v) for k, v in base[path].items()}
        delta, bias = _site_update(site_params(state, path, source), shared, base_p, path=path,
                                   methods=methods, op=op)
        if bias is not None and not bool(jnp.any(bias != 0)):
            bias = None
        k = min(r, op.max_rank)
        a, b, norm, residual, kept, total = _fit(delta, k)
        norm, total = float(norm), float(total)
        error = float(residual) / norm if norm > 0 else 0.0
        energy = float(kept) / total if total > 0 else 1.0
        dtype = base_p["kernel"].dtype
        new_sites[path] = Lora(rank=k, alpha=float(k), lora_bias=bias is not None)
        new_state[f"{path}/{name}/lora_a"] = a.reshape(op.a_shape(k)).astype(dtype)
        new_state[f"{path}/{name}/lora_b"] = b.reshape(op.b_shape(k)).astype(dtype)
        if bias is not None:
            new_state[f"{path}/{name}/lora_bias"] = bias.reshape(op.out_shape).astype(dtype)
        fits[path] = LayerFit(rank=k, full_rank=op.max_rank, error=error, energy=energy, bias=bias is not None)
    return new_sites, new_state, ConversionReport(fits)

