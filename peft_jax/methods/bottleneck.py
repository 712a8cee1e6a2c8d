"""Bottleneck adapters as AdapterHub builds them (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer
et al., 2020, arXiv:2005.00247; He et al., 2021, arXiv:2110.04366).

An adapter is ``f(h) = gate(h) * dropout(s * up(act(down(LN_before?(h)))))`` with
``down: d -> m`` and ``up: m -> d`` (``m = int(d // reduction_factor)``, at least 1), a scaling
``s`` (a float, a learned scalar or a learned ``d``-vector) and an optional gate
``mean_seq(sigmoid(h W_g + b_g))``. It goes where a sub-layer's output ``y`` meets the residual
stream ``x`` and the model's post-sum norm ``LN`` (a `ResidualSite`; ``LN`` is ``None`` in pre-LN
models such as Llama or T5, and its terms below drop out) and follows AdapterHub's
``Adapter`` / ``ParallelAdapter`` ``pre_forward`` / ``forward`` / ``post_forward``:

* sequential, ``original_ln_before=False`` (`double_seq_bn`, Houlsby): ``LN(x + y + f(y))``.
* sequential, ``original_ln_before=True`` (`seq_bn`, Pfeiffer): with a norm,
  ``LN(x + y + f(LN(x + y)))`` (the residual around the adapter is ``y``, not ``x + y``, unless
  ``residual_before_ln="post_add"``; ``False`` makes it ``LN(x + y)``); with ``LN = None`` the
  adapter reads the *sum*: ``x + y + f(x + y)``.
* parallel (`par_bn`): the adapter reads the sub-layer *input*: ``LN(x + y + f(x))``.
* ``original_ln_after=False`` returns the adapter block's output without the final
  ``LN(. + x)`` (AdapterPlus).
* ``ln_after`` adds a new norm on the adapter output (before its residual, or after it with
  ``adapter_residual_before_ln``).

The final ``LN(h + x)`` is computed as ``call(Residual(h, x, LN))``, so methods folded around the
same site compose. On a `ModuleSite` (a user's own sub-layer, no residual or norm of the model):
``y = call(x)``, sequential ``y + f(y)``, parallel ``y + f(x)``.

Parameters (kernels in Flax ``(in, out)`` layout) and AdapterHub's state-dict names, relative to
``...adapters.<adapter>.`` (``T`` = transpose: torch stores ``(out, in)``; ``j = 1`` with
``ln_before``, else ``0``); `adapterhub_names` returns this for a given config:

* ``ln_before/{scale,bias}`` ``(d,)``: ``adapter_norm_before.{weight,bias}`` (also ``adapter_down.0.*``)
* ``down/kernel`` ``(d, m)``: ``adapter_down.{j}.weight`` T; ``down/bias`` ``(m,)``: ``adapter_down.{j}.bias``
* ``up/kernel`` ``(m, d)``: ``adapter_up.weight`` T; ``up/bias`` ``(d,)``: ``adapter_up.bias``
* ``scaling`` ``(1,)`` (learned) or ``(d,)`` (channel): ``scaling``
* ``ln_after/{scale,bias}`` ``(d,)``: ``adapter_norm_after.{weight,bias}``
* ``gate/kernel`` ``(d, 1)``: ``gate.weight`` T; ``gate/bias`` ``(1,)``: ``gate.bias``
* PHM (no transposes; ``n = phm_dim``, ``r = phm_rank``): ``down/w_left`` ``(n, d/n, r)``,
  ``down/w_right`` ``(n, r, m/n)`` (or ``down/w`` ``(n, d/n, m/n)``), ``down/bias`` ``(m,)``, a
  per-layer ``down/phm_rule`` ``(n, n, n)``: ``adapter_down.{j}.W_left``, ``.W_right``, ``.W``,
  ``.b``, ``.phm_rule``; the same for ``up/...`` (``m -> d``) and ``adapter_up.*``
* shared state: ``phm_rule`` (or ``phm_rule_left``/``_right``), ``w_down_left`` ... ``w_up_right``:
  ``shared_parameters.<adapter>.phm_rule``, ``.W_down_left`` ...

Init (``init_weights``), as AdapterHub: ``"bert"`` N(0, 0.02) kernels, zero biases (the adapter is
*not* zero at init); ``"mam_adapter"`` down ``U(-1/sqrt(d), 1/sqrt(d))`` (torch's
``kaiming_uniform_(a=sqrt(5))``), up 0; ``"houlsby"`` truncated N(0, 1e-2) on ``[-2e-2, 2e-2]``
(and the gate keeps torch's default ``nn.Linear`` init, ``U(-1/sqrt(d), 1/sqrt(d))`` for weight and
bias, since AdapterHub does not touch it there); ``"zero_up"`` (ours) is ``"bert"`` with the up
projection at 0, so ``f = 0`` at init and every preset starts as the base model. With PHM layers
``"bert"`` leaves them to their own init (`peft_jax.methods.phm`) and ``"zero_up"`` zeros the up
layer's last ``B`` factor; AdapterHub fails (``AttributeError``) on ``"mam_adapter"`` / ``"houlsby"``
with PHM, so they are refused here.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft_jax.methods import Context
    >>> from peft_jax.methods.sites import Residual, ResidualSite
    >>> site = ResidualSite(path="layers/0/ffn", layer="Block", features=8, role="ffn")
    >>> adapter = seq_bn(reduction_factor=4, init_weights="zero_up")
    >>> params, _ = adapter.init(jax.random.key(0), site, {}, {})
    >>> {k: v["kernel"].shape for k, v in params.items()}
    {'down': (8, 2), 'up': (2, 8)}
    >>> r = Residual(output=jnp.ones((1, 3, 8)), residual=jnp.ones((1, 3, 8)))
    >>> out = adapter.apply(params, {}, site, lambda r: r.combine(), r, {}, Context())
    >>> bool(jnp.array_equal(out, r.combine()))  # f = 0 at init
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.methods.base import Context, Method, Params, Site
from peft_jax.methods.lora import check_positive, check_positive_int, check_rate, input_dropout
from peft_jax.methods.phm import Phm, compacter, compacter_pp
from peft_jax.methods.sites import Residual

__all__ = ["ACTIVATIONS", "AhName", "Bottleneck", "DEPRECATED_ALIASES", "LOCATIONS", "PRESETS",
           "adapter_plus", "adapterhub_names", "double_seq_bn", "locations", "par_bn", "preset",
           "scaled_par_bn", "seq_bn"]

InitWeights = Literal["bert", "mam_adapter", "houlsby", "zero_up"]
_INITS = ("bert", "mam_adapter", "houlsby", "zero_up")
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_PI * (x + 0.044715 * x ** 3)))


#: The activations by their transformers ``ACT2FN`` names (AdapterHub lower-cases the name;
#: ``"leakyrelu"`` is its own alias of ``leaky_relu`` with slope 0.01).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_bool(v: Any, where: str) -> None:
    if not isinstance(v, bool):
        raise errors.InvalidConfigError(f"{where} must be True or False, got {v!r}")


def block_index(site: Site) -> int | None:
    """The transformer block a site belongs to: ``ResidualSite.index``, or the first integer
    component of a module site's path (``None`` if it has none).

    Example:
        >>> from peft_jax.methods.base import ModuleSite
        >>> block_index(ModuleSite(path="encoder/layers/3/mlp", layer="Mlp", param_shapes={}))
        3
    """
    if site.kind == "residual":
        return site.index
    for part in re.split(r"[/.]", site.path):
        if part.isdigit():
            return int(part)
    return None


def layer_norm(x: jax.Array, p: Params, eps: float = 1e-5) -> jax.Array:
    """torch's ``nn.LayerNorm`` over the last axis (biased variance, ``eps=1e-5``) with
    ``p = {"scale", "bias"}``, computed in float32 and returned in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> layer_norm(jnp.array([1.0, 3.0]), {"scale": jnp.ones(2), "bias": jnp.zeros(2)}).round(3).tolist()
        [-1.0, 1.0]
    """
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _dtype(base: Params) -> Any:
    for leaf in jax.tree.leaves(base):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32


def _linear(p: Params, x: jax.Array) -> jax.Array:
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def _stochastic_depth(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """torchvision's ``StochasticDepth(p, mode="row")``: drop whole examples, rescale the rest."""
    if key is None or rate == 0.0:
        return x
    survival = 1.0 - rate
    keep = jax.random.bernoulli(key, survival, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(survival, x.dtype), jnp.zeros_like(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bottleneck(Method):
    """A bottleneck adapter (AdapterHub's ``BnConfig``; same option names and meanings).

    Args:
        reduction_factor: ``m = int(d // reduction_factor)`` (at least 1; < 1 widens). A mapping
            such as ``{"1": 8, "default": 16}`` gives it per block (block index as a string;
            stored as sorted ``(key, value)`` pairs so the config stays hashable).
        bottleneck_size: ``m`` itself (overrides ``reduction_factor``).
        non_linearity: an `ACTIVATIONS` name (``"relu"``, ``"swish"``, ``"gelu"``, ``"gelu_new"``, ...).
        original_ln_before: add the residual and apply the model's norm before the adapter.
        original_ln_after: add the residual and apply the model's norm after the adapter.
        residual_before_ln: the adapter's residual: ``True`` the sub-layer output ``y``, ``False``
            the adapter's input, ``"post_add"`` ``x + y`` (needs ``original_ln_before``).
        adapter_residual_before_ln: add that residual before ``ln_after`` (sequential only).
        ln_before: a new LayerNorm on the adapter input (inside ``adapter_down``).
        ln_after: a new LayerNorm on the adapter output.
        is_parallel: read the sub-layer input and add in parallel (He et al.).
        scaling: a number, ``"learned"`` (a scalar, init 1) or ``"channel"`` (a ``d``-vector, init 1).
        use_gating: a gate ``mean_seq(sigmoid(Linear(d -> 1)(h)))`` on the adapter output.
        init_weights: ``"bert"``, ``"mam_adapter"``, ``"houlsby"`` or ``"zero_up"`` (module notes).
        init_weights_seed: draw every site's init from this seed (so all sites start equal).
        dropout: dropout on the scaled adapter output while training.
        stochastic_depth: per-example drop of the sequential adapter's up projection (AdapterPlus).
        phm: `Phm` settings to make down / up PHM layers (Compacter), or ``None``.
        features: the output width ``d`` of a module site that is not a linear layer.

    Example:
        >>> from peft_jax.methods.sites import ResidualSite
        >>> site = ResidualSite(path="layers/1/attn", layer="Block", features=16, role="attention", index=1)
        >>> adapter = Bottleneck(reduction_factor={"1": 8, "default": 4})
        >>> adapter.size_at(site), {k: v for k, v in adapter.param_shapes(site)["down"].items()}
        (2, {'bias': (2,), 'kernel': (16, 2)})
    """

    name: ClassVar[str] = "bottleneck"
    sites: ClassVar[tuple[str, ...]] = ("residual", "module")
    reduction_factor: float | Mapping[str, float] | tuple[tuple[str, float], ...] = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | Literal["post_add"] = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    is_parallel: bool = False
    scaling: float | Literal["learned", "channel"] = 1.0
    use_gating: bool = False
    init_weights: InitWeights = "bert"
    init_weights_seed: int | None = None
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    phm: Phm | None = None
    features: int | None = None

    def __post_init__(self) -> None:
        rf = self.reduction_factor
        if isinstance(rf, Mapping) or (isinstance(rf, tuple) and all(isinstance(e, tuple) for e in rf)):
            items = dict(rf)
            pairs = []
            for k, v in items.items():
                key = str(k)
                if not (key == "default" or key.isdigit()):
                    raise errors.InvalidConfigError(
                        f"reduction_factor keys are block indices ('0', '1', ...) or 'default', got {k!r}")
                check_positive(v, f"reduction_factor[{key!r}]")
                pairs.append((key, v))
            if not pairs:
                raise errors.InvalidConfigError("reduction_factor mapping is empty; give e.g. {'default': 16}")
            object.__setattr__(self, "reduction_factor", tuple(sorted(pairs)))
        else:
            check_positive(rf, "reduction_factor")
        if self.bottleneck_size is not None:
            check_positive_int(self.bottleneck_size, "bottleneck_size")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in ACTIVATIONS:
            raise errors.InvalidConfigError(
                f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        for name in ("original_ln_before", "original_ln_after", "adapter_residual_before_ln", "ln_before",
                     "ln_after", "is_parallel", "use_gating"):
            _check_bool(getattr(self, name), name)
        if self.residual_before_ln not in (True, False, "post_add") or not isinstance(
                self.residual_before_ln, (bool, str)):
            raise errors.InvalidConfigError(
                f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}")
        if self.residual_before_ln == "post_add" and not self.original_ln_before and not self.is_parallel:
            raise errors.InvalidConfigError(
                "residual_before_ln='post_add' takes the residual after the model's own residual add, which "
                "only happens with original_ln_before=True; set original_ln_before=True or residual_before_ln=True")
        if _is_number(self.scaling):
            if not math.isfinite(self.scaling):
                raise errors.InvalidConfigError(f"scaling must be finite, got {self.scaling!r}")
            object.__setattr__(self, "scaling", float(self.scaling))
        elif self.scaling not in ("learned", "channel"):
            raise errors.InvalidConfigError(
                f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
        if self.init_weights not in _INITS:
            raise errors.InvalidConfigError(f"init_weights must be one of {_INITS}, got {self.init_weights!r}")
        if self.init_weights_seed is not None and (isinstance(self.init_weights_seed, bool)
                                                   or not isinstance(self.init_weights_seed, int)):
            raise errors.InvalidConfigError(
                f"init_weights_seed must be an integer or None, got {self.init_weights_seed!r}")
        check_rate(self.dropout, "dropout")
        check_rate(self.stochastic_depth, "stochastic_depth")
        if self.phm is not None:
            if not isinstance(self.phm, Phm):
                raise errors.InvalidConfigError(f"phm must be a peft_jax Phm(...) value or None, got {self.phm!r}")
            if self.init_weights in ("mam_adapter", "houlsby"):
                raise errors.InvalidConfigError(
                    f"init_weights={self.init_weights!r} does not apply to PHM layers (AdapterHub fails on it); "
                    "use 'bert' (the PHM layers' own init) or 'zero_up' (the up layer starts at 0)")
        if self.features is not None:
            check_positive_int(self.features, "features")

    @property
    def needs_rng(self) -> bool:
        return self.dropout > 0 or self.stochastic_depth > 0

    # -- sizes ------------------------------------------------------------------------------------
    def features_at(self, site: Site) -> int:
        """``d``: a residual site's ``features``; a linear module's last output axis; else ``features=``.

        Example:
            >>> from peft_jax.methods.base import ModuleSite
            >>> Bottleneck(features=6).features_at(ModuleSite(path="mlp", layer="Mlp", param_shapes={}))
            6
        """
        if site.kind == "residual":
            d = site.features
        elif getattr(site, "op", None) is not None:
            d = site.op.out_shape[-1]
        elif self.features is not None:
            return self.features
        else:
            raise errors.InvalidConfigError(
                f"Bottleneck on {site.path!r} ({site.layer}) cannot tell the width of the module's output; "
                "pass features=<d> (the size of its last output axis)")
        if self.features is not None and self.features != d:
            raise errors.InvalidConfigError(
                f"Bottleneck features={self.features} disagrees with {site.path!r} ({site.layer}), whose "
                f"output has {d} features; drop features= or fix it")
        return d

    def reduction_factor_at(self, site: Site) -> float:
        """The reduction factor of ``site``'s block (a per-block mapping, else the number).

        Example:
            >>> from peft_jax.methods.sites import ResidualSite
            >>> site = ResidualSite(path="b", layer="Block", features=8, role="ffn", index=2)
            >>> Bottleneck(reduction_factor={"2": 8, "default": 2}).reduction_factor_at(site)
            8
        """
        rf = self.reduction_factor
        if not isinstance(rf, tuple):
            return rf
        table = dict(rf)
        index = block_index(site)
        if index is not None and str(index) in table:
            return table[str(index)]
        if "default" in table:
            return table["default"]
        raise errors.InvalidConfigError(
            f"reduction_factor {table} has no entry for block {index} ({site.path!r}) and no 'default'; "
            "add one, e.g. {'default': 16}")

    def size_at(self, site: Site) -> int:
        """``m``: ``bottleneck_size``, else ``max(1, int(d // reduction_factor))`` as AdapterHub.

        Example:
            >>> from peft_jax.methods.sites import ResidualSite
            >>> Bottleneck(reduction_factor=32).size_at(ResidualSite(path="b", layer="B", features=768, role="ffn"))
            24
        """
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(self.features_at(site) // self.reduction_factor_at(site)))

    def check(self, site: Site) -> None:
        super().check(site)
        d, m = self.features_at(site), self.size_at(site)
        if site.kind == "module" and self.is_parallel and site.op is not None and tuple(site.op.in_shape) != (d,):
            raise errors.InvalidConfigError(
                f"a parallel Bottleneck on {site.path!r} ({site.layer}) reads the module's input, which has "
                f"features {tuple(site.op.in_shape)}, but adds to its output of {d}; use is_parallel=False there")
        if self.phm is not None:
            self.phm.check_sizes((d, m), f"Compacter on {site.path!r}: down {d} -> {m}, up {m} -> {d}")

    # -- state ------------------------------------------------------------------------------------
    def _phm_shared(self, key, sites: list, dtype) -> Params:
        if self.phm is None:
            return {}
        sizes = {(self.features_at(s), self.size_at(s)) for s in sites}
        if self.phm.shared_W_phm and len(sizes) != 1:
            raise errors.InvalidConfigError(
                f"shared_W_phm shares the PHM factors of every layer, which needs one (d, m) for all sites; got "
                f"{sorted(sizes) or 'no sites'}; use one reduction factor or shared_W_phm=False")
        d, m = next(iter(sizes)) if sizes else (0, 0)
        for s in sites:
            self.phm.check_sizes(self.size_pair(s), f"Compacter on {s.path!r}")
        return self.phm.init_shared(key, d, m, dtype, zero_up=self.init_weights == "zero_up")

    def size_pair(self, site: Site) -> tuple[int, int]:
        """``(d, m)`` of ``site``.

        Example:
            >>> from peft_jax.methods.sites import ResidualSite
            >>> Bottleneck().size_pair(ResidualSite(path="b", layer="B", features=64, role="ffn"))
            (64, 4)
        """
        return self.features_at(site), self.size_at(site)

    def _rule_names(self) -> tuple[str, ...]:
        return tuple(self.phm.rule_shapes()) if self.phm is not None and self.phm.shared_phm_rule else ()

    def init_shared(self, key, sites: list, dtype: Any) -> Params:
        """The frozen shared PHM rule (Compacter with ``learn_phm=False``)."""
        if self.phm is None or self.phm.learn_phm:
            return {}
        full = self._phm_shared(key, sites, dtype)
        return {k: v for k, v in full.items() if k in self._rule_names()}

    def init_shared_params(self, key, sites: list, dtype: Any) -> Params:
        """The trainable shared PHM state: the rule (``learn_phm``) and shared ``B`` factors."""
        if self.phm is None:
            return {}
        full = self._phm_shared(key, sites, dtype)
        frozen = () if self.phm.learn_phm else self._rule_names()
        return {k: v for k, v in full.items() if k not in frozen}

    def init(self, key, site: Site, base: Params, shared: Params) -> tuple[Params, Params]:
        d, m = self.size_pair(site)
        dtype = _dtype(base)
        if self.init_weights_seed is not None:
            key = jax.random.key(self.init_weights_seed)
        k_down, k_up, k_gate = jax.random.split(key, 3)
        init = self.init_weights
        params: Params = {}
        if self.ln_before:
            params["ln_before"] = {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}
        if self.phm is not None:
            params["down"] = self.phm.init_layer(k_down, d, m, dtype)
            params["up"] = self.phm.init_layer(k_up, m, d, dtype, zero=init == "zero_up")
        else:
            params["down"] = _init_linear(k_down, d, m, dtype, init, "down")
            params["up"] = _init_linear(k_up, m, d, dtype, init, "up")
        if self.scaling == "learned":
            params["scaling"] = jnp.ones((1,), dtype)
        elif self.scaling == "channel":
            params["scaling"] = jnp.ones((d,), dtype)
        if self.ln_after:
            params["ln_after"] = {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}
        if self.use_gating:
            params["gate"] = _init_linear(k_gate, d, 1, dtype, init, "gate")
        return params, {}

    # -- running ----------------------------------------------------------------------------------
    def _project(self, p: Params, shared: Params, position: str, x: jax.Array) -> jax.Array:
        if self.phm is not None:
            return self.phm.apply_layer(p, shared, position, x)
        return _linear(p, x)

    def _bottleneck(self, params: Params, shared: Params, h: jax.Array, ctx: Context,
                    drop_path: bool) -> jax.Array:
        """``gate(h) * dropout(s * up(act(down(LN_before?(h)))))`` (AdapterHub's ``forward`` core)."""
        z = layer_norm(h, params["ln_before"]) if self.ln_before else h
        z = ACTIVATIONS[self.non_linearity.lower()](self._project(params["down"], shared, "down", z))
        up = self._project(params["up"], shared, "up", z)
        if drop_path:
            up = _stochastic_depth(up, self.stochastic_depth, ctx.fold(1).key)
        up = up * (params["scaling"].astype(up.dtype) if "scaling" in params else self.scaling)
        out = input_dropout(up, self.dropout, ctx.key)
        if self.use_gating:
            gate = jax.nn.sigmoid(_linear(params["gate"], h))
            if gate.ndim >= 3:  # [batch, seq, ..., 1]: the mean over the sequence (padding included)
                gate = gate.mean(axis=1, keepdims=True)
            ctx.report("bottleneck_gate", gate)
            out = out * gate
        return out

    def sequential(self, params: Params, shared: Params, h: jax.Array, residual: jax.Array,
                   ctx: Context = Context()) -> jax.Array:
        """AdapterHub's ``Adapter.forward``: ``f(h)`` plus ``residual``, with ``ln_after`` before or
        after that residual (``adapter_residual_before_ln``).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from peft_jax.methods.sites import ResidualSite
            >>> site = ResidualSite(path="b", layer="B", features=4, role="ffn")
            >>> a = Bottleneck(reduction_factor=2, init_weights="zero_up")
            >>> p, _ = a.init(jax.random.key(0), site, {}, {})
            >>> a.sequential(p, {}, jnp.ones(4), jnp.zeros(4)).tolist()
            [0.0, 0.0, 0.0, 0.0]
        """
        out = self._bottleneck(params, shared, h, ctx, drop_path=True)
        if self.adapter_residual_before_ln:
            out = out + residual
        if self.ln_after:
            out = layer_norm(out, params["ln_after"])
        if not self.adapter_residual_before_ln:
            out = out + residual
        return out

    def parallel(self, params: Params, shared: Params, h: jax.Array, ctx: Context = Context()) -> jax.Array:
        """AdapterHub's ``ParallelAdapter.forward``: ``f(h)`` (then ``ln_after``), no residual.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from peft_jax.methods.sites import ResidualSite
            >>> site = ResidualSite(path="b", layer="B", features=4, role="ffn")
            >>> a = par_bn()
            >>> p, _ = a.init(jax.random.key(0), site, {}, {})
            >>> a.parallel(p, {}, jnp.ones(4)).tolist()  # mam_adapter: up starts at 0
            [0.0, 0.0, 0.0, 0.0]
        """
        out = self._bottleneck(params, shared, h, ctx, drop_path=False)
        return layer_norm(out, params["ln_after"]) if self.ln_after else out

    def apply(self, params, shared, site: Site, call, x, base, ctx: Context):
        if site.kind != "residual":
            y = call(x)
            if self.is_parallel:
                return y + self.parallel(params, shared, x, ctx).astype(y.dtype)
            return self.sequential(params, shared, y, y, ctx)
        r: Residual = x
        y, inp, norm = r.output, r.residual, r.norm
        if self.is_parallel:  # pre_forward hands the sub-layer input to the adapter
            out = self.parallel(params, shared, inp, ctx) + y
        else:
            h = residual = y
            if self.original_ln_before:
                h = y + inp
                if self.residual_before_ln == "post_add":
                    residual = h
                if norm is not None:
                    h = norm(h)
            if self.residual_before_ln is False:
                residual = h
            out = self.sequential(params, shared, h, residual, ctx)
        # post_forward: the model's own ``LN(out + x)``, through the methods folded inside this one
        return call(r._replace(output=out)) if self.original_ln_after else out


def _init_linear(key, n_in: int, n_out: int, dtype, init: str, which: str) -> Params:
    """A linear layer's ``{"kernel": (in, out), "bias": (out,)}`` under AdapterHub's schemes."""
    k_w, k_b = jax.random.split(key)
    zeros = jnp.zeros((n_out,), dtype)
    if which == "gate" and init == "houlsby":  # untouched by AdapterHub: torch's nn.Linear default
        bound = 1.0 / math.sqrt(n_in)
        return {"kernel": jax.random.uniform(k_w, (n_in, n_out), dtype, -bound, bound),
                "bias": jax.random.uniform(k_b, (n_out,), dtype, -bound, bound)}
    if which == "up" and init in ("mam_adapter", "zero_up"):
        return {"kernel": jnp.zeros((n_in, n_out), dtype), "bias": zeros}
    if which == "down" and init == "mam_adapter":
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform_(a=sqrt(5)) on torch's (out, in) weight
        return {"kernel": jax.random.uniform(k_w, (n_in, n_out), dtype, -bound, bound), "bias": zeros}
    if init == "houlsby":
        return {"kernel": 1e-2 * jax.random.truncated_normal(k_w, -2.0, 2.0, (n_in, n_out), dtype), "bias": zeros}
    return {"kernel": 0.02 * jax.random.normal(k_w, (n_in, n_out), dtype), "bias": zeros}


# --- AdapterHub names ------------------------------------------------------------------------------
class AhName(NamedTuple):
    """Where one of our params lives in an AdapterHub state dict.

    Attributes:
        key: the name after ``...adapters.<adapter>.`` (or after ``shared_parameters.<adapter>.``
            when ``shared``).
        transpose: torch stores this kernel as ``(out, in)``; ours is ``(in, out)``.
        shared: the param is in the adapter's shared state, not in one site's params.
    """

    key: str
    transpose: bool = False
    shared: bool = False


def adapterhub_names(method: Bottleneck) -> dict[str, AhName]:
    """Our ``"/"``-joined param names (``"shared/<name>"`` for shared state) -> AdapterHub's.

    Example:
        >>> names = adapterhub_names(seq_bn(ln_before=True))
        >>> names["down/kernel"], names["up/bias"].key
        (AhName(key='adapter_down.1.weight', transpose=True, shared=False), 'adapter_up.bias')
        >>> adapterhub_names(compacter_pp())["shared/phm_rule"].key
        'phm_rule'
    """
    names: dict[str, AhName] = {}
    j = 1 if method.ln_before else 0
    if method.ln_before:
        names["ln_before/scale"] = AhName("adapter_norm_before.weight")
        names["ln_before/bias"] = AhName("adapter_norm_before.bias")
    phm = method.phm
    for pos, prefix in (("down", f"adapter_down.{j}"), ("up", "adapter_up")):
        if phm is None:
            names[f"{pos}/kernel"] = AhName(f"{prefix}.weight", transpose=True)
            names[f"{pos}/bias"] = AhName(f"{prefix}.bias")
            continue
        if not phm.shared_W_phm:
            for ours in phm.w_shapes(phm.phm_dim, phm.phm_dim):
                names[f"{pos}/{ours}"] = AhName(f"{prefix}.W{ours[1:]}")
        if not phm.shared_phm_rule:
            for ours in phm.rule_shapes():
                names[f"{pos}/{ours}"] = AhName(f"{prefix}.{ours}")
        if phm.phm_bias:
            names[f"{pos}/bias"] = AhName(f"{prefix}.b")
    if method.scaling in ("learned", "channel"):
        names["scaling"] = AhName("scaling")
    if method.ln_after:
        names["ln_after/scale"] = AhName("adapter_norm_after.weight")
        names["ln_after/bias"] = AhName("adapter_norm_after.bias")
    if method.use_gating:
        names["gate/kernel"] = AhName("gate.weight", transpose=True)
        names["gate/bias"] = AhName("gate.bias")
    if phm is not None:
        if phm.shared_phm_rule:
            for ours in phm.rule_shapes():
                names[f"shared/{ours}"] = AhName(ours, shared=True)
        if phm.shared_W_phm:
            for pos in ("down", "up"):
                for ours in phm.w_shapes(phm.phm_dim, phm.phm_dim):
                    names[f"shared/w_{pos}{ours[1:]}"] = AhName(f"W_{pos}{ours[1:]}", shared=True)
    return names


# --- presets ---------------------------------------------------------------------------------------
def seq_bn(**overrides: Any) -> Bottleneck:
    """AdapterHub's ``SeqBnConfig`` (Pfeiffer): after the FFN, ``LN(x + y + f(LN(x + y)))``,
    relu, rf 16.

    Example:
        >>> seq_bn().original_ln_before, seq_bn(reduction_factor=8).reduction_factor
        (True, 8)
    """
    return Bottleneck(**{"original_ln_before": True, "original_ln_after": True, "residual_before_ln": True,
                         "non_linearity": "relu", "reduction_factor": 16, **overrides})


def double_seq_bn(**overrides: Any) -> Bottleneck:
    """AdapterHub's ``DoubleSeqBnConfig`` (Houlsby): after attention and after the FFN,
    ``LN(x + y + f(y))``, swish, rf 16.

    Example:
        >>> double_seq_bn().non_linearity, locations("double_seq_bn")
        ('swish', ('attention', 'ffn'))
    """
    return Bottleneck(**{"original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
                         "non_linearity": "swish", "reduction_factor": 16, **overrides})


def par_bn(**overrides: Any) -> Bottleneck:
    """AdapterHub's ``ParBnConfig`` (He et al.): after the FFN, ``LN(x + y + 4 f(x))``, relu, rf 2,
    ``"mam_adapter"`` init.

    Example:
        >>> par_bn().is_parallel, par_bn().scaling, par_bn().init_weights
        (True, 4.0, 'mam_adapter')
    """
    return Bottleneck(**{"is_parallel": True, "original_ln_before": False, "original_ln_after": True,
                         "non_linearity": "relu", "reduction_factor": 2, "init_weights": "mam_adapter",
                         "scaling": 4.0, **overrides})


def scaled_par_bn(**overrides: Any) -> Bottleneck:
    """AdapterHub's ``scaled_par_bn``: `par_bn` with a learned scalar scaling (init 1).

    Example:
        >>> scaled_par_bn().scaling
        'learned'
    """
    return par_bn(**{"scaling": "learned", **overrides})


def adapter_plus(**overrides: Any) -> Bottleneck:
    """AdapterHub's ``AdapterPlusConfig`` (ViT): after the FFN, ``LN?(x + y)`` into the adapter and
    its own residual, no norm after; rf 96, gelu, ``"houlsby"`` init, channel scaling,
    stochastic depth 0.1.

    Example:
        >>> adapter_plus().scaling, adapter_plus().original_ln_after
        ('channel', False)
    """
    return Bottleneck(**{"original_ln_before": True, "original_ln_after": False, "residual_before_ln": False,
                         "stochastic_depth": 0.1, "init_weights": "houlsby", "scaling": "channel",
                         "non_linearity": "gelu", "reduction_factor": 96, **overrides})


#: AdapterHub's config names -> the functions that build them (`preset` resolves aliases too).
PRESETS: dict[str, Callable[..., Bottleneck]] = {
    "seq_bn": seq_bn, "double_seq_bn": double_seq_bn, "par_bn": par_bn, "scaled_par_bn": scaled_par_bn,
    "adapter_plus": adapter_plus, "compacter": compacter, "compacter++": compacter_pp,
}

#: AdapterHub's deprecated names (``ADAPTER_CONFIG_MAP``) -> the current ones.
DEPRECATED_ALIASES: dict[str, str] = {
    "pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "scaled_parallel": "scaled_par_bn",
}

#: Where each preset puts adapters: ``"attention"`` (AdapterHub's ``mh_adapter``, after the
#: attention sub-layer) and / or ``"ffn"`` (``output_adapter``, after the feed-forward one).
#: No preset uses ``cross_adapter`` (after a decoder's cross-attention).
LOCATIONS: dict[str, tuple[str, ...]] = {
    "seq_bn": ("ffn",), "double_seq_bn": ("attention", "ffn"), "par_bn": ("ffn",), "scaled_par_bn": ("ffn",),
    "adapter_plus": ("ffn",), "compacter": ("attention", "ffn"), "compacter++": ("ffn",),
}


def _resolve(name: str) -> str:
    key = DEPRECATED_ALIASES.get(name, name)
    if key not in PRESETS:
        raise errors.UnknownNameError(
            f"unknown bottleneck preset {name!r}; known: {sorted(PRESETS) + sorted(DEPRECATED_ALIASES)}")
    return key


def preset(name: str, **overrides: Any) -> Bottleneck:
    """The `Bottleneck` of an AdapterHub config name (current or deprecated), with ``overrides``.

    Example:
        >>> preset("pfeiffer") == seq_bn(), preset("compacter++").phm is not None
        (True, True)
    """
    return PRESETS[_resolve(name)](**overrides)


def locations(name: str) -> tuple[str, ...]:
    """The roles (``"attention"``, ``"ffn"``) a preset's adapters go after, in block order.

    Example:
        >>> locations("houlsby"), locations("par_bn")
        (('attention', 'ffn'), ('ffn',))
    """
    return LOCATIONS[_resolve(name)]
