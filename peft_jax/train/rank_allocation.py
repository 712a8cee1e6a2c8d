"""AdaLoRA's rank allocator as an optax transform: the budget moves inside the compiled step.

`allocate_ranks(optimizer, method)` wraps any optax optimizer. After the inner update it does
what HF PEFT's ``update_and_allocate(global_step)`` does after ``optimizer.step()``, at the step
count ``t`` it keeps in its state (0 for the first update):

* while ``t < total_step - tfinal``: the importance of every AdaLoRA param element,
  ``I = |p * g|`` (``p`` after the update, ``g`` the gradient the optimizer got), smoothed as
  sensitivity ``S <- b1 S + (1 - b1) I`` and uncertainty ``U <- b2 U + (1 - b2) |I - S|``;
* the budget ``b(t)``: ``init_r * n`` up to ``tinit``, then a cubic decay to ``target_r * n``
  at ``total_step - tfinal`` (`budget_schedule`, integer values as HF's ``int()``);
* when ``t > tinit`` and ``t % delta_t == 0`` (and always at ``t == total_step - tfinal``):
  each rank ``i`` of a layer scores ``s(E_i) + mean_j s(A_ji) + mean_j s(B_ij)`` with
  ``s = S * U``; the ``init_r * n - b(t)`` lowest-scoring ranks of all layers get ``E_i = 0``
  and the mask is kept as the rank pattern; at ``t == total_step - tfinal`` the EMAs reset;
* when ``t > total_step - tfinal``: the kept rank pattern is applied every step.

Everything is data of fixed shape (the budget is a table indexed by ``t``), so the schedule runs
start to end in one compiled program. The state is an `AllocatorState` somewhere in the step's
optimizer state; `rank_pattern` and `current_budget` read it. A train step whose trainable params
hold AdaLoRA factors refuses to run without it (`require_allocator`).

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from peft_jax.methods.adalora import AdaLora
    >>> method = AdaLora(init_r=2, target_r=1, total_step=4)
    >>> params = {"q": {"lora_a": jnp.ones((3, 2)), "lora_e": jnp.ones(2), "lora_b": jnp.ones((2, 3))}}
    >>> tx = allocate_ranks(optax.sgd(0.1), method)
    >>> state = tx.init(params)
    >>> grads = {"q": {"lora_a": jnp.ones((3, 2)), "lora_e": jnp.array([1.0, 3.0]),
    ...                "lora_b": jnp.ones((2, 3))}}  # rank 1 matters more
    >>> for _ in range(4):
    ...     updates, state = tx.update(grads, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> int(current_budget(state)), [int(e != 0) for e in params["q"]["lora_e"]]
    (1, [0, 1])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax import errors
from peft_jax.methods.adalora import FACTORS, AdaLora

__all__ = ["AllocatorState", "allocate_ranks", "budget_schedule", "current_budget", "factor_groups",
           "rank_pattern", "require_allocator"]


class AllocatorState(NamedTuple):
    """The allocator's part of the optimizer state.

    Attributes:
        count: int32, updates done (HF's ``global_step`` of the next call).
        sensitivity: EMA of ``|p * g|`` for each AdaLoRA param (HF's ``exp_avg_ipt``).
        uncertainty: EMA of ``|I - sensitivity|`` (HF's ``exp_avg_unc``).
        mask: per layer, the ranks kept ``(init_r,)`` bool (HF's ``rank_pattern``).
        budget: int32, the budget of the last update.
        inner: the wrapped optimizer's state.
    """

    count: jax.Array
    sensitivity: Any
    uncertainty: Any
    mask: dict[str, jax.Array]
    budget: jax.Array
    inner: Any


def budget_schedule(method: AdaLora, num_layers: int, step: int) -> tuple[int, bool]:
    """``(budget, prune)`` at ``step``: HF PEFT's ``RankAllocator.budget_schedule``.

    Example:
        >>> m = AdaLora(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=100)
        >>> [budget_schedule(m, 2, t)[0] for t in (0, 10, 11, 45, 80, 81)]
        [24, 24, 23, 10, 8, 8]
    """
    initial, target = method.init_r * num_layers, method.target_r * num_layers
    if step <= method.tinit:
        return initial, False
    if step > method.total_step - method.tfinal:
        return target, True
    left = 1 - (step - method.tinit) / (method.total_step - method.tfinal - method.tinit)
    return int((initial - target) * left ** 3 + target), step % method.delta_t == 0


def factor_groups(params: Any) -> dict[str, dict[str, int]]:
    """``{layer: {"lora_a": leaf index, "lora_e": ..., "lora_b": ...}}`` for every complete set
    of AdaLoRA factors among the leaves of ``params`` (NNX state or Linen dicts).

    Example:
        >>> import jax.numpy as jnp
        >>> factor_groups({"q": {"lora_a": 1, "lora_b": 2, "lora_e": 3}, "k": {"lora_a": 4}})
        {"['q']": {'lora_a': 1, 'lora_b': 2, 'lora_e': 3}}
    """
    groups: dict[str, dict[str, int]] = {}
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        hits = [j for j, n in enumerate(names) if n in FACTORS]
        if hits:
            j = hits[-1]
            groups.setdefault(jax.tree_util.keystr(tuple(path[:j])), {})[names[j]] = i
    return {k: g for k, g in groups.items() if len(g) == len(FACTORS)}


def _rank_scores(score_a: jax.Array, score_e: jax.Array, score_b: jax.Array) -> jax.Array:
    """Per rank: ``s(E_i) + mean over in of s(A) + mean over out of s(B)``."""
    r = score_e.shape[0]
    return score_e + score_a.reshape(-1, r).mean(0) + score_b.reshape(r, -1).mean(1)


def allocate_ranks(optimizer: optax.GradientTransformation, method: AdaLora
                   ) -> optax.GradientTransformation:
    """``optimizer`` followed by AdaLoRA's rank allocation (see the module docstring).

    It must be the outermost transform (what `make_train_step` applies): it zeroes ``E`` by
    returning ``-p`` as the update, which a transform after it (``optax.chain(allocate_ranks(
    ...), optax.scale(...))``) would alter. Put schedules and clipping inside ``optimizer``.

    Args:
        optimizer: the optax optimizer of the trainable params.
        method: the attached `AdaLora` (its schedule fields; all layers' factors found in the
            params by name share its budget).
    """
    if not isinstance(method, AdaLora):
        raise errors.InvalidConfigError(
            f"allocate_ranks needs the AdaLora method that is attached, got {method!r}")

    def init(params):
        groups = factor_groups(params)
        if not groups:
            raise errors.InvalidConfigError(
                "allocate_ranks found no AdaLoRA params (lora_a / lora_e / lora_b) among the "
                "trainable params; attach AdaLora first, and pass the trainable subtree")
        leaves = jax.tree.leaves(params)
        for layer, g in groups.items():
            if leaves[g["lora_e"]].shape != (method.init_r,):
                raise errors.InvalidConfigError(
                    f"AdaLoRA's E at {layer} has shape {leaves[g['lora_e']].shape}, not "
                    f"({method.init_r},): the method passed to allocate_ranks is not the attached one")
        zeros = lambda: [jnp.zeros_like(leaves[i]) for g in groups.values() for i in g.values()]  # noqa: E731
        return AllocatorState(jnp.zeros((), jnp.int32), zeros(), zeros(),
                              {k: jnp.ones((method.init_r,), bool) for k in groups},
                              jnp.asarray(method.init_r * len(groups), jnp.int32),
                              optimizer.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise errors.InvalidConfigError("allocate_ranks needs the params in update(grads, state, params)")
        updates, inner = optimizer.update(grads, state.inner, params)
        groups = factor_groups(params)
        flat_p, treedef = jax.tree.flatten(params)
        flat_u = treedef.flatten_up_to(updates)
        flat_g = treedef.flatten_up_to(grads)
        order = [i for g in groups.values() for i in g.values()]
        slot = {i: n for n, i in enumerate(order)}
        n_layers = len(groups)
        t = state.count
        last_free = method.total_step - method.tfinal
        table = [budget_schedule(method, n_layers, s) for s in range(method.total_step + 2)]
        budgets = jnp.asarray(np.array([b for b, _ in table], np.int32))
        prunes = jnp.asarray(np.array([p for _, p in table], bool))
        step = jnp.minimum(t, method.total_step + 1)
        budget, prune = budgets[step], prunes[step]

        learning = t < last_free
        sens, unc = list(state.sensitivity), list(state.uncertainty)
        for i in order:
            new_p = flat_p[i] + flat_u[i]
            ipt = jnp.abs(new_p * flat_g[i])
            s = method.beta1 * sens[slot[i]] + (1 - method.beta1) * ipt
            u = method.beta2 * unc[slot[i]] + (1 - method.beta2) * jnp.abs(ipt - s)
            sens[slot[i]] = jnp.where(learning, s, sens[slot[i]])
            unc[slot[i]] = jnp.where(learning, u, unc[slot[i]])

        scores = {k: _rank_scores(*(sens[slot[g[n]]] * unc[slot[g[n]]] for n in FACTORS))
                  for k, g in groups.items()}
        everything = jnp.concatenate(list(scores.values()))
        k = method.init_r * n_layers - budget
        threshold = jnp.where(k > 0, jnp.sort(everything)[jnp.maximum(k - 1, 0)], -jnp.inf)
        choose = (learning & prune) | (t == last_free)
        frozen = t > last_free
        masks = {}
        for layer, g in groups.items():
            chosen = scores[layer] > threshold
            keep = jnp.where(choose, chosen, state.mask[layer])
            masks[layer] = keep
            i = g["lora_e"]
            zero_out = (choose | frozen) & ~keep
            flat_u[i] = jnp.where(zero_out, -flat_p[i], flat_u[i])
        reset = t == last_free
        sens = [jnp.where(reset, jnp.zeros_like(x), x) for x in sens]
        unc = [jnp.where(reset, jnp.zeros_like(x), x) for x in unc]
        return (treedef.unflatten(flat_u),
                AllocatorState(t + 1, sens, unc, masks, budget.astype(jnp.int32), inner))

    return optax.GradientTransformation(init, update)


def _allocator_states(opt_state: Any) -> list[AllocatorState]:
    is_state = lambda x: isinstance(x, AllocatorState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def _one_state(opt_state: Any) -> AllocatorState:
    found = _allocator_states(opt_state)
    if len(found) != 1:
        raise errors.StateError(
            f"expected one AdaLoRA allocator state in the optimizer state, found {len(found)}; "
            "build the optimizer with peft_jax.train.allocate_ranks(tx, method)")
    return found[0]


def rank_pattern(opt_state: Any) -> dict[str, list[bool]]:
    """The ranks each layer keeps, ``{layer: [bool] * init_r}`` (HF's ``rank_pattern``)."""
    return {k: [bool(v) for v in np.asarray(m)] for k, m in _one_state(opt_state).mask.items()}


def current_budget(opt_state: Any) -> jax.Array:
    """The total rank budget of the last update."""
    return _one_state(opt_state).budget


def require_allocator(trainable: Any, opt_state: Any) -> None:
    """Raises `StateError` when ``trainable`` holds AdaLoRA factors but ``opt_state`` has no
    allocator: without it AdaLoRA silently trains as a plain LoRA of rank ``init_r``."""
    if factor_groups(trainable) and not _allocator_states(opt_state):
        raise errors.StateError(
            "the trainable params hold AdaLoRA factors but the optimizer has no rank allocator, "
            "so AdaLoRA would train as plain LoRA; wrap the optimizer: "
            "tx = peft_jax.train.allocate_ranks(tx, adalora_method)")
