"""The train-step factory: differentiate and update only the trainable subtree.

``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`` is jitted with the
trainable params and optimizer state donated. ``frozen`` is an argument, never a closure, so the
base weights are inputs of the compiled program rather than baked-in constants, and the gradient is
taken with respect to ``trainable`` alone: XLA never sees a weight-gradient matmul for a frozen leaf.

Keyword options (fields of `StepOptions`) add, inside the same compiled program: gradient
accumulation over micro-batches (``lax.scan``), global-norm clipping, the learning rate in the
metrics, mixed precision, rematerialization and a fresh dropout key per step. Without options the
step is exactly the plain one and ``opt_state`` is ``optimizer.init(trainable)``; with
``dropout_key`` or ``lr_schedule`` the step counts updates, and its state must come from
``step.init(trainable)`` (a `StepState`). ``step.init`` is right in every case.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> def loss(trainable, frozen, batch):
    ...     w = frozen["w"] + trainable["a"] @ trainable["b"]
    ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> trainable = {"a": jnp.ones((3, 1)), "b": jnp.zeros((1, 2))}
    >>> frozen = {"w": jnp.zeros((3, 2))}
    >>> step = make_train_step(loss, tx)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}
    >>> trainable, opt_state, metrics = step(trainable, tx.init(trainable), frozen, batch)
    >>> round(float(metrics["loss"]), 3)
    1.0
    >>> sched = optax.linear_schedule(0.1, 0.0, 10)
    >>> step = make_train_step(loss, optax.sgd(sched), accumulate=2, clip_norm=1.0, lr_schedule=sched)
    >>> trainable, opt_state, metrics = step(trainable, step.init(trainable), frozen, batch)
    >>> sorted(metrics), round(float(metrics["lr"]), 3)
    (['grad_norm', 'loss', 'lr'], 0.1)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peft_jax import errors
from peft_jax.train.precision import Precision
from peft_jax.train.rank_allocation import require_allocator

LossFn = Callable[[Any, Any, Any], Any]

#: Names accepted by ``remat=`` (attributes of ``jax.checkpoint_policies`` that are policies).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "everything_saveable")


class StepState(NamedTuple):
    """Optimizer state of a step that counts updates (``dropout_key`` or ``lr_schedule`` set).

    Attributes:
        count: int32 scalar, the number of updates applied so far.
        dropout_key: the base key that ``count`` is folded into each step (``None`` if unused).
        inner: the optax optimizer's own state.
    """

    count: jax.Array
    dropout_key: Any
    inner: Any


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class StepOptions:
    """What a step does besides ``value_and_grad`` + ``optimizer.update`` (defaults: nothing).

    Attributes:
        accumulate: split the batch's leading dim into this many micro-batches and average their
            gradients in a ``lax.scan`` (one compiled program, the memory of one micro-batch).
            Micro-batch ``j`` takes rows ``j, j+k, j+2k, ...``, so rows never leave their device
            when the batch is sharded. For a mean loss this equals the full-batch gradient. Float
            aux values are averaged over micro-batches, integer ones summed; a dict batch's
            ``"dropout_rng"`` is folded with the micro-batch index; 0-d leaves are shared.
        clip_norm: clip gradients to this global norm (``optax.clip_by_global_norm``) before the
            optimizer; the pre-clip norm is reported as ``metrics["grad_norm"]``.
        lr_schedule: an optax schedule reported as ``metrics["lr"]`` at the update's count (pass
            the same schedule to the optimizer). Without it, an optimizer built with
            ``optax.inject_hyperparams`` reports its ``learning_rate`` anyway.
        precision: a `peft_jax.train.precision.Precision` compute policy for the loss.
        remat: ``jax.checkpoint`` around the loss, with a policy named in `REMAT_POLICIES` or a
            policy callable (e.g. ``jax.checkpoint_policies.save_only_these_names("x")``).
        dropout_key: a PRNG key; each step puts ``fold_in(dropout_key, count)`` into
            ``batch["dropout_rng"]`` (the batch must be a dict). The key lives in the `StepState`,
            so checkpointing ``opt_state`` checkpoints the dropout stream.

    Example:
        >>> StepOptions(accumulate=4, remat="dots_saveable").accumulate
        4
    """

    accumulate: int = 1
    clip_norm: float | None = None
    lr_schedule: Callable[[Any], Any] | None = None
    precision: Precision | None = None
    remat: str | Callable[..., Any] | None = None
    dropout_key: jax.Array | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise errors.InvalidConfigError(
                f"accumulate must be an int >= 1 (micro-batches per step), got {self.accumulate!r}")
        if self.clip_norm is not None and not float(self.clip_norm) > 0:
            raise errors.InvalidConfigError(f"clip_norm must be > 0 or None, got {self.clip_norm!r}")
        if isinstance(self.remat, str) and self.remat not in REMAT_POLICIES:
            raise errors.InvalidConfigError(
                f"unknown remat policy {self.remat!r}; use one of {list(REMAT_POLICIES)}, a "
                "jax.checkpoint_policies callable, or None")
        if self.remat is not None and not isinstance(self.remat, str) and not callable(self.remat):
            raise errors.InvalidConfigError(f"remat must be a policy name or callable, got {self.remat!r}")
        if self.precision is not None and not isinstance(self.precision, Precision):
            raise errors.InvalidConfigError(
                f"precision must be a peft_jax.train.Precision, got {type(self.precision).__name__}")
        if self.lr_schedule is not None and not callable(self.lr_schedule):
            raise errors.InvalidConfigError("lr_schedule must be an optax schedule (count -> lr)")
        key = self.dropout_key
        if key is not None and not (hasattr(key, "dtype") and (
                jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                or (key.dtype == jnp.uint32 and key.shape == (2,)))):
            raise errors.InvalidConfigError(
                f"dropout_key must be a PRNG key such as jax.random.key(0), got {key!r}")

    @property
    def counts_steps(self) -> bool:
        """Whether the optimizer state is a `StepState` (a step count is needed)."""
        return self.dropout_key is not None or self.lr_schedule is not None

    @property
    def remat_policy(self) -> Callable[..., Any] | None:
        """The ``jax.checkpoint`` policy callable, or ``None`` for no remat."""
        if isinstance(self.remat, str):
            return getattr(jax.checkpoint_policies, self.remat)
        return self.remat


def step_options(options: StepOptions | None = None, **kwargs: Any) -> StepOptions:
    """`StepOptions` from keyword arguments, with an error that lists the valid names.

    Example:
        >>> step_options(clip_norm=1.0).clip_norm
        1.0
    """
    names = [f.name for f in dataclasses.fields(StepOptions)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise errors.InvalidConfigError(f"unknown step option(s) {unknown}; valid options: {names}")
    if options is not None:
        return dataclasses.replace(options, **kwargs)
    return StepOptions(**kwargs)


def init_opt_state(optimizer: optax.GradientTransformation, trainable: Any,
                   options: StepOptions | None = None) -> Any:
    """The optimizer state a step with ``options`` expects (``optimizer.init`` or a `StepState`).

    Example:
        >>> import optax
        >>> init_opt_state(optax.sgd(0.1), {"a": jnp.ones(2)}, StepOptions(lr_schedule=lambda c: 0.1)).count
        Array(0, dtype=int32)
    """
    options = options or StepOptions()
    inner = optimizer.init(trainable)
    if not options.counts_steps:
        return inner
    # A copy: the step donates its state, which must not delete the caller's key.
    key = None if options.dropout_key is None else jnp.array(options.dropout_key, copy=True)
    return StepState(jnp.zeros((), jnp.int32), key, inner)


def _split_micro(batch: Any, k: int) -> tuple[Any, Callable[[Any], Any]]:
    """``(stacked, rebuild)``: leaves of ndim >= 1 reshaped to ``[k, B // k, ...]`` (strided)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    split, shared = [], {}
    for i, (path, x) in enumerate(leaves):
        if jnp.ndim(x) == 0:
            shared[i] = x
            continue
        n = x.shape[0]
        if n % k:
            raise errors.BatchError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading dim {n}, which does not split "
                f"into accumulate={k} micro-batches; use a batch size that is a multiple of {k}")
        x = jnp.asarray(x)
        split.append(jnp.swapaxes(x.reshape((n // k, k) + x.shape[1:]), 0, 1))

    def rebuild(parts: list[Any]) -> Any:
        it = iter(parts)
        return treedef.unflatten([shared[i] if i in shared else next(it) for i in range(len(leaves))])

    return split, rebuild


def _is_int(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.integer)


def _grads_accumulated(grad_fn, trainable, frozen, batch, k: int):
    rng = None
    if isinstance(batch, dict) and "dropout_rng" in batch:
        batch = dict(batch)
        rng = batch.pop("dropout_rng")
    parts, rebuild = _split_micro(batch, k)

    def micro(i, xs):
        b = rebuild(xs)
        if rng is not None:
            b = {**b, "dropout_rng": jax.random.fold_in(rng, i)}
        return b

    first = micro(0, [p[0] for p in parts])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, trainable, frozen, first))

    def body(acc, xs):
        i, chunk = xs
        out = grad_fn(trainable, frozen, micro(i, chunk))
        return jax.tree.map(jnp.add, acc, out), None

    ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), parts))
    mean = lambda x: x if _is_int(x) else x / k  # noqa: E731
    return jax.tree.map(mean, loss), jax.tree.map(mean, aux), jax.tree.map(mean, grads)


