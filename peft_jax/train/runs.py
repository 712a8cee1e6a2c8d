"""The mechanics every `peft-jax train` recipe shares: the output directory, the mesh, resuming,
the optimizer and its schedule, the compiled step, the checkpointed fit and the saved adapter.

The classification recipe (`peft_jax.train.recipe`) and the language-model recipe
(`peft_jax.train.lm_recipe`) differ in their data, loss and evaluation; everything here is the
same for both, so a run of either is resumable bit for bit and writes the same files.

Example:
    >>> from peft_jax.train.settings import TrainSettings
    >>> lr_schedule(TrainSettings(lr=1e-3, warmup=0.5), num_steps=4)(2)
    Array(0.001, dtype=float32, weak_type=True)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

from peft_jax import data, errors, io, models
from peft_jax.core import Rules
from peft_jax.train.buckets import LengthBucketedBatches
from peft_jax.train.checkpoint import Checkpointer, restore_training_state
from peft_jax.train.early_stopping import EarlyStopping
from peft_jax.train.fit import fit
from peft_jax.train.method_choice import METHOD_CHOICES, build_method
from peft_jax.train.metrics import MetricsLog, plot_metrics, read_metrics
from peft_jax.train.provenance import run_environment
from peft_jax.train.settings import TrainSettings
from peft_jax.train.sharding import ENCODER_RULES, batch_ways, make_mesh, make_sharded_train_step
from peft_jax.train.step import make_train_step

__all__ = ["ADAPTER_NAME", "CLIP_NORM", "Prepared", "describe_method", "lr_schedule", "method_config",
           "optimizer", "out_dir", "resume_step",
           "run_mesh", "run_record", "save_adapter", "stopped_early_at", "train", "train_step",
           "write_results"]

ADAPTER_NAME = "default"


@dataclasses.dataclass
class Prepared:
    """What a recipe's ``prepare`` resolved: settings, checkpoint, dataset (classification or
    language-modelling), the method's config, output directory, mesh and resume step."""

    settings: TrainSettings
    checkpoint: models.ResolvedCheckpoint
    dataset: Any
    out: Path
    config: Any  # the method's config (`method_config`)
    mesh: Any = None
    resume_step: int | None = None
    tokenizer: Any = None  # when ``prepare`` already loaded it (to tokenize the data)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"


def out_dir(settings: TrainSettings) -> Path:
    if settings.resume and not settings.out:
        raise errors.ResumeError("--resume continues the run in --out DIR; pass its --out")
    out = Path(settings.out) if settings.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise errors.InvalidConfigError(f"--out {out} exists and is not a directory")
    if settings.resume:
        return out
    if out.is_dir() and any(out.iterdir()) and not settings.overwrite:
        names = sorted(p.name for p in out.iterdir())[:6]
        raise errors.InvalidConfigError(
            f"--out {out} already holds files {names}; pass another --out, --resume to "
            "continue its run, or --overwrite to replace them")
    return out


def run_mesh(settings: TrainSettings) -> Any:
    """The device mesh (``None``: one device); its batch axes must divide the batch size."""
    shape = settings.mesh_shape()
    if shape is None:
        return None
    mesh = make_mesh(shape)
    ways = batch_ways(mesh)
    if settings.batch_size % ways:
        raise errors.BatchError(
            f"--batch-size {settings.batch_size} does not divide over the mesh's batch axes "
            f"(data x fsdp = {ways} ways); use a multiple of {ways}")
    return mesh



def resume_step(settings: TrainSettings, out: Path) -> int | None:
    """The step ``--resume`` continues from: ``None`` when there is no checkpoint yet (the run
    was stopped before its first save, so it starts from step 0, which makes a restart loop
    that always passes ``--resume`` work); refuses a foreign checkpoint."""
    directory = out / "checkpoints"
    if not settings.resume or not directory.is_dir():
        return None
    checkpointer = Checkpointer(str(directory), fingerprint=settings.fingerprint())
    step = checkpointer.latest_step()
    if step is not None:
        checkpointer.check_fingerprint()
    checkpointer.close()
    return step



CLIP_NORM = 1.0  # gradients are clipped to this global norm; the pre-clip norm is logged


def method_config(settings: TrainSettings, family: str, num_layers: int | None) -> Any:
    """The config ``settings.method`` names, on the targets ``settings`` select, with the trained
    ``modules_to_save`` (`peft_jax.train.method_choice.build_method`)."""
    return build_method(settings.method, settings.method_options, family=family,
                        targets=settings.target_selector(num_layers, family),
                        modules_to_save=settings.modules_to_save_selector(), num_layers=num_layers,
                        lora=dict(rank=settings.rank, alpha=settings.alpha, dropout=settings.lora_dropout))


