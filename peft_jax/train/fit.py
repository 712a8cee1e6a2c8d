"""A simple fit loop: any iterable of batches, periodic evaluation, progress, a metrics log.

``fit`` drives a step built by `peft_jax.train.make_train_step` (``step(trainable, opt_state,
frozen, batch) -> (trainable, opt_state, metrics)``). Every ``log_every`` steps it prints a progress
line (mean loss, tokens/s) and writes a record to a `MetricsLog` (on a terminal, a
`ProgressBar` also shows every step); every ``eval_every`` steps, and
after the last one, it calls ``evaluate(trainable)`` and records the returned metrics with an
``eval_`` prefix. Given a `Checkpointer`, it saves a `TrainingState` every ``save_every`` steps
and after the last one. A NaN or infinite loss stops training with `NonFiniteLossError` at once,
before that step is saved: the last good checkpoint stays as it was.

To resume, restore the state with `restore_training_state`, rebuild the batch iterator at the
saved ``data_position`` and pass ``start_step=state.step``; the steps that follow are the same,
bit for bit, as those of a run that never stopped.

Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> from peft_jax.train import make_train_step
    >>> loss = lambda t, f, b: jnp.mean((b["x"] * t["w"] - b["y"]) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> step = make_train_step(loss, tx)
    >>> batches = [{"x": np.ones(4, np.float32), "y": np.full(4, 2.0, np.float32)}] * 20
    >>> params = {"w": jnp.zeros(())}
    >>> result = fit(step, params, tx.init(params), {}, batches, log=None)
    >>> result.step, round(float(result.trainable["w"]), 3)
    (20, 1.977)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from peft_jax import errors
from peft_jax.train.checkpoint import Checkpointer, TrainingState, save_training_state
from peft_jax.train.metrics import MetricsLog, to_python
from peft_jax.train.progress import ProgressBar

__all__ = ["FitResult", "count_tokens", "fit"]

Evaluate = Callable[[Any], Mapping[str, Any]]


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        trainable: the trained parameters.
        opt_state: the optimizer state after the last step.
        step: the number of the last step taken (``start_step`` + steps run).
        history: every record written (training intervals and evaluations).
        last_eval: the metrics of the final evaluation (``None`` without ``evaluate``).
        train_seconds: wall time spent in training steps (evaluation excluded).
    """

    trainable: Any
    opt_state: Any
    step: int
    history: list[dict[str, Any]]
    last_eval: dict[str, Any] | None
    train_seconds: float


def count_tokens(batch: Any) -> int:
    """Real tokens in a batch: the sum of ``attention_mask`` if present, else the size of
    ``input_ids``, else the leading dimension of the first array.

    Example:
        >>> mask = np.array([[1, 1, 0, 0]] * 2)
        >>> count_tokens({"input_ids": np.ones((2, 4)), "attention_mask": mask})
        4
    """
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return int(np.sum(np.asarray(batch["attention_mask"])))
        if "input_ids" in batch:
            return int(np.size(batch["input_ids"]))
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise errors.NonFiniteLossError(
            f"the training loss is {loss} at step {step}; training stopped. Lower the learning "
            "rate (--lr), check the batch for bad values (e.g. labels outside 0..num_labels-1), "
            "or clip gradients. Files already written (checkpoints, metrics) are left as they "
            "were.")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "shape") and np.shape(value) == ():
            out[key] = float(value)
    return out


def _format(record: Mapping[str, Any], total: int | None) -> str:
    step = record["step"]
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        if isinstance(value, bool):
            parts.append(key.replace("_", " ") if value else f"not {key.replace('_', ' ')}")
        elif key == "tokens_per_s":
            parts.append(f"{value:,.0f} tok/s")
        elif key == "elapsed_s":
            parts.append(f"{value:.1f}s")
        elif key == "lr":
            parts.append(f"lr {value:.3g}")
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)


