"""The `peft-jax train` recipe for causal language models: tune a decoder on text or chat data and
report held-out perplexity and sample generations before and after.

``peft-jax train --model smollm2-135m --data austen --steps 200`` (any HF-layout decoder directory
or ``.gguf`` file works as ``--model``; any ``.txt`` or ``.jsonl`` as ``--data``,
`peft_jax.data.lm_data`). The run validates and tokenizes everything first, so bad input fails
before any compile or write. Then it measures perplexity on the validation and test splits and
greedy generations for a few fixed prompts with the adapter off (it starts at zero), trains with
the shared checkpointed loop (`peft_jax.train.runs`: resumable bit for bit), and measures again.
The loss is the chunked next-token cross-entropy (`peft_jax.train.lm_loss`), so no step holds the
full ``[batch, seq, vocab]`` logits. It writes ``adapter/`` (peft_jax and HF PEFT ``CAUSAL_LM``
files), ``metrics.jsonl``, ``results.json`` (before the plot) and ``metrics.png``.

Example:
    >>> from peft_jax.train.settings import TrainSettings
    >>> s = TrainSettings.from_sources({}, {"model": "smollm2-135m", "steps": 50}, family="decoder")
    >>> results = run(s)  # doctest: +SKIP
    >>> results["test_perplexity_after"] < results["test_perplexity_before"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from peft_jax import errors, models
from peft_jax import nnx as peft_nnx
from peft_jax.data.lm_data import LanguageModelingData, load_lm_dataset
from peft_jax.models.generate_text import complete
from peft_jax.models.lm_tokenizer import load_lm_tokenizer
from peft_jax.train.lm_loss import make_lm_eval, make_lm_loss
from peft_jax.train.parts import split_model
from peft_jax.train.runs import (
    ADAPTER_NAME,
    Prepared,
    describe_method,
    lr_schedule,
    method_config,
    out_dir,
    resume_step,
    run_mesh,
    run_record,
    save_adapter,
    train,
    train_step,
    write_results,
)
from peft_jax.train.settings import TrainSettings
from peft_jax.train.sharding import DECODER_RULES

__all__ = ["SAMPLE_PROMPTS", "prepare", "run", "sample_prompts"]

# Fixed prompts whose greedy continuations are recorded before and after training.
SAMPLE_PROMPTS = {"austen": ("It is a truth universally acknowledged", "Emma Woodhouse, handsome,",
                             "My dear Mr. Bennet,")}
SAMPLE_TOKENS = 32


def _num_layers(checkpoint: models.ResolvedCheckpoint) -> int | None:
    if checkpoint.kind != "hf_dir":
        return None  # a GGUF's layer count is read with the model; --layers then needs numbers
    return models.read_config(checkpoint.path).get("num_hidden_layers")


def prepare(settings: TrainSettings, checkpoint: models.ResolvedCheckpoint | None = None) -> Prepared:
    """Resolves the model, reads and tokenizes the data, checks the output directory; loads no
    weights, compiles nothing and writes nothing.

    Raises:
        UnknownNameError, MissingPackageError: an unknown or uninstalled model or dataset.
        DataError: data that cannot be used (the file and line are named).
        InvalidConfigError: a bad selector or layer range, a non-empty ``out``.
        MeshError, BatchError, ResumeError: as `peft_jax.train.recipe.prepare`.
    """
    checkpoint = checkpoint or models.resolve(settings.model)
    if checkpoint.family != "decoder":
        raise errors.UnsupportedArchitectureError(
            f"{settings.model!r} is a {checkpoint.family}; the language-model recipe tunes decoders")
    tokenizer = load_lm_tokenizer(checkpoint.path)
    dataset = load_lm_dataset(settings.data, tokenizer, block_length=settings.max_length,
                              val_fraction=settings.val_fraction,
                              test_fraction=settings.test_fraction, seed=settings.seed)
    if dataset.rows("train") < settings.batch_size:
        raise errors.BatchError(
            f"{settings.data}: {dataset.rows('train')} training rows of {settings.max_length} tokens "
            f"are fewer than --batch-size {settings.batch_size}; give more data or a smaller batch")
    config = method_config(settings, "decoder", _num_layers(checkpoint))
    mesh = run_mesh(settings)
    out = out_dir(settings)
    return Prepared(settings, checkpoint, dataset, out, config, mesh, resume_step(settings, out),
                    tokenizer=tokenizer)


def sample_prompts(settings: TrainSettings, dataset: LanguageModelingData, tokenizer: Any,
                   count: int = 3) -> list[str]:
    """A named corpus's fixed prompts, else the start of the first held-out rows: for chat
    data, everything before the first completion token (the template's header included)."""
    if settings.data in SAMPLE_PROMPTS:
        return list(SAMPLE_PROMPTS[settings.data])
    split = next(s for s in ("test", "val", "train") if dataset.rows(s))
    arrays = dataset.split(split)
    prompts = []
    for row in range(min(count, dataset.rows(split))):
        ids, mask = arrays["input_ids"][row], arrays["loss_mask"][row]
        end = int(np.argmax(mask)) if dataset.kind == "chat" and mask.any() else 12
        prompts.append(tokenizer.decode(ids[:end], skip_special_tokens=dataset.kind != "chat"))
    return prompts


def _first_rows(arrays: dict[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
    return {k: v[:limit] for k, v in arrays.items()}


def run(settings: TrainSettings, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Runs the language-model recipe and returns the contents of ``results.json``.

    Raises:
        Everything `prepare` raises, before any work; `NonFiniteLossError` if training diverges.
    """
    say = log or (lambda _: None)
    t_start = time.perf_counter()
    prep = prepare(settings)
    s, dataset = settings, prep.dataset
    if s.resume and prep.resume_step is None:
        say(f"--resume: no checkpoint in {prep.checkpoint_dir} yet; starting from step 0")
    tokenizer = prep.tokenizer
    model = models.load(prep.checkpoint.path, "float32")
    peft_nnx.attach(model, prep.config, rngs=nnx.Rngs(params=s.seed, dropout=s.seed + 1),
                    name=ADAPTER_NAME)
    summary = peft_nnx.summary(model)
    splits = {name: dataset.rows(name) for name in ("train", "val", "test")}
    say(f"model {s.model} | data {s.data} ({dataset.kind}: {splits['train']} train / "
        f"{splits['val']} val / {splits['test']} test rows of {s.max_length} tokens) | "
        f"{describe_method(s)} | {summary}")
    if dataset.truncated:
        say(f"{dataset.truncated} example(s) longer than --max-length {s.max_length} were cut")

    parts = split_model(model)
    model.eval()
    eval_parts = split_model(model)
    kw = dict(batch_size=s.eval_batch_size, bucket=s.bucket)
    held_out = {name: make_lm_eval(eval_parts, parts.frozen, _first_rows(dataset.split(name), s.eval_rows),
                                   **kw) for name in ("val", "test") if splits[name]}
    prompts = sample_prompts(s, dataset, tokenizer)
    t0 = time.perf_counter()
    before = {name: evaluate(parts.trainable) for name, evaluate in held_out.items()}
    samples_before = complete(model, tokenizer, prompts, max_new_tokens=SAMPLE_TOKENS)
    baseline_seconds = time.perf_counter() - t0
    say("before: " + " | ".join(f"{n} perplexity {r['perplexity']:.3f}" for n, r in before.items())
        + f" ({baseline_seconds:.1f}s)")

    steps_per_epoch = max(1, splits["train"] // s.batch_size)
    num_steps = s.steps or max(1, round(s.epochs * steps_per_epoch))
    eval_every = 0 if "val" not in held_out else (s.eval_every if s.eval_every is not None
                                                  else max(1, num_steps // 4))
    schedule = lr_schedule(s, num_steps)
    step, trainable, frozen = train_step(parts, make_lm_loss(), schedule, s, prep.mesh, DECODER_RULES)
    rng = jax.random.key(s.seed + 2) if s.lora_dropout > 0 else None
    result = train(prep, step, trainable, frozen, dataset.train, evaluate=held_out.get("val"),
                   rng=rng, num_steps=num_steps, eval_every=eval_every, log=log)
    trained = jax.device_get(result.trainable)
    after = {name: evaluate(trained) for name, evaluate in held_out.items()}
    nnx.update(model, trained)
    samples_after = complete(model, tokenizer, prompts, max_new_tokens=SAMPLE_TOKENS)
    say("after:  " + " | ".join(f"{n} perplexity {r['perplexity']:.3f}" for n, r in after.items()))
    for prompt, old, new in zip(prompts, samples_before, samples_after, strict=True):
        say(f"sample {prompt!r}\n  before: {old!r}\n  after:  {new!r}")
    formats = save_adapter(model, prep, say, task_type="CAUSAL_LM")
    results = {
        "task": "causal-lm",
        "method": s.method,
        "model": s.model,
        "data": s.data,
        "data_kind": dataset.kind,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": summary.percent,
        **{f"{n}_{k}_{when}": r[k] for when, res in (("before", before), ("after", after))
           for n, r in res.items() for k in ("loss", "perplexity")},
        "eval_tokens": {n: r["tokens"] for n, r in before.items()},
        "samples": [{"prompt": p, "before": b, "after": a}
                    for p, b, a in zip(prompts, samples_before, samples_after, strict=True)],
        "steps": result.step,
        "epochs": result.step / steps_per_epoch,
        "baseline_seconds": baseline_seconds,
        "num_rows": splits,
        "truncated_examples": dataset.truncated,
        **run_record(prep, result, formats, t_start),
    }
    write_results(prep, results, metric="perplexity")
    return results