def _injected_lr(state: Any) -> jax.Array | None:
    # optax.inject_hyperparams states (stateless and stateful variants) carry a hyperparams dict.
    is_hp = lambda x: isinstance(getattr(x, "hyperparams", None), dict)  # noqa: E731
    for node in jax.tree.leaves(state, is_leaf=is_hp):
        if is_hp(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return None


def make_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                 has_aux: bool = False, options: StepOptions | None = None,
                 axis_name: str | None = None) -> Callable[..., Any]:
    """The pure, un-jitted step under ``options``, for `jax.jit`, `jax.pmap` or a mesh.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch) -> loss`` (or ``(loss, aux)``).
        optimizer: an optax transformation.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        options: `StepOptions` (default: none).
        axis_name: a ``pmap`` axis: gradients (trainable only), loss and aux are ``pmean``-ed
            over it and a dropout key is folded with the device index.

    Returns:
        ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``.

    Example:
        >>> import optax
        >>> fn = make_step_fn(lambda t, f, b: jnp.sum(t * b), optax.sgd(1.0))
        >>> fn(jnp.ones(2), optax.sgd(1.0).init(jnp.ones(2)), None, jnp.ones(2))[0]
        Array([0., 0.], dtype=float32)
    """
    options = options or StepOptions()
    loss = loss_fn if has_aux else (lambda t, f, b: (loss_fn(t, f, b), {}))
    if options.precision is not None:
        loss = options.precision.wrap(loss, has_aux=True)
    if options.remat_policy is not None:
        loss = jax.checkpoint(loss, policy=options.remat_policy)
    grad_fn = jax.value_and_grad(loss, argnums=0, has_aux=True)

    def step(trainable, opt_state, frozen, batch):
        if isinstance(opt_state, StepState) != options.counts_steps:
            raise errors.StateError(
                "opt_state does not match the step's options (dropout_key / lr_schedule make the "
                "step count updates in a StepState); build it with step.init(trainable)")
        require_allocator(trainable, opt_state)  # at trace time: AdaLoRA needs its allocator
        count, key, inner = opt_state if options.counts_steps else (None, None, opt_state)
        if key is not None:
            if not isinstance(batch, dict):
                raise errors.BatchError(
                    f"dropout_key needs a dict batch to hold 'dropout_rng', got {type(batch).__name__}")
            batch = {**batch, "dropout_rng": jax.random.fold_in(key, count)}
        if axis_name is not None and isinstance(batch, dict) and "dropout_rng" in batch:
            batch = {**batch, "dropout_rng": jax.random.fold_in(batch["dropout_rng"],
                                                                 jax.lax.axis_index(axis_name))}
        if options.accumulate > 1:
            loss_value, aux, grads = _grads_accumulated(grad_fn, trainable, frozen, batch,
                                                        options.accumulate)
        else:
            (loss_value, aux), grads = grad_fn(trainable, frozen, batch)
        if axis_name is not None:  # all-reduce what trains, nothing else
            grads, loss_value = jax.lax.pmean((grads, loss_value), axis_name)
            aux = jax.tree.map(lambda x: jax.lax.psum(x, axis_name) if _is_int(x)
                               else jax.lax.pmean(x, axis_name), aux)
        metrics = {"loss": loss_value, **aux}
        # optax mixes int step counts with floats; keep users' strict dtype promotion working.
        with jax.numpy_dtype_promotion("standard"):
            if options.clip_norm is not None:
                metrics["grad_norm"] = optax.global_norm(grads)
                clip = optax.clip_by_global_norm(options.clip_norm)
                grads, _ = clip.update(grads, clip.init(grads))
            updates, inner = optimizer.update(grads, inner, trainable)
            if options.lr_schedule is not None:
                metrics["lr"] = jnp.asarray(options.lr_schedule(count), jnp.float32)
            elif (lr := _injected_lr(inner)) is not None:
                metrics["lr"] = lr
        trainable = optax.apply_updates(trainable, updates)
        if options.counts_steps:
            opt_state = StepState(count + 1, key, inner)
        else:
            opt_state = inner
        return trainable, opt_state, metrics

    return step


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True, **options: Any) -> Callable[..., Any]:
    """Builds the jitted step.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch) -> loss`` (or ``(loss, aux_dict)`` with
            ``has_aux``). For NNX models, `peft_jax.nnx.make_loss` builds it from
            ``model_loss(model, batch)``; for Linen, close over the `peft_jax.linen.Peft` object.
        optimizer: any optax transformation; its state is built by ``optimizer.init(trainable)``,
            so it holds moments for the trainable leaves only.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux entries join the metrics.
        donate: donate ``trainable`` and ``opt_state`` buffers to the step (the default).
        **options: fields of `StepOptions` (``accumulate``, ``clip_norm``, ``lr_schedule``,
            ``precision``, ``remat``, ``dropout_key``), or ``options=StepOptions(...)``.

    Returns:
        ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``, a
        ``jax.jit`` function (``step.lower(...)`` gives the compiled cost analysis) with
        ``step.init(trainable)`` (the matching optimizer state) and ``step.options``.

    Raises:
        InvalidConfigError: an unknown or out-of-range option.
        BatchError: (when called) the batch does not split into ``accumulate`` micro-batches.
        StateError: (when called) ``opt_state`` is not what ``step.init`` builds for the options.
    """
    opts = step_options(**options)
    step = jax.jit(make_step_fn(loss_fn, optimizer, has_aux=has_aux, options=opts),
                   donate_argnums=(0, 1) if donate else ())
    step.init = functools.partial(init_opt_state, optimizer, options=opts)
    step.options = opts
    return step
