"""PHM layers and Compacter / Compacter++ (Mahabadi et al., 2021, arXiv:2106.04647).

A parameterized hypercomplex multiplication (PHM) layer ``in -> out`` (``n = phm_dim`` divides
both) builds its weight as a sum of Kronecker products::

    H = sum_i A_i ⊗ B_i  in R^{in x out},    y = x H + b
    A_i = phm_rule[i]  (n x n),    B_i = W_left[i] @ W_right[i]  ((in/n) x r @ r x (out/n))

as AdapterHub's ``PHMLayer`` (``adapters/methods/modeling.py``). Compacter replaces a bottleneck
adapter's down and up projections with PHM layers (`Bottleneck` with ``phm=Phm()``); by default one
``phm_rule`` tensor ``(n, n, n)`` is shared by *every* PHM layer of the adapter (down and up, every
block, encoder and decoder), exactly as AdapterHub keeps it in ``shared_parameters[adapter]``. It
lives in the adapter's shared state: trainable (`Method.init_shared_params`) when ``learn_phm``,
frozen (`Method.init_shared`) otherwise. ``shared_W_phm`` also shares the ``B`` factors among all
down layers and among all up layers.

Initialization, as AdapterHub draws it:

* shared rule: ``N(0, phm_init_range)`` (``phm_c_init="normal"``) or ``U(-1, 1)`` ("uniform");
  a per-layer rule (``shared_phm_rule=False``): ``N(0, 0.01)`` or ``U(-0.01, 0.01)`` (AdapterHub
  ignores ``phm_init_range`` there).
* ``W_left[i]`` / ``W_right[i]`` (or ``W[i]``), each slice on its own, by
  ``hypercomplex_nonlinearity``: ``"glorot-uniform"`` (xavier uniform), ``"glorot-normal"`` and
  ``"phm"`` (xavier normal), ``"normal"`` (``N(0, phm_init_range)``). AdapterHub 1.x tests the
  string for truthiness, so it draws xavier normal for *every* value (same variance as xavier
  uniform); pass ``"glorot-normal"`` to reproduce its draws. The bias starts at zero.

AdapterHub's ``train_adapter`` sets ``requires_grad=True`` on every adapter and shared parameter,
so there ``learn_phm=False`` only holds outside ``train_adapter``; here it always holds (a shared
rule goes to the frozen state; a per-layer rule is wrapped in ``stop_gradient``: exclude it from
weight decay).

Example:
    >>> import jax, jax.numpy as jnp
    >>> rule = jnp.stack([jnp.eye(2), jnp.zeros((2, 2))])
    >>> w = jnp.stack([jnp.ones((3, 2)), jnp.ones((3, 2))])
    >>> phm_weight(rule, w).shape  # (2 * 3, 2 * 2)
    (6, 4)
    >>> compacter_pp().phm.phm_dim, compacter_pp().reduction_factor
    (4, 32)
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.lora import check_positive, check_positive_int

if TYPE_CHECKING:  # the presets build `Bottleneck`s, which import this module
    from peft_jax.methods.bottleneck import Bottleneck

Params = dict[str, Any]
WInit = Literal["glorot-uniform", "glorot-normal", "normal", "phm"]
CInit = Literal["normal", "uniform"]

__all__ = ["Phm", "compacter", "compacter_pp", "init_phm_rule", "init_phm_w", "kronecker",
           "phm_linear", "phm_weight"]

_W_INITS = ("glorot-uniform", "glorot-normal", "normal", "phm")
_C_INITS = ("normal", "uniform")
_BOOLS = ("shared_phm_rule", "factorized_phm_rule", "learn_phm", "factorized_phm_W", "shared_W_phm",
          "phm_bias")


# --- pure math ---------------------------------------------------------------------------------
def kronecker(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched Kronecker product: ``a (..., p, q)``, ``b (..., r, s)`` -> ``(..., p r, q s)``.

    Leading axes broadcast, as AdapterHub's ``kronecker_product``.

    Example:
        >>> import jax.numpy as jnp
        >>> kronecker(jnp.eye(2), jnp.ones((1, 2))).tolist()
        [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """
    p, q = a.shape[-2:]
    r, s = b.shape[-2:]
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], p * r, q * s)


