"""Training checkpoints with orbax: adapter params, optimizer state, step, RNG, data position.

Only what trains is written: the frozen base never enters a training checkpoint. Each checkpoint
is a step directory that orbax finalizes by renaming a temporary directory, so a process killed
while writing leaves the previous checkpoints restorable (an unfinished write is ignored). The
trees are stored flat, keyed by their "/"-joined paths, so NNX ``State``s, Linen dicts and optax
states all round-trip into the structure of the template they are restored into.

A checkpoint also records a *fingerprint* of the run (model, method config, ...); resuming with a
different fingerprint raises `ResumeError` before anything is overwritten.

`save_training_state` / `restore_training_state` store what a training loop needs to continue
exactly: trainable params, optimizer state, step, RNG key and data position (`peft_jax.train.fit`
calls the first every ``save_every`` steps).

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), fingerprint={"model": "tiny"}, keep=2)
    >>> ckpt.save(3, {"params": {"a": jnp.ones(2)}}, extra={"data_position": 12})
    >>> step, state, extra = ckpt.restore({"params": {"a": jnp.zeros(2)}})
    >>> step, state["params"]["a"].tolist(), extra["data_position"]
    (3, [1.0, 1.0], 12)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peft_jax import errors
from peft_jax.core.paths import tree_items

_KEY_SUFFIX = "::key_data"


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    """``{path: host array}``; typed PRNG keys are stored as their raw key data."""
    flat = {}
    for path, leaf in tree_items(tree):
        if _is_key(leaf):
            flat[path + _KEY_SUFFIX] = np.asarray(jax.random.key_data(leaf))
        else:
            flat[path] = np.asarray(leaf)
    return flat


def _unflatten(template: Any, flat: dict[str, Any]) -> Any:
    items = tree_items(template)
    leaves = []
    for path, leaf in items:
        if _is_key(leaf):
            leaves.append(jax.random.wrap_key_data(jnp.asarray(flat[path + _KEY_SUFFIX]),
                                                   impl=jax.random.key_impl(leaf)))
        else:
            leaves.append(jnp.asarray(flat[path], dtype=leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


class Checkpointer:
    """Saves every checkpoint it is given, keeps the last ``keep``, restores the newest.

    Args:
        directory: where step directories go (created if missing).
        fingerprint: JSON-able description of the run; must match on resume.
        keep: how many checkpoints to keep (older ones are deleted after a newer one is final).
    """

    def __init__(self, directory: str, *, fingerprint: dict, keep: int = 3):
        if keep < 1:
            raise errors.InvalidConfigError(f"keep must be >= 1 checkpoints, got {keep}")
        self.directory = os.path.abspath(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every finished checkpoint kept, oldest first."""
        return sorted(self._manager.all_steps())

    def metadata(self, step: int) -> dict:
        """``{"fingerprint": ..., "extra": ...}`` of checkpoint ``step`` (reads no arrays)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_fingerprint(self) -> None:
        """Raises `ResumeError` if the directory holds checkpoints of a different run."""
        step = self.latest_step()
        if step is None:
            return
        saved = self.metadata(step)["fingerprint"]
        if saved != self.fingerprint:
            diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in diff)
            raise errors.ResumeError(
                f"{self.directory} holds checkpoints of a different run ({details}). Resume with the "
                "same model and method settings, or pass a new output directory.")

    def save(self, step: int, state: Any, *, extra: dict | None = None) -> None:
        """Writes ``state`` (any pytree of arrays) and JSON-able ``extra`` as checkpoint ``step``."""
        meta = {"fingerprint": self.fingerprint, "extra": extra or {}}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flatten(state)), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """``(step, state, extra)`` of checkpoint ``step`` (newest by default), in ``template``'s structure."""
        self.check_fingerprint()
        step = self.latest_step() if step is None else step
        if step is None:
            raise errors.ResumeError(f"no finished checkpoint in {self.directory} to resume from")
        abstract = {path: jax.ShapeDtypeStruct(np.shape(a), a.dtype) for path, a in _flatten(template).items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return step, _unflatten(template, restored["state"]), restored["meta"]["extra"]

    def close(self) -> None:
        self._manager.close()


@dataclasses.dataclass
class TrainingState:
    """What a training loop needs to continue exactly where a checkpoint was taken.

    Attributes:
        step: optimizer steps taken.
        trainable: trainable params after ``step`` steps.
        opt_state: optimizer state after ``step`` steps.
        rng: the loop's RNG key (``None`` if it had none).
        data_position: where the next batch comes from, as the batch iterator's
            ``position.to_dict()`` (``None`` if the iterator has no position).
    """

    step: int
    trainable: Any
    opt_state: Any
    rng: jax.Array | None = None
    data_position: Mapping[str, Any] | None = None


def save_training_state(checkpointer: Checkpointer, state: TrainingState) -> None:
    """Writes ``state`` as checkpoint ``state.step`` (only what trains; never the frozen base)."""
    tree = {"trainable": state.trainable, "opt_state": state.opt_state}
    if state.rng is not None:
        tree["rng"] = state.rng
    position = None if state.data_position is None else dict(state.data_position)
    checkpointer.save(state.step, tree, extra={"data_position": position,
                                               "has_rng": state.rng is not None})


def restore_training_state(checkpointer: Checkpointer, trainable: Any, opt_state: Any, *,
                           rng: jax.Array | None = None, step: int | None = None
                           ) -> TrainingState:
    """The newest (or ``step``'s) `TrainingState`, in the structure of the given templates.

    Args:
        checkpointer: where the checkpoints are.
        trainable, opt_state: templates (freshly initialized values of the same run).
        rng: template of the RNG key, if the run has one.
        step: a specific checkpoint (default: the newest finished one).

    Raises:
        ResumeError: no finished checkpoint, checkpoints of a different run (fingerprint), or a
            checkpoint saved with(out) an RNG key where the run has none (one).
    """
    template = {"trainable": trainable, "opt_state": opt_state}
    if rng is not None:
        template["rng"] = rng
    checkpointer.check_fingerprint()
    latest = checkpointer.latest_step() if step is None else step
    if latest is None:
        raise errors.ResumeError(f"no finished checkpoint in {checkpointer.directory} to resume "
                                 "from; start without resume, or point at the run's directory")
    meta = checkpointer.metadata(latest)["extra"]
    if bool(meta.get("has_rng")) != (rng is not None):
        raise errors.ResumeError(
            f"checkpoint {latest} in {checkpointer.directory} was saved "
            f"{'with' if meta.get('has_rng') else 'without'} an RNG key, the run resuming it "
            f"has {'one' if rng is not None else 'none'}: resume with the same dropout settings")
    saved_step, tree, extra = checkpointer.restore(template, latest)
    return TrainingState(saved_step, tree["trainable"], tree["opt_state"], tree.get("rng"),
                         extra.get("data_position"))