def fit(step_fn: Callable[..., Any], trainable: Any, opt_state: Any, frozen: Any,
        batches: Iterable[Any], *, num_steps: int | None = None,
        evaluate: Evaluate | None = None, eval_every: int = 0, log_every: int = 10,
        log: Callable[[str], None] | None = print, metrics_log: MetricsLog | None = None,
        rng: jax.Array | None = None, start_step: int = 0,
        checkpointer: Checkpointer | None = None, save_every: int = 0,
        progress: bool | None = None,
        should_stop: Callable[[int, dict[str, Any]], bool] | None = None) -> FitResult:
    """Trains until ``num_steps`` steps have run or ``batches`` is exhausted.

    Args:
        step_fn: ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``
            with a scalar ``metrics["loss"]`` (see `peft_jax.train.make_train_step`).
        trainable: initial trainable parameters (donated to the first step).
        opt_state: initial optimizer state (donated to the first step).
        frozen: frozen parameters, passed to every step unchanged.
        batches: any iterable of batches (dicts of numpy / JAX arrays, or any pytree); when it
            has ``steps_per_epoch``, training records carry ``epoch`` (steps / that).
        num_steps: stop after this many steps (``None``: when ``batches`` ends).
        evaluate: ``evaluate(trainable) -> {name: value}``, called every ``eval_every`` steps and
            after the last step; its results are recorded as ``eval_<name>``.
        eval_every: evaluation period in steps (0: only after the last step).
        log_every: a progress line and a metrics record every this many steps.
        log: where progress lines go (``None``: silent).
        metrics_log: a `MetricsLog` that receives every record.
        rng: if given, each batch (a dict) gets ``"dropout_rng": fold_in(rng, step)``.
        start_step: the number of steps already taken (only shifts the step counter).
        checkpointer: where to save `TrainingState`s (trainable, optimizer state, step, ``rng``
            and ``batches.position`` when the iterable has one).
        save_every: checkpoint period in steps (0: only after the last step); needs
            ``checkpointer``.
        progress: draw a `ProgressBar` on standard output (``None``: when ``log`` is set and
            standard output is a terminal).
        should_stop: called as ``should_stop(step, eval_results)`` after each periodic
            evaluation; ``True`` ends training there (`peft_jax.train.early_stopping`), with a
            ``{"step", "stopped_early": True}`` record and a checkpoint of that step.

    Returns:
        A `FitResult`.

    Raises:
        NonFiniteLossError: a step returned a NaN or infinite loss.
        InvalidConfigError: a negative ``num_steps``, ``eval_every`` or ``save_every``, a
            non-positive ``log_every``, or ``save_every`` without a ``checkpointer``.
    """
    if num_steps is not None and num_steps < 0:
        raise errors.InvalidConfigError(f"num_steps must be >= 0, got {num_steps}")
    if eval_every < 0 or log_every < 1:
        raise errors.InvalidConfigError(
            f"eval_every must be >= 0 and log_every >= 1, got {eval_every} and {log_every}")
    if save_every < 0 or (save_every and checkpointer is None):
        raise errors.InvalidConfigError(
            f"save_every must be >= 0 and needs a checkpointer, got {save_every} and "
            f"{checkpointer!r}")
    history: list[dict[str, Any]] = []
    total = None if num_steps is None else start_step + num_steps
    if progress is None:
        progress = log is not None and sys.stdout.isatty()
    bar = ProgressBar(total, start=start_step) if progress else None

    def record(entry: dict[str, Any]) -> None:
        entry = to_python(entry)
        history.append(entry)
        if metrics_log is not None:
            metrics_log.write(entry)
        if log is not None:
            if bar is not None:
                bar.above(log, _format(entry, total))
            else:
                log(_format(entry, total))

    def save(step: int) -> None:
        position = getattr(batches, "position", None)
        position = position.to_dict() if hasattr(position, "to_dict") else position
        save_training_state(checkpointer, TrainingState(step, trainable, opt_state, rng, position))

    def run_eval(step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        results = {k: to_python(v) for k, v in evaluate(trainable).items()}
        record({"step": step, **{f"eval_{k}": v for k, v in results.items()},
                "eval_seconds": time.perf_counter() - t0})
        return results

    steps_per_epoch = getattr(batches, "steps_per_epoch", None)

    def epoch_of(step: int) -> dict[str, float]:
        return {"epoch": round(step / steps_per_epoch, 4)} if steps_per_epoch else {}

    step, last_eval, evaluated_at, saved_at = start_step, None, None, None
    sums: dict[str, float] = {}
    n_in_interval, tokens, interval_s, train_s = 0, 0, 0.0, 0.0
    try:
        iterator = iter(batches)
        while total is None or step < total:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if rng is not None:
                batch = {**batch, "dropout_rng": jax.random.fold_in(rng, step)}
            t0 = time.perf_counter()
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch)
            scalars = _scalars(metrics)  # waits for the step: the time below is the step's own
            dt = time.perf_counter() - t0
            step += 1
            _check_finite(scalars.get("loss", 0.0), step)
            interval_s += dt
            train_s += dt
            tokens += count_tokens(batch)
            n_in_interval += 1
            for key, value in scalars.items():
                sums[key] = sums.get(key, 0.0) + value
            if bar is not None:
                bar.update(step, loss=scalars.get("loss"),
                           tokens_per_s=tokens / max(interval_s, 1e-9))
            is_last = total is not None and step == total
            if step % log_every == 0 or is_last:
                record({"step": step, **epoch_of(step),
                        **{k: v / n_in_interval for k, v in sums.items()},
                        "tokens_per_s": tokens / max(interval_s, 1e-9), "elapsed_s": train_s})
                sums, n_in_interval, tokens, interval_s = {}, 0, 0, 0.0
            if checkpointer is not None and (is_last or (save_every and step % save_every == 0)):
                save(step)
                saved_at = step
            if evaluate is not None and eval_every and step % eval_every == 0:
                last_eval, evaluated_at = run_eval(step), step
                if should_stop is not None and should_stop(step, last_eval):
                    record({"step": step, "stopped_early": True})
                    break
        if n_in_interval:  # the iterable ended (or training stopped) between two log points
            record({"step": step, **epoch_of(step),
                    **{k: v / n_in_interval for k, v in sums.items()},
                    "tokens_per_s": tokens / max(interval_s, 1e-9), "elapsed_s": train_s})
        if checkpointer is not None and saved_at != step and step > start_step:
            save(step)
        if evaluate is not None and evaluated_at != step:
            last_eval = run_eval(step)
    finally:  # the bar ends its line, also when training stops with an error
        if bar is not None:
            bar.close()
    return FitResult(trainable, opt_state, step, history, last_eval, train_s)
