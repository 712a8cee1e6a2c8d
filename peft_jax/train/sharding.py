"""Training over a device mesh: ``jit`` with ``NamedSharding`` in/out shardings.

The mesh has three named axes: ``"data"`` (batch only), ``"fsdp"`` (batch *and* one axis of each
big frozen weight) and ``"tensor"`` (the other axis: column-parallel q/k/v/gate/up, row-parallel
o/down). Sharding rules are ``(regex, PartitionSpec)`` pairs on "/"-joined paths; the first match
wins (`peft_jax.core.Rules`), and a dimension its mesh axes do not divide stays whole. Adapter
params follow the base layer they attach to, whatever the method (both front-ends' layout,
``<site>/<adapter>/<param>``): a param whose leading axes are the kernel's input axes (LoRA's
``A``) takes their sharding, one whose trailing axes are its output axes (``B``, DoRA's magnitude,
IA3's and VeRA's vectors) takes theirs (leaves smaller than ``replicate_below`` are replicated). Optimizer
moments follow the trainable leaves they belong to; counters and keys are replicated. Batches are
split over ``("data", "fsdp")``.

Multi-host: call ``jax.distributed.initialize()`` (arguments, or the cluster's environment on
TPU/SLURM) in every process before anything else touches JAX; ``jax.devices()`` then lists every
host's devices, `make_mesh` spans them all, and each process feeds its own slice of the global
batch (`ShardedStep.place_batch` assembles it with ``jax.make_array_from_process_local_data``).
The code path is the same as single-process, which is what the tests exercise.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    >>> def loss(t, f, b):
    ...     h = b["x"] @ f["q_proj"]["kernel"] + (b["x"] @ t["q_proj"]["lora_a"]) @ t["q_proj"]["lora_b"]
    ...     return jnp.mean(h ** 2)
    >>> frozen = {"q_proj": {"kernel": jnp.ones((4, 8))}}
    >>> trainable = {"q_proj": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 8))}}
    >>> step = make_sharded_train_step(loss, optax.sgd(0.1), mesh, trainable, frozen)
    >>> trainable, frozen = step.place(trainable, frozen)
    >>> frozen["q_proj"]["kernel"].sharding.spec
    P('fsdp', 'tensor')
    >>> trainable, opt_state, metrics = step(trainable, step.init(trainable), frozen, {"x": jnp.ones((4, 4))})
    >>> float(metrics["loss"])
    16.0
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from peft_jax import errors
from peft_jax.core import Rules, map_with_path, tree_items
from peft_jax.train.step import init_opt_state, make_step_fn, step_options

__all__ = ["AXES", "BATCH_AXES", "DECODER_RULES", "ENCODER_RULES", "ShardedStep", "batch_ways",
           "make_mesh", "make_sharded_train_step", "param_specs"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

COLUMN = P("fsdp", "tensor")  # kernel [in, out]: in over fsdp, out over tensor (q/k/v/gate/up)
ROW = P("tensor", "fsdp")     # kernel [in, out]: in over tensor, out over fsdp (o/down)
_K = r"(/base_layer)?/kernel"
_B = r"(/base_layer)?/bias"

#: Frozen-weight rules of `peft_jax.models.decoder.Decoder` (LLaMA-style names).
DECODER_RULES = Rules([
    (r"(.*/)?(q_proj|k_proj|v_proj|gate_proj|up_proj)" + _K, COLUMN),
    (r"(.*/)?(o_proj|down_proj)" + _K, ROW),
    (r"(.*/)?(q_proj|k_proj|v_proj|gate_proj|up_proj)" + _B, P("tensor")),
    (r"(.*/)?embed_tokens(/base_layer)?/embedding", P("tensor", "fsdp")),
    (r"(.*/)?lm_head" + _K, COLUMN),
], default=P())

#: Frozen-weight rules of `peft_jax.models.encoder` (BERT / RoBERTa names).
ENCODER_RULES = Rules([
    (r".*/attention/self/(query|key|value)" + _K, COLUMN),
    (r".*/intermediate/dense" + _K, COLUMN),
    (r".*/attention/output/dense" + _K, ROW),
    (r".*/layer/\d+/output/dense" + _K, ROW),
    (r".*/attention/self/(query|key|value)" + _B, P("tensor")),
    (r".*/intermediate/dense" + _B, P("tensor")),
    (r".*/word_embeddings(/base_layer)?/embedding", P("tensor", "fsdp")),
    (r".*/(position|token_type)_embeddings(/base_layer)?/embedding", P(None, "fsdp")),
], default=P())

def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else _shape(x)




def _base_kernel(path: str, frozen_items: dict) -> str | None:
    """The frozen kernel of the site an adapter param at ``path`` belongs to (either front-end's
    layout: ``<site>/<adapter>/<param>`` beside ``<site>/base_layer/kernel`` in NNX,
    ``adapters/<site>/<adapter>/<param>`` beside ``params/<site>/kernel`` in Linen)."""
    parts = path.split("/")
    linen = parts[0] == "adapters"
    for cut in range(len(parts) - 2, 0, -1):
        site = "/".join(parts[1:cut] if linen else parts[:cut])
        for leaf in ("kernel", "embedding"):
            base = f"params/{site}/{leaf}" if linen else f"{site}/base_layer/{leaf}"
            if base in frozen_items:
                return base
    return None


def make_mesh(shape: Mapping[str, int] | None = None, *, devices: Any = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")``; axes left out have size 1.

    Args:
        shape: axis sizes, e.g. ``{"data": 2, "fsdp": 4}``; one size may be ``-1`` (whatever the
            devices leave). ``None`` puts every device on ``"data"``.
        devices: the devices to use (default ``jax.devices()``, every host's after
            ``jax.distributed.initialize``).

    Returns:
        A ``jax.sharding.Mesh`` with ``Auto`` axis types (shardings propagate through ``jit``).

    Raises:
        MeshError: an unknown axis name, a size < 1, or sizes whose product is not the number of
            devices.

    Example:
        >>> dict(make_mesh({"data": 2, "tensor": -1}).shape)
        {'data': 2, 'fsdp': 1, 'tensor': 4}
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = dict(shape or {"data": -1})
    unknown = sorted(set(shape) - set(AXES))
    if unknown:
        raise errors.MeshError(f"unknown mesh axes {unknown}; the axes are {list(AXES)}")
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    free = [a for a in AXES if sizes[a] == -1]
    if len(free) > 1 or any(s < 1 and s != -1 for s in sizes.values()):
        raise errors.MeshError(f"mesh sizes must be >= 1 with at most one -1, got {shape}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free and n % known == 0:
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        need = f"a multiple of {known}" if free else str(known)
        raise errors.MeshError(
            f"mesh {shape} needs {need} devices but {n} are available "
            f"(jax.device_count() = {jax.device_count()}); choose sizes whose product is {n}, "
            f"e.g. {{'data': {n}}}, or pass devices=")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` with every dim its axes do not divide left whole (``P()`` if ranks differ)."""
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        missing = [a for a in names if a not in mesh.shape]
        if missing:
            raise errors.MeshError(f"sharding rule uses axes {missing} that the mesh "
                                   f"{dict(mesh.shape)} lacks; build it with make_mesh")
        out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _adapter_spec(shape: tuple, base_shape: tuple, base_spec: P) -> P:
    """An adapter param's spec from the base kernel's, by which kernel axes its axes repeat."""
    base = tuple(base_spec) + (None,) * (len(base_shape) - len(base_spec))
    n = len(shape)
    if 0 < n <= len(base_shape) and shape == base_shape[len(base_shape) - n:]:
        return P(*base[len(base) - n:])  # per-output vectors (DoRA magnitude, IA3, VeRA's b)
    if n >= 2 and shape[:-1] == base_shape[:n - 1]:
        return P(*base[:n - 1], None)  # (*in, r): LoRA's A
    if n >= 2 and shape[1:] == base_shape[len(base_shape) - n + 1:]:
        return P(None, *base[len(base) - n + 1:])  # (r, *out): LoRA's B
    if 0 < n < len(base_shape) and shape == base_shape[:n]:
        return P(*base[:n])  # per-input vectors (IA3 on a feed-forward input)
    return P()