def phm_weight(rule: jax.Array, w: jax.Array) -> jax.Array:
    """``H = sum_i rule[i] ⊗ w[i]``: ``rule (n, n, n)``, ``w (n, in/n, out/n)`` -> ``(in, out)``.

    Example:
        >>> import jax.numpy as jnp
        >>> rule = jnp.stack([jnp.eye(2), jnp.zeros((2, 2))])
        >>> phm_weight(rule, jnp.ones((2, 1, 1))).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    n, p, q = w.shape
    # kron(A, B)[a p + b, c q + e] = A[a, c] B[b, e]
    return jnp.einsum("iac,ibe->abce", rule, w).reshape(n * p, n * q)


def phm_linear(x: jax.Array, rule: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ phm_weight(rule, w) (+ bias)`` in ``x``'s dtype (the layer's forward pass).

    Example:
        >>> import jax.numpy as jnp
        >>> rule = jnp.stack([jnp.eye(2), jnp.zeros((2, 2))])
        >>> phm_linear(jnp.ones((3, 2)), rule, jnp.ones((2, 1, 1)), jnp.ones(2)).tolist()[0]
        [2.0, 2.0]
    """
    dtype = x.dtype
    y = x @ phm_weight(rule.astype(dtype), w.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


def _xavier(key, shape, dtype, uniform: bool) -> jax.Array:
    """torch's ``xavier_*_`` on each 2-D slice ``shape[1:]`` (fan_in = cols, fan_out = rows)."""
    rows, cols = shape[-2:]
    if uniform:
        bound = math.sqrt(6.0 / (rows + cols))
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return math.sqrt(2.0 / (rows + cols)) * jax.random.normal(key, shape, dtype)


# --- settings ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Phm:
    """How the down / up projections of a Compacter adapter become PHM layers (AdapterHub's
    ``phm_*`` options of ``BnConfig``, same names and defaults).

    Args:
        phm_dim: ``n``: the number of Kronecker terms; must divide the layer sizes.
        shared_phm_rule: one ``phm_rule`` for every PHM layer of the adapter (else one per layer).
        factorized_phm_rule: the rule as ``left (n, n, 1) @ right (n, 1, n)``.
        learn_phm: whether the rule trains.
        factorized_phm_W: ``B_i = W_left[i] @ W_right[i]`` of rank ``phm_rank`` (else a full ``W``).
        shared_W_phm: the ``B`` factors shared by all down layers and by all up layers.
        phm_rank: the rank ``r`` of the factorized ``B_i``.
        phm_c_init: ``"normal"`` or ``"uniform"`` init of the rule.
        phm_init_range: std of a shared rule's normal init (and of ``"normal"`` W init).
        hypercomplex_nonlinearity: init of ``W`` (see the module notes).
        phm_bias: a bias on each PHM layer.

    Example:
        >>> Phm().param_count(768, 24)  # r (in + out) + out
        816
    """

    phm_dim: int = 4
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    learn_phm: bool = True
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    phm_rank: int = 1
    phm_c_init: CInit = "normal"
    phm_init_range: float = 1e-4
    hypercomplex_nonlinearity: WInit = "glorot-uniform"
    phm_bias: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.phm_dim, "phm_dim")
        check_positive_int(self.phm_rank, "phm_rank")
        check_positive(self.phm_init_range, "phm_init_range")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise errors.InvalidConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.phm_c_init not in _C_INITS:
            raise errors.InvalidConfigError(f"phm_c_init must be one of {_C_INITS}, got {self.phm_c_init!r}")
        if self.hypercomplex_nonlinearity not in _W_INITS:
            raise errors.InvalidConfigError(
                f"hypercomplex_nonlinearity must be one of {_W_INITS}, got {self.hypercomplex_nonlinearity!r}")

    # -- sizes ----------------------------------------------------------------------------------
    def check_sizes(self, sizes: tuple[int, ...], where: str) -> None:
        """Raises `InvalidConfigError` unless ``phm_dim`` divides every size in ``sizes``.

        Example:
            >>> Phm(phm_dim=5).check_sizes((768, 24), "block 0")
            Traceback (most recent call last):
            ...
            peft_jax.errors.InvalidConfigError: phm_dim=5 must divide the PHM layer sizes 768 and 24 \
(block 0); try phm_dim=4 (common divisors: 1, 2, 3, 4, 6, 8, 12, 24)
        """
        n = self.phm_dim
        if all(s % n == 0 for s in sizes):
            return
        common = [k for k in range(1, min(sizes) + 1) if all(s % k == 0 for s in sizes)]
        best = min(common, key=lambda k: (abs(k - n), k))
        listed = " and ".join(str(s) for s in sizes)
        raise errors.InvalidConfigError(
            f"phm_dim={n} must divide the PHM layer sizes {listed} ({where}); try phm_dim={best} "
            f"(common divisors: {', '.join(map(str, common))})")

    def w_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one layer's ``B`` factors: ``w_left``/``w_right`` or ``w``.

        Example:
            >>> Phm().w_shapes(8, 4)
            {'w_left': (4, 2, 1), 'w_right': (4, 1, 1)}
        """
        n, r = self.phm_dim, self.phm_rank
        if self.factorized_phm_W:
            return {"w_left": (n, n_in // n, r), "w_right": (n, r, n_out // n)}
        return {"w": (n, n_in // n, n_out // n)}

    def rule_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of a rule: ``phm_rule`` or ``phm_rule_left``/``phm_rule_right``.

        Example:
            >>> Phm(factorized_phm_rule=True).rule_shapes()
            {'phm_rule_left': (4, 4, 1), 'phm_rule_right': (4, 1, 4)}
        """
        n = self.phm_dim
        if self.factorized_phm_rule:
            return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)}
        return {"phm_rule": (n, n, n)}

    def param_count(self, n_in: int, n_out: int) -> int:
        """Trainable params one PHM layer holds itself (shared ones not counted).

        Example:
            >>> Phm(shared_phm_rule=False).param_count(8, 4)  # 4 * (2 + 1) + 4 + 4**3
            80
        """
        total = 0 if self.shared_W_phm else sum(math.prod(s) for s in self.w_shapes(n_in, n_out).values())
        if not self.shared_phm_rule:
            total += sum(math.prod(s) for s in self.rule_shapes().values())
        return total + (n_out if self.phm_bias else 0)

    # -- init -----------------------------------------------------------------------------------
    def init_layer(self, key: jax.Array, n_in: int, n_out: int, dtype: Any, *, zero: bool = False) -> Params:
        """One PHM layer's own params (``w_*`` unless shared, ``bias``, a per-layer rule).

        ``zero=True`` zeros the last ``B`` factor (``w_right`` or ``w``), so the layer maps to 0
        (the identity init of an up projection).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> p = Phm().init_layer(jax.random.key(0), 8, 4, jnp.float32)
            >>> sorted(p), float(abs(p["bias"]).max())
            (['bias', 'w_left', 'w_right'], 0.0)
        """
        key_w, key_c = jax.random.split(key)
        params: Params = {}
        if not self.shared_W_phm:
            params.update(init_phm_w(key_w, self, n_in, n_out, dtype, zero=zero))
        if not self.shared_phm_rule:
            params.update(init_phm_rule(key_c, self, dtype, shared=False))
        if self.phm_bias:
            params["bias"] = jnp.zeros((n_out,), dtype)
        return params

    def init_shared(self, key: jax.Array, d: int, m: int, dtype: Any, *, zero_up: bool = False) -> Params:
        """An adapter's shared PHM state for features ``d`` and bottleneck ``m``: the rule (when
        ``shared_phm_rule``) and the ``B`` factors (when ``shared_W_phm``, names
        ``w_down_left`` ... ``w_up_right``).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> {k: v.shape for k, v in Phm().init_shared(jax.random.key(0), 8, 4, jnp.float32).items()}
            {'phm_rule': (4, 4, 4)}
        """
        key_c, key_d, key_u = jax.random.split(key, 3)
        out: Params = {}
        if self.shared_phm_rule:
            out.update(init_phm_rule(key_c, self, dtype, shared=True))
        if self.shared_W_phm:
            for pos, k, (i, o), zero in (("down", key_d, (d, m), False), ("up", key_u, (m, d), zero_up)):
                out.update({f"w_{pos}{name[1:]}": v
                            for name, v in init_phm_w(k, self, i, o, dtype, zero=zero).items()})
        return out

    # -- running --------------------------------------------------------------------------------
    def rule(self, params: Params, shared: Params) -> jax.Array:
        """The ``(n, n, n)`` rule a layer uses: the shared one or its own (frozen unless learn_phm).

        Example:
            >>> import jax.numpy as jnp
            >>> Phm().rule({}, {"phm_rule": jnp.ones((4, 4, 4))}).shape
            (4, 4, 4)
        """
        src = shared if self.shared_phm_rule else params
        if self.factorized_phm_rule:
            rule = src["phm_rule_left"] @ src["phm_rule_right"]
        else:
            rule = src["phm_rule"]
        return rule if self.shared_phm_rule or self.learn_phm else jax.lax.stop_gradient(rule)

    def weight(self, params: Params, shared: Params, position: str) -> jax.Array:
        """The ``(n, in/n, out/n)`` ``B`` factors of the ``position`` (``"down"``/``"up"``) layer.

        Example:
            >>> import jax.numpy as jnp
            >>> p = {"w_left": jnp.ones((4, 2, 1)), "w_right": jnp.ones((4, 1, 1))}
            >>> Phm().weight(p, {}, "down").shape
            (4, 2, 1)
        """
        if self.shared_W_phm:
            src, prefix = shared, f"w_{position}"
        else:
            src, prefix = params, "w"
        if self.factorized_phm_W:
            return src[f"{prefix}_left"] @ src[f"{prefix}_right"]
        return src[prefix]

    def apply_layer(self, params: Params, shared: Params, position: str, x: jax.Array) -> jax.Array:
        """The PHM layer's output ``x H + b`` for one layer's ``params`` and the adapter's ``shared``.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> phm = Phm(phm_dim=2)
            >>> shared = phm.init_shared(jax.random.key(0), 4, 2, jnp.float32)
            >>> p = phm.init_layer(jax.random.key(1), 4, 2, jnp.float32)
            >>> phm.apply_layer(p, shared, "down", jnp.ones((3, 4))).shape
            (3, 2)
        """
        dtype = x.dtype
        return phm_linear(x, self.rule(params, shared).astype(dtype),
                          self.weight(params, shared, position).astype(dtype), params.get("bias"))