def describe_method(settings: TrainSettings) -> str:
    """``"lora r=8 alpha=16.0 on all-linear"``, ``"prefix {'num_virtual_tokens': 10} at the taps"``.

    Example:
        >>> describe_method(TrainSettings(method="vera", method_options={"rank": 4}))
        "vera {'rank': 4} on all-linear"
    """
    s = settings
    if s.method in ("lora", "dora", "rslora", "pissa"):
        return f"{s.method} r={s.rank} alpha={s.alpha} on {s.targets}"
    where = "at the taps of every layer" if METHOD_CHOICES[s.method].at_taps else f"on {s.targets}"
    return f"{s.method}{f' {s.method_options}' if s.method_options else ''} {where}"


def lr_schedule(settings: TrainSettings, num_steps: int) -> optax.Schedule:
    """Linear warmup over ``settings.warmup`` of the steps, then linear decay to zero."""
    warmup = int(round(settings.warmup * num_steps))
    decay = optax.linear_schedule(settings.lr, 0.0, max(num_steps - warmup, 1))
    return decay if warmup == 0 else optax.join_schedules(
        [optax.linear_schedule(0.0, settings.lr, warmup), decay], [warmup])



def optimizer(settings: TrainSettings, num_steps: int) -> optax.GradientTransformation:
    """The recipe's optimizer as one optax transformation (clip to `CLIP_NORM`, then AdamW on
    the warmup-then-decay schedule), for loops of one's own; the recipe itself clips in the
    step (`StepOptions.clip_norm`) so that ``grad_norm`` and ``lr`` are logged. Same updates.

    Example:
        >>> tx = optimizer(TrainSettings(), num_steps=100)
        >>> callable(tx.update)
        True
    """
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM),
                       optax.adamw(lr_schedule(settings, num_steps), weight_decay=settings.weight_decay))


def train_step(parts: Any, model_loss: Callable, schedule: optax.Schedule,
               settings: TrainSettings, mesh: Any, rules: Rules = ENCODER_RULES
               ) -> tuple[Any, Any, Any]:
    """``(step, trainable, frozen)``: AdamW on ``schedule`` after clipping to `CLIP_NORM`, with
    ``lr`` and ``grad_norm`` in the step's metrics; jitted on one device, or over ``mesh`` with
    the params placed on their shardings (``rules``; adapters follow their base layers)."""
    loss = parts.loss(model_loss)
    tx = optax.adamw(schedule, weight_decay=settings.weight_decay)
    options = dict(has_aux=True, clip_norm=CLIP_NORM, lr_schedule=schedule)
    if mesh is None:
        return make_train_step(loss, tx, **options), parts.trainable, parts.frozen
    step = make_sharded_train_step(loss, tx, mesh, parts.trainable, parts.frozen,
                                   rules=rules, **options)
    trainable, frozen = step.place(parts.trainable, parts.frozen)
    return step, trainable, frozen