def param_specs(mesh: Mesh, frozen: Any, trainable: Any = None, *, rules: Rules = DECODER_RULES,
                replicate_below: int = 0) -> tuple[Any, Any]:
    """``(frozen_specs, trainable_specs)``: a ``PartitionSpec`` per leaf.

    Frozen leaves take the first matching rule. A trainable leaf of an adapted site follows the
    site's frozen kernel (NNX ``<site>/base_layer/kernel``, Linen ``params/<site>/kernel``, or
    ``embedding``): axes that repeat the kernel's input axes take their sharding, axes that
    repeat its output axes theirs; other trainable leaves take the rules too. Leaves with fewer
    than ``replicate_below`` elements are replicated.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh({"fsdp": 2, "tensor": 4})
        >>> f = {"l": {"o_proj": {"base_layer": {"kernel": jnp.ones((8, 16))}}}}
        >>> t = {"l": {"o_proj": {"default": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 16))}}}}
        >>> fs, ts = param_specs(mesh, f, t)
        >>> fs["l"]["o_proj"]["base_layer"]["kernel"], ts["l"]["o_proj"]["default"]["lora_b"]
        (P('tensor', 'fsdp'), P(None, 'fsdp'))
    """

    def rule_spec(path: str, x: Any) -> P:
        if math.prod(_shape(x)) < replicate_below:
            return P()
        return _fit(rules.lookup(path, x), _shape(x), mesh)

    frozen_items = dict(tree_items(frozen))
    frozen_specs = {p: rule_spec(p, x) for p, x in frozen_items.items()}

    def trainable_spec(path: str, x: Any) -> P:
        base = _base_kernel(path, frozen_items)
        if base is None:
            return rule_spec(path, x)
        if math.prod(_shape(x)) < replicate_below:
            return P()
        spec = _adapter_spec(_shape(x), _shape(frozen_items[base]), frozen_specs[base])
        return _fit(spec, _shape(x), mesh)

    return (map_with_path(lambda p, x: frozen_specs[p], frozen),
            None if trainable is None else map_with_path(trainable_spec, trainable))