def init_phm_rule(key: jax.Array, phm: Phm, dtype: Any, *, shared: bool) -> Params:
    """A rule as AdapterHub draws it (shared: ``N(0, phm_init_range)`` or ``U(-1, 1)``;
    per layer: ``N(0, 0.01)`` or ``U(-0.01, 0.01)``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> r = init_phm_rule(jax.random.key(0), Phm(phm_c_init="uniform"), jnp.float32, shared=False)
        >>> r["phm_rule"].shape, bool(abs(r["phm_rule"]).max() <= 0.01)
        ((4, 4, 4), True)
    """
    scale = phm.phm_init_range if shared else 0.01
    bound = 1.0 if shared else 0.01
    out = {}
    for k, (name, shape) in zip(jax.random.split(key, 2), phm.rule_shapes().items()):
        if phm.phm_c_init == "normal":
            out[name] = scale * jax.random.normal(k, shape, dtype)
        else:
            out[name] = jax.random.uniform(k, shape, dtype, -bound, bound)
    return out


def init_phm_w(key: jax.Array, phm: Phm, n_in: int, n_out: int, dtype: Any, *, zero: bool = False) -> Params:
    """One layer's ``B`` factors, each ``(rows, cols)`` slice drawn by ``hypercomplex_nonlinearity``
    (``zero=True`` zeros the last factor).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = init_phm_w(jax.random.key(0), Phm(), 8, 4, jnp.float32, zero=True)
        >>> w["w_left"].shape, float(abs(w["w_right"]).max())
        ((4, 2, 1), 0.0)
    """
    shapes = phm.w_shapes(n_in, n_out)
    out = {}
    for k, (name, shape) in zip(jax.random.split(key, len(shapes)), shapes.items()):
        if phm.hypercomplex_nonlinearity == "normal":
            out[name] = phm.phm_init_range * jax.random.normal(k, shape, dtype)
        else:
            out[name] = _xavier(k, shape, dtype, uniform=phm.hypercomplex_nonlinearity == "glorot-uniform")
    if zero:
        last = "w_right" if phm.factorized_phm_W else "w"
        out[last] = jnp.zeros_like(out[last])
    return out


# --- presets -----------------------------------------------------------------------------------
def compacter(**overrides: Any) -> "Bottleneck":
    """AdapterHub's ``CompacterConfig``: `double_seq_bn` with PHM layers, rf 32, gelu (after
    attention and after the FFN).

    Example:
        >>> c = compacter(phm=Phm(phm_dim=8))
        >>> c.non_linearity, c.reduction_factor, c.phm.phm_dim
        ('gelu', 32, 8)
    """
    from peft_jax.methods.bottleneck import double_seq_bn

    return double_seq_bn(**{"phm": Phm(), "reduction_factor": 32, "non_linearity": "gelu", **overrides})


def compacter_pp(**overrides: Any) -> "Bottleneck":
    """AdapterHub's ``CompacterPlusPlusConfig``: `seq_bn` with PHM layers, rf 32, gelu (after the
    FFN only).

    Example:
        >>> c = compacter_pp()
        >>> c.original_ln_before, c.phm.shared_phm_rule
        (True, True)
    """
    from peft_jax.methods.bottleneck import seq_bn

    return seq_bn(**{"phm": Phm(), "reduction_factor": 32, "non_linearity": "gelu", **overrides})
