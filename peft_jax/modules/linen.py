"""PEFT methods as Linen modules a user puts into their own model definition.

Their variables go where `peft_jax.linen.attach` puts those of the same method on an
equivalent model (a plain ``nn.Dense`` / a `peft_jax.hooks.linen.ResidualTap` at the same path):

* base params in ``"params"`` at ``<path>/kernel`` and ``<path>/bias``;
* adapter params in ``"adapters"`` at ``<path>/<adapter>/<param>``;
* an adapter's shared state (Compacter's PHM rule), one bank per adapter name for the whole
  model, trainable in ``"adapter_shared_params"`` / frozen in ``"adapter_shared"`` at
  ``<adapter>/<param>``.

So ``variables`` of a model built from these modules and of the equivalent model with the method
attached are interchangeable. Each module computes through `peft_jax.sites.run_site` with the
method's own math. `handle` gives a `peft_jax.linen.Peft` handle over them (``adapter_state``,
``partition``, ``summary``, ``merge`` / ``unmerge`` / ``unload``). Without an ``"adapters"``
collection in ``variables`` (after ``unload``, or ``{"params": ...}`` alone) each module is its
plain base layer. Dropout inside a method is on when the call has a ``"dropout"`` rng.

* `LoraDense`: a drop-in ``nn.Dense`` with LoRA (or DoRA).
* `BottleneckAdapter`: a bottleneck adapter where a sub-layer's output meets the residual
  stream, ``adapter(Residual(y, x, norm))``, or on a plain hidden state, ``adapter(h) = h + f(h)``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> class Mlp(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(4, name="down")(nn.relu(LoraDense(8, rank=2, name="up")(x)))
    >>> variables = Mlp().init(jax.random.key(0), jnp.ones((1, 4)))
    >>> sorted(variables), sorted(variables["adapters"]["up"]["default"])
    (['adapters', 'params'], ['lora_a', 'lora_b'])
    >>> peft = handle(Mlp(), variables, jnp.ones((1, 4)))
    >>> sorted(peft.adapter_state(variables)), peft.summary(variables).trainable
    (['up/default/lora_a', 'up/default/lora_b'], 24)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from peft_jax import errors
from peft_jax.linen import COLLECTION, RECORD, SHARED, SHARED_PARAMS, Peft
from peft_jax.methods.base import Context, LinearSite, Method, ModuleSite, Site
from peft_jax.methods.bottleneck import Bottleneck
from peft_jax.methods.config import Placement, compose
from peft_jax.methods.initializers import KaimingUniform
from peft_jax.methods.sites import Residual, ResidualSite
from peft_jax.modules import lora_method, module_form
from peft_jax.ops import dense_op
from peft_jax.sites import plan_adapter, run_site

__all__ = ["BottleneckAdapter", "LoraDense", "ModulePeft", "handle"]

_DENSE_FIELDS = tuple(f.name for f in dataclasses.fields(nn.Dense) if f.name not in ("parent", "name"))


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _root_shared(module: nn.Module, name: str, method: Method, site: Site, create: bool) -> dict:
    """Adapter ``name``'s shared state, kept at the root of the variables (one bank per adapter,
    as `peft_jax.linen.attach` keeps it); with ``create`` the parts ``method`` needs are added."""
    root = module.scope.root
    out: dict = {}
    for collection, make in ((SHARED, method.init_shared), (SHARED_PARAMS, method.init_shared_params)):
        have = dict(root.get_variable(collection, name)) if root.has_variable(collection, name) else {}
        if create:
            want = jax.eval_shape(lambda: make(jax.random.key(0), [site], jnp.float32))
            if want and root.path:  # a lifted transform's scope: the bank would land at its path
                raise errors.InvalidConfigError(
                    f"{type(module).__name__} {_path(module)!r} keeps shared state ({sorted(want)}) at the root "
                    f"of the variables, which it cannot reach from inside the lifted transform at "
                    f"{'/'.join(map(str, root.path))!r} (nn.remat, nn.scan, nn.jit ...); use a method without "
                    "shared state (e.g. Phm(shared_phm_rule=False)), or attach the method with "
                    "peft_jax.linen.attach to a model with ResidualTaps")
            for key, shape in want.items():
                if key in have and tuple(have[key].shape) != tuple(shape.shape):
                    raise errors.IncompatibleMethodsError(
                        f"{_path(module)!r} needs shared state {name}/{key} of shape {tuple(shape.shape)}, "
                        f"but another module of adapter {name!r} made it {tuple(have[key].shape)}; give the "
                        "adapters of one name the same sizes, or another adapter= name")
            missing = [k for k in want if k not in have]
            if missing:
                values = make(module.make_rng("params"), [site], jnp.float32)
                have.update({k: values[k] for k in missing})
                root.put_variable(collection, name, have)
        elif not have and jax.eval_shape(lambda: make(jax.random.key(0), [site], jnp.float32)):
            raise errors.StateError(
                f"{_path(module)!r} needs the shared state of adapter {name!r} in {collection!r}, which "
                "these variables lack; pass every collection that init returned")
        out.update(have)
    return out


def _run(module: nn.Module, method: Method, init_site: Site, site: Site, base: dict, call: Callable,
         x: Any, write_base: Callable[[dict], None] | None = None) -> Any:
    """The module's output: ``call`` (its base layer) wrapped by ``method`` at ``site``.

    The adapter's variables are made on first use when ``"adapters"`` is mutable (``init``);
    when they are absent and cannot be made, the module is its base layer.
    """
    name = module.adapter
    if module.has_variable(COLLECTION, name):
        values = module.get_variable(COLLECTION, name)
        shared = _root_shared(module, name, method, init_site, create=False)
    elif module.is_mutable_collection(COLLECTION):
        method.check(init_site)
        shared = _root_shared(module, name, method, init_site, create=True)
        values, updates = method.init(module.make_rng("params"), init_site, base, shared)
        if updates:  # PiSSA / OLoRA move part of the kernel into the adapter
            base = {**base, **updates}
            write_base(updates)
        module.put_variable(COLLECTION, name, values)
    else:
        return call(x)
    key = module.make_rng("dropout") if method.needs_rng and module.has_rng("dropout") else None
    ctx = Context(None if key is None else jax.random.fold_in(key, 0))
    return run_site([(method, dict(values), shared, ctx)], site, call, x, base)


class LoraDense(nn.Dense):
    """A drop-in ``nn.Dense(features)`` with a LoRA (or DoRA) adapter.

    Its variables are those `peft_jax.linen.attach` gives an ``nn.Dense`` at the same path with
    ``LoraConfig(targets=[<path>], ...)``: ``params/<path>/{kernel,bias}`` (frozen) and
    ``adapters/<path>/<adapter>/{lora_a,lora_b}`` (DoRA adds ``magnitude``); the output is
    ``x W + b + (alpha / rank) (x A) B`` without forming ``W + s A B``. Every ``nn.Dense`` field
    (``use_bias``, ``dtype``, ``param_dtype``, ``kernel_init``, ``dot_general``, ...) works as
    there; the base layer runs as an ``nn.Dense``.

    Attributes:
        rank, alpha, dropout, use_rslora, init_weights, lora_bias: the `Lora` settings.
        use_dora: weight-decomposed LoRA (`Dora` on that `Lora`).
        adapter: the adapter's name.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> layer, x = LoraDense(2, rank=1), jnp.ones((4, 3))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> jax.tree.map(jnp.shape, variables["adapters"])
        {'default': {'lora_a': (3, 1), 'lora_b': (1, 2)}}
        >>> plain = nn.Dense(2).apply({"params": variables["params"]}, x)
        >>> bool(jnp.allclose(layer.apply(variables, x), plain))  # B starts at zero
        True
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_weights: Any = KaimingUniform()
    lora_bias: bool = False
    adapter: str = "default"

    @property
    def method(self) -> Method:
        """The `Lora` / `Dora` value this layer carries."""
        return lora_method(rank=self.rank, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                           use_dora=self.use_dora, init_weights=self.init_weights, lora_bias=self.lora_bias)

    def site(self, in_features: int) -> LinearSite:
        """The `LinearSite` this layer is, for inputs of ``in_features``."""
        return LinearSite(path=_path(self), op=dense_op(in_features, self.features), layer=type(self).__name__,
                          has_bias=self.use_bias)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        base = {"kernel": self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                                     self.param_dtype)}
        if self.use_bias:
            base["bias"] = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        current = dict(base)
        plain = nn.Dense(**{f: getattr(self, f) for f in _DENSE_FIELDS}, parent=None)

        def call(y, params=None):
            return plain.apply({"params": current if params is None else params}, y)

        def write_base(updates):
            for key, value in updates.items():
                self.put_variable("params", key, value)
            current.update(updates)

        site = self.site(jnp.shape(inputs)[-1])
        return _run(self, self.method, site, site, current, call, inputs, write_base)


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter (any `Bottleneck`: `seq_bn`, `double_seq_bn`, `par_bn`,
    `scaled_par_bn`, `adapter_plus`, `compacter`, `compacter_pp`) as a layer.

    Called on ``Residual(y, x, norm)`` it replaces ``norm(x + y)`` and computes what the method
    computes on a `peft_jax.hooks.linen.ResidualTap` at the same path, with the same variables
    (``adapters/<path>/<adapter>/...``; Compacter's shared rule in
    ``adapter_shared_params/<adapter>/phm_rule``, shared by every module of the adapter, as one
    attached adapter shares it). Called on a plain hidden state ``h`` it is the method's
    module-site form on an identity layer: ``h + f(h)``. A method with shared state cannot sit
    inside a lifted transform (``nn.remat``, ``nn.scan``), whose scope hides the root (a typed
    error says so); methods without it can.

    Attributes:
        features: the hidden width ``d``.
        method: the `Bottleneck` (``m = d // reduction_factor``; a per-block mapping reads ``index``).
        role: ``"attention"`` or ``"ffn"``: the sub-layer whose output arrives here.
        index: the transformer block it belongs to.
        adapter: the adapter's name.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> from peft_jax.methods import compacter_pp
        >>> from peft_jax.methods.sites import Residual
        >>> adapter = BottleneckAdapter(8, compacter_pp(reduction_factor=2, init_weights="zero_up"))
        >>> y, x = jnp.ones((2, 3, 8)), jnp.zeros((2, 3, 8))
        >>> variables = adapter.init(jax.random.key(0), Residual(y, x))
        >>> sorted(variables), variables["adapter_shared_params"]["default"]["phm_rule"].shape
        (['adapter_shared_params', 'adapters'], (4, 4, 4))
        >>> bool(jnp.allclose(adapter.apply(variables, Residual(y, x)), x + y))  # f = 0 at init
        True
    """

    features: int
    method: Bottleneck
    role: str = "ffn"
    index: int = 0
    adapter: str = "default"

    def site(self) -> ResidualSite:
        """The `ResidualSite` this adapter is (its sizes come from it)."""
        return ResidualSite(path=_path(self), layer=type(self).__name__, features=self.features, role=self.role,
                            index=self.index)

    @nn.compact
    def __call__(self, x: Residual | jax.Array) -> jax.Array:
        if not isinstance(self.method, Bottleneck):
            raise errors.InvalidConfigError(
                f"BottleneckAdapter takes a Bottleneck (seq_bn(), par_bn(), compacter(), ...), got {self.method!r}")
        site = self.site()
        if isinstance(x, Residual):
            return _run(self, self.method, site, site, {}, lambda r: r.combine(), x)
        plain = ModuleSite(path=site.path, layer=site.layer, param_shapes={})
        return _run(self, module_form(self.method, self.features), site, plain, {}, lambda y: y, x)


# --- a Peft handle over the modules ---------------------------------------------------------------
_MODULES = (LoraDense, BottleneckAdapter)


@dataclasses.dataclass(frozen=True)
class ModulePeft(Peft):
    """A `peft_jax.linen.Peft` handle whose adapters are modules of the model (see `handle`).

    Everything that reads the plan and the variables works as for attached adapters
    (``adapter_state``, ``load_adapter_state``, ``partition``, ``trainable_selector``, ``summary``,
    ``regularizer``, ``merge``, ``unmerge``, ``unload``); `apply` runs the model itself, since
    the modules compute their adapters.
    """

    def apply(self, variables: dict, *args: Any, active: Any = None, enabled: bool = True,
              rngs: dict | None = None, **kwargs: Any) -> Any:
        """The model's output with its adapter modules (``active`` names only, if given); with
        ``enabled=False`` or merged variables, the plain model on ``"params"``."""
        if not enabled or RECORD in variables:
            base = {k: v for k, v in variables.items() if k not in (COLLECTION, SHARED, SHARED_PARAMS, RECORD)}
            return self.module.apply(base, *args, rngs=rngs, **kwargs)
        if active is not None:
            if isinstance(active, str) or not all(isinstance(a, str) for a in active):
                raise errors.InvalidConfigError(
                    "active= takes a list of adapter names here; composition blocks (Stack, Parallel, "
                    "Average) need adapters attached by peft_jax.linen.attach")
            keep = {a.name for a in self._select(active)}
            adapters = variables.get(COLLECTION, {})
            for adapter in self._require_plans():
                if adapter.name not in keep:
                    for s in adapter.sites:
                        adapters = _without(adapters, f"{s.path}/{adapter.name}")
            variables = {**variables, COLLECTION: adapters}
        return self.module.apply(variables, *args, rngs=rngs, **kwargs)

    def attach(self, config: Any, name: str = "default") -> Peft:
        raise errors.StateError(
            "this handle describes adapter modules written into the model; attach configs to a model "
            "without them (peft_jax.linen.attach), or write the new adapter as a module too")

    def plan(self, variables: dict, *args: Any, **kwargs: Any) -> Peft:
        return handle(self.module, variables, *args, **kwargs)


def _without(tree: dict, path: str) -> dict:
    head, _, rest = path.partition("/")
    if head not in tree:
        return tree
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _without(tree[head], rest)}


def handle(module: nn.Module, variables: dict, *args: Any, **kwargs: Any) -> ModulePeft:
    """A planned `peft_jax.linen.Peft` handle over the adapter modules (`LoraDense`,
    `BottleneckAdapter`) inside ``module``, found by tracing ``module.apply(variables, *args,
    **kwargs)`` once (no compile). It is the handle `peft_jax.linen.attach` would give for the
    same methods on the equivalent plain model, so ``merge`` / ``unload`` / ``adapter_state`` /
    ``partition`` mean the same.

    Raises:
        NoMatchError: ``module`` holds no adapter module on this call.
        InvalidConfigError: ``module`` itself is one (it has no path; as with attach, wrap it in
            a model).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> model, x = nn.Sequential([LoraDense(2, rank=1), nn.relu]), jnp.ones((4, 3))
        >>> variables = model.init(jax.random.key(0), x)
        >>> peft = handle(model, variables, x)
        >>> [(s.path, s.methods[0].name) for s in peft.plans[0].sites]
        [('layers_0', 'lora')]
        >>> merged = peft.merge(variables)
        >>> bool(jnp.allclose(peft.apply(merged, x), model.apply(variables, x), atol=1e-6))
        True
        >>> sorted(peft.unload(variables))  # variables of the plain model
        ['params']
    """
    found: dict[str, tuple[str, Method, Site]] = {}
    paths: list[str] = []

    def record(next_fun, call_args, call_kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, _MODULES):
            path = _path(m)
            if not path:
                raise errors.InvalidConfigError(
                    f"the {type(m).__name__} is the model itself, which has no path for its adapter "
                    "(attach cannot target a model's root either); put it inside a model, e.g. "
                    "nn.Sequential([layer])")
            if path not in found:
                site = m.site(jnp.shape(call_args[0])[-1]) if isinstance(m, LoraDense) else m.site()
                found[path] = (m.adapter, m.method, site)
        if context.method_name == "__call__" and m.path and _path(m) not in paths:
            paths.append(_path(m))
        return next_fun(*call_args, **call_kwargs)

    def trace(variables):
        with nn.intercept_methods(record):
            module.apply(variables, *args, **kwargs)

    jax.eval_shape(trace, variables)
    if not found:
        raise errors.NoMatchError(
            f"{type(module).__name__} calls no adapter module (LoraDense, BottleneckAdapter) on these "
            "inputs; use peft_jax.linen.attach for a model without them")

    def describe_at(path: str, kind: str) -> Site | None:
        site = found[path][2]
        return site if site.kind == kind else None

    configs, plans = [], []
    for name in dict.fromkeys(a for a, _, _ in found.values()):
        config = compose(*[Placement(re.escape(p), m, what=f"{type(m).__name__} module")
                           for p, (a, m, _) in found.items() if a == name])
        configs.append((name, config))
        plans.append(plan_adapter(name, config, paths, describe_at, type_of=lambda p: "module"))
    return ModulePeft(module, tuple(configs), tuple(plans), tuple(paths))