def _follow_params(opt_shapes: Any, trainable: Any, trainable_shardings: Any, replicated) -> Any:
    """Shardings of optimizer-state leaves: a leaf whose path ends with a trainable leaf's path
    and has its shape takes that leaf's sharding; counters, keys and the rest are replicated."""
    by_path = {p: (_shape(x), s) for (p, x), (_, s) in
               zip(tree_items(trainable), tree_items(trainable_shardings))}

    def pick(path: str, x: Any):
        parts = path.split("/")
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == _shape(x):
                return hit[1]
        return replicated

    return map_with_path(pick, opt_shapes)


def batch_ways(mesh: Mesh) -> int:
    """How many ways a batch is split over ``mesh``: ``mesh.shape["data"] * mesh.shape["fsdp"]``.

    Example:
        >>> batch_ways(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
        4
    """
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


class ShardedStep:
    """A train step jitted over a mesh; build it with `make_sharded_train_step`.

    Attributes:
        mesh: the device mesh.
        trainable, frozen, opt_state: pytrees of ``NamedSharding`` for the step's arguments.
    """

    def __init__(self, fn: Callable[..., Any], init: Callable[[Any], Any], mesh: Mesh,
                 trainable: Any, frozen: Any, opt_state: Any, donate: bool):
        self.mesh, self.trainable, self.frozen, self.opt_state = mesh, trainable, frozen, opt_state
        self._fn, self._donate, self._jitted = fn, donate, {}
        self._init = jax.jit(init, out_shardings=opt_state)
        self.replicated = NamedSharding(mesh, P())

    @property
    def data_size(self) -> int:
        """How many ways a batch is split (`batch_ways` of the mesh)."""
        return batch_ways(self.mesh)

    def init(self, trainable: Any) -> Any:
        """The optimizer state, created sharded like the trainable leaves it belongs to."""
        return self._init(trainable)

    def place(self, trainable: Any, frozen: Any) -> tuple[Any, Any]:
        """``device_put``s the params onto their shardings."""
        return jax.device_put(trainable, self.trainable), jax.device_put(frozen, self.frozen)

    def batch_shardings(self, batch: Any) -> Any:
        """``("data", "fsdp")`` on the leading dim of every leaf of ndim >= 1, 0-d replicated."""
        split = NamedSharding(self.mesh, P(BATCH_AXES))
        return jax.tree.map(lambda x: split if np.ndim(x) else self.replicated, batch)

    def check_batch(self, batch: Any) -> None:
        """Raises `BatchError` if a leaf's leading dim does not divide over the data axes.

        With several processes each passes its own slice; the global size is checked.
        """
        for path, x in tree_items(batch):
            if not np.ndim(x):
                continue
            dim = _shape(x)[0] * jax.process_count()
            if dim % self.data_size:
                sizes = " x ".join(f"{a}={self.mesh.shape[a]}" for a in BATCH_AXES)
                raise errors.BatchError(
                    f"batch leaf {path!r} has leading dim {dim}, which does not divide over the "
                    f"mesh's batch axes ({sizes} = {self.data_size} ways); use a (global) batch "
                    f"size that is a multiple of {self.data_size}, or a mesh with fewer data/fsdp "
                    "devices")

    def place_batch(self, batch: Any) -> Any:
        """Checks ``batch`` and puts it on the mesh (assembling per-process slices on many hosts)."""
        self.check_batch(batch)
        shardings = self.batch_shardings(batch)
        if jax.process_count() > 1:  # each process holds its rows; 0-d leaves are the same everywhere
            return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x))
                                if np.ndim(x) else jax.device_put(x, s), shardings, batch)
        return jax.device_put(batch, shardings)

    def _compiled_for(self, batch: Any):
        key = jax.tree.structure(batch), tuple(np.ndim(x) > 0 for x in jax.tree.leaves(batch))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(
                self._fn, donate_argnums=(0, 1) if self._donate else (),
                in_shardings=(self.trainable, self.opt_state, self.frozen, self.batch_shardings(batch)),
                out_shardings=(self.trainable, self.opt_state, self.replicated))
        return self._jitted[key]

    def __call__(self, trainable: Any, opt_state: Any, frozen: Any, batch: Any):
        """One step: ``(trainable, opt_state, metrics)``; bad batch shapes fail before compiling."""
        batch = self.place_batch(batch)
        return self._compiled_for(batch)(trainable, opt_state, frozen, batch)

    def lower(self, trainable: Any, opt_state: Any, frozen: Any, batch: Any):
        """``jax.jit(...).lower`` of the step for these arguments (for cost / memory analysis)."""
        self.check_batch(batch)
        return self._compiled_for(batch).lower(trainable, opt_state, frozen, batch)