def _checkpointer(prep: Prepared) -> Checkpointer:
    """The run's `Checkpointer`; a fresh (``overwrite``) run first deletes old checkpoints."""
    if not prep.settings.resume and prep.checkpoint_dir.exists():
        shutil.rmtree(prep.checkpoint_dir)
    return Checkpointer(str(prep.checkpoint_dir), fingerprint=prep.settings.fingerprint(),
                        keep=prep.settings.keep)


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drops the records a killed run wrote after its last checkpoint (they are redone)."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        io.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def train(prep: Prepared, step: Any, trainable: Any, frozen: Any, train_inputs: dict, *,
           evaluate: Callable, rng: Any, num_steps: int, eval_every: int,
           log: Callable[[str], None] | None) -> Any:
    """Fits from step 0, or from the newest checkpoint with ``resume``; returns the `FitResult`."""
    s, say = prep.settings, log or (lambda _: None)
    opt_state = step.init(trainable)
    checkpointer = _checkpointer(prep)
    start, position = 0, data.DataPosition()
    if prep.resume_step is not None:
        state = restore_training_state(checkpointer, trainable, opt_state, rng=rng)
        start, trainable, opt_state, rng = state.step, state.trainable, state.opt_state, state.rng
        position = data.DataPosition.from_dict(state.data_position)
        if prep.mesh is not None:
            trainable = jax.device_put(trainable, step.trainable)
            opt_state = jax.device_put(opt_state, step.opt_state)
        _keep_metrics_until(prep.out / "metrics.jsonl", start)
        say(f"resuming from the checkpoint of step {start} in {prep.checkpoint_dir}")
    stopping = EarlyStopping(s.early_stopping) if s.early_stopping and evaluate is not None else None
    if stopping is not None and start and stopping.replay(read_metrics(prep.out / "metrics.jsonl"), start):
        say(f"the run stopped early at step {stopping.stopped_at}; nothing left to train")
        num_steps = start
    batches = LengthBucketedBatches(train_inputs, s.batch_size, seed=s.seed, bucket=s.bucket,
                                    position=position)
    epochs = num_steps / batches.steps_per_epoch
    say(f"training {num_steps} steps ({epochs:.2f} epochs of {batches.steps_per_epoch}), batch "
        f"{s.batch_size}, lr {s.lr}"
        f"{f', mesh {dict(prep.mesh.shape)}' if prep.mesh is not None else ''} -> {prep.out}")
    with MetricsLog(prep.out / "metrics.jsonl", append=start > 0) as metrics:
        result = fit(step, trainable, opt_state, frozen, batches,
                     num_steps=max(num_steps - start, 0), start_step=start, evaluate=evaluate,
                     eval_every=eval_every, log_every=s.log_every, log=log, metrics_log=metrics,
                     rng=rng, checkpointer=checkpointer, save_every=s.save_every,
                     should_stop=stopping)
    checkpointer.close()
    if stopping is not None and stopping.stopped_at is not None:
        say(f"stopped early at step {stopping.stopped_at}: validation {stopping.metric} has not "
            f"improved for {stopping.patience} evaluations (best {stopping.best:.4f} at step "
            f"{stopping.best_step})")
    return result


def stopped_early_at(out: Path) -> int | None:
    """The step at which the run in ``out`` stopped early (its ``metrics.jsonl`` says), if it did."""
    path = out / "metrics.jsonl"
    steps = [r["step"] for r in read_metrics(path) if r.get("stopped_early")] if path.exists() else []
    return steps[-1] if steps else None


def run_record(prep: Prepared, result: Any, formats: list[str], t_start: float) -> dict[str, Any]:
    """The part of ``results.json`` every recipe writes: resume / early-stop steps, times, the
    device and mesh, every setting, the adapter formats and `run_environment`."""
    return {
        "resumed_from_step": prep.resume_step,
        "stopped_early_at": stopped_early_at(prep.out),
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "mesh": dict(prep.mesh.shape) if prep.mesh is not None else None,
        "jax_version": jax.__version__,
        "settings": prep.settings.to_dict() | {"out": str(prep.out)},
        "adapter_formats": formats,
        "environment": run_environment(),  # versions, git revision, CPU / device, peak memory
    }


def write_results(prep: Prepared, results: dict[str, Any], **plot: Any) -> None:
    """Writes ``results.json`` (atomically), then ``metrics.png`` (`plot_metrics` with ``plot``):
    in that order, so a missing or broken matplotlib never loses the results."""
    io.write_json_atomic(prep.out / "results.json", results)
    s = prep.settings
    plot_metrics(read_metrics(prep.out / "metrics.jsonl"), prep.out / "metrics.png",
                 title=f"{describe_method(s)} | {s.model} / {s.data}", **plot)


def save_adapter(model: Any, prep: Prepared, say: Callable[[str], None], *, task_type: str,
                 model_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Writes ``adapter/`` in peft_jax's format and, where it can hold the adapter, HF PEFT's
    (``PeftModel.from_pretrained(base, out/"adapter")`` reads it); returns the formats written.

    ``task_type`` is HF PEFT's (``"SEQ_CLS"``, ``"CAUSAL_LM"``); ``model_kwargs`` rebuild the
    base at load time (``{"num_labels": 2}`` for a classifier).
    """
    common = dict(name=ADAPTER_NAME, base_model=prep.settings.model, model_kwargs=model_kwargs or {},
                  overwrite=True)
    try:
        io.save_formats(model, prep.out / "adapter", base_model_name_or_path=str(prep.checkpoint.path),
                        task_type=task_type, **common)
        return ["peft_jax", "hf-peft"]
    except errors.InvalidConfigError as e:
        say(f"adapter/: peft_jax format only; HF PEFT cannot hold this adapter ({e})")
        io.save_formats(model, prep.out / "adapter", formats=("peft_jax",), **common)
        return ["peft_jax"]
