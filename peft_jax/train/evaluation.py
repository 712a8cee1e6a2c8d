"""`peft-jax eval` and `peft-jax predict`: a finished run's adapter on a dataset or a file of texts.

A run directory holds ``results.json`` (its settings and label names) and ``adapter/``; from them
`load_run` rebuilds the base model, attaches the adapter (`peft_jax.load_adapter`, which checks
the base is the one it was trained on) and the tokenizer. Then:

* `evaluate_run`: a classifier's accuracy, macro-F1, per-class precision / recall / F1 and
  confusion matrix, or a language model's perplexity, on the run's own test split or on another
  dataset (all of whose rows are then evaluated);
* `predict_run`: one JSON line per input text: the label and class probabilities, or the greedy
  continuation of a language model.

Example:
    >>> evaluate_run("runs/default")["accuracy"]  # doctest: +SKIP
    0.8355
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from peft_jax import data, errors, io, models
from peft_jax.io.saving import load_adapter
from peft_jax.train.classify import make_classification_eval
from peft_jax.train.parts import split_model
from peft_jax.train.scores import classification_scores
from peft_jax.train.settings import TrainSettings

__all__ = ["LoadedRun", "evaluate_run", "load_run", "predict_run"]


@dataclasses.dataclass
class LoadedRun:
    """A run's settings, its model with the adapter loaded (evaluation mode), its tokenizer."""

    settings: TrainSettings
    family: str
    model: Any
    tokenizer: Any
    label_names: tuple[str, ...] = ()


