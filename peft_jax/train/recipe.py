"""The `peft-jax train` recipe: LoRA-tune an encoder classifier and report it against baselines
(a decoder goes to the language-model recipe, `peft_jax.train.lm_recipe`).

`run` validates everything it can first (settings, model and dataset names, target selectors,
the output directory) so bad input fails before any compile and before anything is written. Then
it computes the majority-class and linear-probe baselines on the frozen encoder, trains with
`peft_jax.train.fit`, and writes to the output directory:

* ``adapter/``: peft_jax's ``peft_jax_adapter.{json,safetensors}`` (`peft_jax.load_adapter`, which
  checks the base) and HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, atomic,
* ``metrics.jsonl``: training and evaluation records,
* ``metrics.png``: loss and accuracy curves with the baselines,
* ``results.json``: accuracies, parameter counts, wall time and every setting (atomic),
* ``checkpoints/``: training checkpoints (orbax; the last ``keep``), which ``resume`` continues
  from: the resumed run ends with the same adapter, bit for bit, as one that never stopped.

Periodic evaluation (``eval_*`` records) runs on the validation split (``val_fraction`` of the
training data, seeded) to show the learning curve; the test split is evaluated once, after the
last step: ``test_accuracy``, ``test_macro_f1``, per-class precision / recall and the confusion
matrix are those of the final parameters.

Example:
    >>> results = run(TrainSettings(out="runs/default"))  # doctest: +SKIP
    >>> results["test_accuracy"] > results["linear_probe_accuracy"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from peft_jax import data, errors, models
from peft_jax import nnx as peft_nnx
from peft_jax.core.paths import tree_items
from peft_jax.train import lm_recipe
from peft_jax.train.baselines import baselines
from peft_jax.train.classify import (
    Forward,
    FullForward,
    frozen_features,
    make_classification_eval,
    make_classification_loss,
)
from peft_jax.train.head_init import fit_linear_head
from peft_jax.train.parts import split_model
from peft_jax.train.prefix_cache import PrefixForward, cache_prefix, frozen_depth
from peft_jax.train.runs import (
    ADAPTER_NAME,
    CLIP_NORM,
    Prepared,
    describe_method,
    lr_schedule,
    method_config,
    optimizer,
    out_dir,
    resume_step,
    run_mesh,
    run_record,
    save_adapter,
    train,
    train_step,
    write_results,
)
from peft_jax.train.scores import classification_scores
from peft_jax.train.settings import TrainSettings

__all__ = ["CLIP_NORM", "Prepared", "optimizer", "prepare", "run"]

CACHE_LIMIT_BYTES = 4 * 2**30  # cached prefix states beyond this: recompute them every step


def prepare(settings: TrainSettings) -> Prepared:
    """Resolves names and checks the run can start; loads nothing heavy and writes nothing.

    Raises:
        UnknownNameError: an unknown model or dataset name (the known ones are listed).
        MissingPackageError: a named model or dataset whose package is not installed.
        UnsupportedArchitectureError: a model that is not a BERT-family encoder.
        InvalidConfigError: a bad selector, layers the model lacks, or a non-empty output
            directory (without ``resume``).
        MeshError, BatchError: a mesh that does not fit the devices or the batch size.
        ResumeError: ``resume`` with a checkpoint of a different run.
    """
    checkpoint = models.resolve(settings.model)
    if checkpoint.family == "decoder":
        return lm_recipe.prepare(settings, checkpoint)
    if checkpoint.kind != "hf_dir":
        raise errors.UnsupportedArchitectureError(
            f"peft-jax train fine-tunes BERT-family encoder classifiers from HF-layout "
            f"directories; {settings.model!r} is a {checkpoint.family} ({checkpoint.kind})")
    dataset = data.load_dataset(
        settings.data, text_column=settings.text_column, label_column=settings.label_column,
        test_fraction=settings.test_fraction, seed=settings.seed,
    ).with_validation(settings.val_fraction, settings.seed)
    num_layers = models.read_config(checkpoint.path).get("num_hidden_layers")
    config = method_config(settings, "encoder", num_layers)
    mesh = run_mesh(settings)
    out = out_dir(settings)
    return Prepared(settings, checkpoint, dataset, out, config, mesh, resume_step(settings, out))


def _init_head(model: Any, kernel: np.ndarray, bias: np.ndarray) -> None:
    head = model.classifier
    if isinstance(head, peft_nnx.AdaptedLayer):  # modules_to_save: the trained copy
        head = getattr(head, ADAPTER_NAME)
    head.kernel[...] = kernel.astype(head.kernel[...].dtype)
    head.bias[...] = bias.astype(head.bias[...].dtype)


def _inputs(model: Any, parts: Any, settings: TrainSettings, splits: dict[str, dict],
            say: Callable[[str], None]) -> tuple[Forward, dict[str, dict]]:
    """The forward path and the arrays it reads per split: cached prefix states when that
    pays off."""
    depth = frozen_depth(model, [p for p, _ in tree_items(parts.trainable)])
    rows = sum(len(arrays["input_ids"]) for arrays in splits.values())
    length = splits["train"]["input_ids"].shape[1]
    cache_bytes = 4 * rows * length * model.backbone.config.hidden_size
    if not settings.cache_prefix or depth == 0:
        return FullForward(), splits
    if cache_bytes > CACHE_LIMIT_BYTES:
        say(f"not caching the frozen layers 0..{depth - 1}: {cache_bytes / 2**30:.1f} GiB > "
            f"{CACHE_LIMIT_BYTES / 2**30:.0f} GiB")
        return FullForward(), splits
    t0 = time.perf_counter()
    kw = dict(batch_size=settings.eval_batch_size, bucket=settings.bucket)
    cached = {name: {"hidden": cache_prefix(model, arrays, depth, **kw),
                     "attention_mask": arrays["attention_mask"], "labels": arrays["labels"]}
              for name, arrays in splits.items()}
    say(f"cached the frozen embeddings + layers 0..{depth - 1} ({cache_bytes / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t0:.1f}s); training runs layers {depth}.. only")
    return PrefixForward(depth), cached


def run(settings: TrainSettings, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Runs the whole recipe and returns the contents of ``results.json``.

    Args:
        settings: the run's `TrainSettings`.
        log: where progress lines go (``None``: silent).

    Raises:
        Everything `prepare` raises, before any work; `NonFiniteLossError` if training diverges.
    """
    if models.resolve(settings.model).family == "decoder":
        return lm_recipe.run(settings, log=log)
    say = log or (lambda _: None)
    t_start = time.perf_counter()
    prep = prepare(settings)
    s, dataset = settings, prep.dataset
    if s.resume and prep.resume_step is None:
        say(f"--resume: no checkpoint in {prep.checkpoint_dir} yet; starting from step 0")
    tokenizer = models.load_tokenizer(prep.checkpoint.path)
    model = models.load_encoder(prep.checkpoint.path, "float32", num_labels=dataset.num_labels,
                                seed=s.seed)
    peft_nnx.attach(model, prep.config, rngs=nnx.Rngs(params=s.seed, dropout=s.seed + 1),
                    name=ADAPTER_NAME)
    summary = peft_nnx.summary(model)
    say(f"model {s.model} | data {s.data} ({len(dataset.train)} train / {len(dataset.val)} "
        f"val / {len(dataset.test)} test) | {describe_method(s)}"
        f"{f' layers {s.layers}' if s.layers else ''} | {summary}")

    arrays = {name: data.tokenize_examples(tokenizer, examples, s.max_length)
              for name, examples in (("train", dataset.train), ("val", dataset.val),
                                     ("test", dataset.test)) if examples}
    train_arrays, test_arrays = arrays["train"], arrays["test"]
    parts = split_model(model)
    forward, inputs = _inputs(model, parts, s, arrays, say)
    train_inputs, test_inputs = inputs["train"], inputs["test"]
    t0 = time.perf_counter()
    kw = dict(forward=forward, batch_size=s.eval_batch_size, bucket=s.bucket)
    train_feats = frozen_features(model, train_inputs, **kw)
    test_feats = frozen_features(model, test_inputs, **kw)
    base = baselines(train_feats, train_arrays["labels"], test_feats, test_arrays["labels"],
                     seed=s.seed)
    baseline_seconds = time.perf_counter() - t0
    say(f"baselines: majority {base.majority_accuracy:.4f} | linear probe "
        f"{base.linear_probe_accuracy:.4f} ({baseline_seconds:.1f}s)")
    if s.head_init == "probe":
        kernel, bias = fit_linear_head(train_feats, train_arrays["labels"],
                                       num_classes=dataset.num_labels)
        _init_head(model, kernel, bias)
        parts = split_model(model)

    model.eval()  # evaluation: no LoRA dropout
    eval_parts = split_model(model)
    steps_per_epoch = len(train_inputs["labels"]) // s.batch_size
    num_steps = s.steps or max(1, math.ceil(s.epochs * steps_per_epoch))
    eval_every = steps_per_epoch if s.eval_every is None else s.eval_every
    if "val" not in inputs:  # no validation split: the test split is read once, at the end
        eval_every = 0
    schedule = lr_schedule(s, num_steps)
    model_loss = make_classification_loss(forward, model_dropout=s.model_dropout)
    step, trainable, frozen = train_step(parts, model_loss, schedule, s, prep.mesh)
    evaluate = (make_classification_eval(eval_parts, frozen, inputs["val"], **kw)
                if "val" in inputs else None)
    evaluate_test = make_classification_eval(eval_parts, frozen, test_inputs,
                                             num_classes=dataset.num_labels, **kw)
    rng = jax.random.key(s.seed + 2) if s.model_dropout or s.lora_dropout > 0 else None

    result = train(prep, step, trainable, frozen, train_inputs, evaluate=evaluate, rng=rng,
                    num_steps=num_steps, eval_every=eval_every, log=log)
    final = evaluate_test(result.trainable)
    scores = classification_scores(final.pop("confusion"), dataset.label_names)
    say(f"test: accuracy {final['accuracy']:.4f} | loss {final['loss']:.4f} | macro-F1 "
        f"{scores['macro_f1']:.4f}")
    nnx.update(model, jax.device_get(result.trainable))
    formats = save_adapter(model, prep, say, task_type="SEQ_CLS",
                           model_kwargs={"num_labels": dataset.num_labels})
    train_tokens = [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
    results = {
        "method": s.method,
        "model": s.model,
        "data": s.data,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": summary.percent,
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "test_macro_f1": scores["macro_f1"],
        "test_per_class": scores["per_class"],
        "test_confusion_matrix": scores["confusion_matrix"],
        "label_names": scores["labels"],
        "val_accuracy": (result.last_eval or {}).get("accuracy"),
        "val_loss": (result.last_eval or {}).get("loss"),
        "majority_accuracy": base.majority_accuracy,
        "linear_probe_accuracy": base.linear_probe_accuracy,
        "steps": result.step,
        "epochs": result.step / steps_per_epoch,
        "baseline_seconds": baseline_seconds,
        "mean_tokens_per_s": float(np.mean(train_tokens)) if train_tokens else None,
        "prefix_cache_depth": getattr(forward, "depth", 0),
        "num_train": len(dataset.train),
        "num_val": len(dataset.val),
        "num_test": len(dataset.test),
        **run_record(prep, result, formats, t_start),
    }
    write_results(prep, results, baselines={"linear probe": base.linear_probe_accuracy,
                                            "majority": base.majority_accuracy})
    say(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    """The human summary of a run (printed at its end).

    Example:
        >>> print(report({"method": "lora", "test_accuracy": 0.86, "linear_probe_accuracy": 0.78,
        ...     "majority_accuracy": 0.66, "trainable_params": 10, "total_params": 1000,
        ...     "trainable_percent": 1.0, "wall_seconds": 5.0, "train_seconds": 3.0}))
        test accuracy   lora 0.8600 | linear probe 0.7800 | majority class 0.6600
        lora - probe    +8.00 points
        trainable       10 of 1,000 params (1.0000%)
        wall time       5.0 s (training 3.0 s)
    """
    acc, probe = results["test_accuracy"], results["linear_probe_accuracy"]
    gain = f"{100 * (acc - probe):+.2f} points" if acc is not None else "n/a"
    acc_text = f"{acc:.4f}" if acc is not None else "n/a"
    return "\n".join([
        f"test accuracy   {results['method']} {acc_text} | linear probe {probe:.4f} | "
        f"majority class {results['majority_accuracy']:.4f}",
        f"{results['method']} - probe    {gain}",
        *([f"test macro-F1   {results['test_macro_f1']:.4f}"] if "test_macro_f1" in results
          else []),
        f"trainable       {results['trainable_params']:,} of {results['total_params']:,} params "
        f"({results['trainable_percent']:.4f}%)",
        f"wall time       {results['wall_seconds']:.1f} s "
        f"(training {results['train_seconds']:.1f} s)",
    ])