def make_sharded_train_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                            mesh: Mesh, trainable: Any, frozen: Any, *,
                            rules: Rules = DECODER_RULES, replicate_below: int = 0,
                            has_aux: bool = False, donate: bool = True, **options: Any) -> ShardedStep:
    """The train step of `peft_jax.train.make_train_step`, jitted over ``mesh``.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch) -> loss`` (or ``(loss, aux)``).
        optimizer: an optax transformation.
        mesh: from `make_mesh`.
        trainable, frozen: the params (or ``jax.ShapeDtypeStruct`` trees): only their paths and
            shapes are used, to choose shardings.
        rules: frozen-weight sharding rules (`DECODER_RULES`, `ENCODER_RULES`, or your own
            ``Rules([(regex, PartitionSpec), ...], default=P())``).
        replicate_below: replicate leaves with fewer elements than this.
        has_aux, donate, **options: as for `peft_jax.train.make_train_step`.

    Returns:
        A `ShardedStep`: ``step(trainable, opt_state, frozen, batch)``, ``step.init``,
        ``step.place``, ``step.place_batch``.

    Raises:
        MeshError: a rule names an axis the mesh lacks.
        BatchError: (when called, before compiling) a batch that does not divide over the data axes.
    """
    opts = step_options(**options)
    frozen_specs, trainable_specs = param_specs(mesh, frozen, trainable, rules=rules,
                                                replicate_below=replicate_below)
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    frozen_sh = jax.tree.map(named, frozen_specs, is_leaf=is_spec)
    trainable_sh = jax.tree.map(named, trainable_specs, is_leaf=is_spec)

    def init(t):
        return init_opt_state(optimizer, t, opts)

    opt_shapes = jax.eval_shape(init, trainable)
    opt_sh = _follow_params(opt_shapes, trainable, trainable_sh, NamedSharding(mesh, P()))
    fn = make_step_fn(loss_fn, optimizer, has_aux=has_aux, options=opts)
    return ShardedStep(fn, init, mesh, trainable_sh, frozen_sh, opt_sh, donate)