def _results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file() or not (run_dir / "adapter").is_dir():
        raise errors.CheckpointError(
            f"{run_dir} is not a finished `peft-jax train` run: it needs results.json and adapter/ "
            "(pass the --out directory of a run that completed)")
    return json.loads(path.read_text())


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuilds the run's model with its adapter.

    Raises:
        CheckpointError: not a finished run, or an adapter that does not fit the base.
        MissingPackageError: the base model's package is not installed.
    """
    run_dir = Path(run_dir)
    results = _results(run_dir)
    names = set(TrainSettings.field_names())
    settings = TrainSettings(**{k: v for k, v in results["settings"].items() if k in names})
    checkpoint = models.resolve(settings.model)
    if checkpoint.family == "decoder":
        from peft_jax.models.lm_tokenizer import load_lm_tokenizer  # noqa: PLC0415

        model, tokenizer, labels = models.load(checkpoint.path, "float32"), load_lm_tokenizer(checkpoint.path), ()
    else:
        labels = tuple(results["label_names"])
        model = models.load_encoder(checkpoint.path, "float32", num_labels=len(labels), seed=settings.seed)
        tokenizer = models.load_tokenizer(checkpoint.path)
    load_adapter(model, run_dir / "adapter")
    model.eval()
    return LoadedRun(settings, checkpoint.family, model, tokenizer, labels)


def _classification_examples(run: LoadedRun, data_path: str | None) -> list[tuple[str, int]]:
    """The run's test split, or every row of another table (its labels must be the run's)."""
    s = run.settings
    if data_path is not None and Path(data_path).is_file():
        from peft_jax.data.tables import read_rows  # noqa: PLC0415

        rows = read_rows(data_path, s.text_column, s.label_column)
        unknown = sorted({label for _, label in rows} - set(run.label_names))
        if unknown:
            raise errors.DataError(f"{data_path}: labels {unknown} are not the run's "
                                   f"{list(run.label_names)}; the classifier only knows those")
        return [(text, run.label_names.index(label)) for text, label in rows]
    dataset = data.load_dataset(data_path or s.data, text_column=s.text_column,
                                label_column=s.label_column, test_fraction=s.test_fraction,
                                seed=s.seed)
    if dataset.label_names != run.label_names:
        raise errors.DataError(f"{data_path}: its labels {list(dataset.label_names)} are not the "
                               f"run's {list(run.label_names)}; the classifier only knows those")
    return dataset.test if data_path is None else dataset.train + dataset.val + dataset.test


def evaluate_run(run_dir: str | os.PathLike, data_path: str | None = None, *,
                 batch_size: int | None = None) -> dict[str, Any]:
    """Scores of the run's adapter on ``data_path`` (default: the run's own test split).

    Returns:
        classification: `peft_jax.train.scores.classification_scores` plus ``loss`` and
        ``num_examples``; language model: ``loss``, ``perplexity``, ``tokens`` and ``rows``.

    Raises:
        CheckpointError, DataError, UnknownNameError, MissingPackageError.
    """
    run = load_run(run_dir)
    s = run.settings
    parts = split_model(run.model)
    size = batch_size or s.eval_batch_size
    if run.family == "decoder":
        from peft_jax.data.lm_data import load_lm_dataset  # noqa: PLC0415
        from peft_jax.train.lm_loss import make_lm_eval  # noqa: PLC0415

        fractions = dict(val_fraction=s.val_fraction, test_fraction=s.test_fraction) if data_path is None \
            else dict(val_fraction=0.0, test_fraction=0.0)
        dataset = load_lm_dataset(data_path or s.data, run.tokenizer, block_length=s.max_length,
                                  seed=s.seed, **fractions)
        arrays = dataset.test if data_path is None else dataset.train
        result = make_lm_eval(parts, parts.frozen, arrays, batch_size=size, bucket=s.bucket)(parts.trainable)
        return result | {"rows": len(arrays["input_ids"])}
    examples = _classification_examples(run, data_path)
    arrays = data.tokenize_examples(run.tokenizer, examples, s.max_length)
    result = make_classification_eval(parts, parts.frozen, arrays, batch_size=size, bucket=s.bucket,
                                      num_classes=len(run.label_names))(parts.trainable)
    scores = classification_scores(result["confusion"], run.label_names)
    return scores | {"loss": result["loss"], "num_examples": len(examples)}


def _read_texts(path: Path) -> list[str]:
    from peft_jax.data.tables import jsonl_records, read_utf8  # noqa: PLC0415

    text = read_utf8(path)
    if path.suffix.lower() == ".jsonl":
        rows = jsonl_records(path, text)
        missing = [n for n, r in rows if "text" not in r]
        if missing:
            raise errors.DataError(f"{path}: line {missing[0]} has no 'text' field")
        texts = [str(r["text"]) for _, r in rows]
    else:
        texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise errors.DataError(f"{path} holds no texts (one per line, or JSONL rows with 'text')")
    return texts


def predict_run(run_dir: str | os.PathLike, inputs: str | os.PathLike, out: str | os.PathLike, *,
                max_new_tokens: int = 32) -> int:
    """Writes one JSON line per text of ``inputs`` (a ``.txt`` with one per line, or a
    ``.jsonl`` with ``text``) to ``out``, atomically: ``{"text", "label", "probabilities"}`` for
    a classifier, ``{"text", "generation"}`` (greedy) for a language model. Returns the count.

    Raises:
        CheckpointError, DataError: a bad run directory or inputs file (before ``out`` is written).
    """
    run = load_run(run_dir)
    texts = _read_texts(Path(inputs))
    if run.family == "decoder":
        from peft_jax.models.generate_text import complete  # noqa: PLC0415

        rows = [{"text": t, "generation": g} for t, g in
                zip(texts, complete(run.model, run.tokenizer, texts, max_new_tokens=max_new_tokens),
                    strict=True)]
    else:
        s = run.settings
        arrays = data.tokenize_examples(run.tokenizer, [(t, 0) for t in texts], s.max_length)
        forward = nnx.jit(lambda model, ids, mask: jax.nn.softmax(model(ids, attention_mask=mask), -1))
        probs = np.concatenate([
            np.asarray(forward(run.model, arrays["input_ids"][i:i + s.eval_batch_size],
                               arrays["attention_mask"][i:i + s.eval_batch_size]))
            for i in range(0, len(texts), s.eval_batch_size)])
        rows = [{"text": t, "label": run.label_names[int(np.argmax(p))],
                 "probabilities": {n: round(float(q), 6) for n, q in zip(run.label_names, p, strict=True)}}
                for t, p in zip(texts, probs, strict=True)]
    io.write_text_atomic(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
