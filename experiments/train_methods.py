"""Short real training runs of the module / input PEFT methods on MiniLM-L6 + fine-food reviews.

Each method (bottleneck adapters, Compacter, prompt / P- / prefix tuning, LLaMA-Adapter, MAM,
UniPELT) is attached to
the real ``minilm-l6`` checkpoint together with a trained classifier head, trained for a short run
with the library's own path (`peft_jax.train.split_model`, `make_classification_loss`,
`peft_jax.make_train_step`, `peft_jax.train.fit`, `LengthBucketedBatches`,
`make_classification_eval`) and scored on the 1000 test reviews, against the majority class and
the frozen linear probe, both computed in the same run (`peft_jax.train.baselines.baselines` on
`frozen_features` of the unadapted encoder, as ``peft-jax train`` does).

As in ``peft-jax train`` the classifier starts from the linear probe (LP-FT, `fit_linear_head`)
and the optimizer is AdamW with 6% linear warmup then linear decay, global-norm clip 1.0
(`peft_jax.train.recipe.optimizer`); one learning rate per method, for the method's params and the
head alike (`METHODS`).

Example:
    python experiments/train_methods.py --methods seq_bn,prompt_tuning --steps 150 \\
        --out experiments/results/methods_minilm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

import peft_jax
from peft_jax import data, io, models
from peft_jax import nnx as peft_nnx
from peft_jax.models.encoder import ROLES
from peft_jax.train.baselines import baselines
from peft_jax.train.buckets import LengthBucketedBatches
from peft_jax.train.classify import frozen_features, make_classification_eval, make_classification_loss
from peft_jax.train.fit import fit
from peft_jax.train.head_init import fit_linear_head
from peft_jax.train.parts import split_model
from peft_jax.train.rank_allocation import allocate_ranks
from peft_jax.train.rank_report import rank_report, write_rank_report
from peft_jax.train.recipe import optimizer
from peft_jax.train.settings import TrainSettings

MODEL, DATA, MAX_LENGTH, BUCKET, EVAL_BATCH = "minilm-l6", "fine-foods", 128, 32, 64


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """A method's config factory and its training settings."""

    build: Callable[[int], Any]  # the number of steps -> the config
    lr: float
    describe: str


METHODS: dict[str, MethodRun] = {
    "seq_bn": MethodRun(lambda steps: peft_jax.adapters("seq_bn", roles=ROLES), 1e-3,
                        "Pfeiffer bottleneck after the FFN of all 6 layers, reduction 16"),
    "double_seq_bn": MethodRun(lambda steps: peft_jax.adapters("double_seq_bn", roles=ROLES), 1e-3,
                               "Houlsby: bottlenecks after attention and FFN, reduction 16"),
    "par_bn": MethodRun(lambda steps: peft_jax.adapters("par_bn", roles=ROLES), 1e-3,
                        "parallel bottleneck at the FFN, reduction 2, scaling 4"),
    "compacter": MethodRun(lambda steps: peft_jax.adapters("compacter", roles=ROLES), 3e-3,
                           "Compacter (PHM n=4, rank 1) after attention and FFN, reduction 32"),
    "compacter++": MethodRun(lambda steps: peft_jax.adapters("compacter++", roles=ROLES), 3e-3,
                             "Compacter++ (PHM n=4, rank 1) after the FFN, reduction 32"),
    "prompt_tuning": MethodRun(lambda steps: peft_jax.prompt_tuning(20, prompt_init="vocab"), 3e-2,
                               "20 virtual tokens, initialized from random vocabulary rows"),
    "p_tuning": MethodRun(lambda steps: peft_jax.p_tuning(20, encoder="mlp"), 1e-2,
                          "20 virtual tokens from an MLP prompt encoder"),
    "prefix_tuning": MethodRun(lambda steps: peft_jax.prefix_tuning(20, projection=True), 5e-3,
                               "20-token prefix on every attention, MLP reparameterization"),
    "prefix_tuning_lr1e-3": MethodRun(lambda steps: peft_jax.prefix_tuning(20, projection=True), 1e-3,
                                      "as prefix_tuning (positions shifted as HF PEFT), lr 1e-3"),
    "prefix_tuning_fixed_positions": MethodRun(
        lambda steps: peft_jax.prefix_tuning(20, projection=True, count_positions=False), 1e-3,
        "as prefix_tuning_lr1e-3, real tokens keep positions 0.. (AdapterHub's convention)"),
    "llama_adapter": MethodRun(lambda steps: peft_jax.llama_adapter(10, adapter_layers=6), 5e-3,
                               "LLaMA-Adapter: 10 adaption prompts, zero-init gate, all 6 layers"),
    "unipelt": MethodRun(lambda steps: peft_jax.unipelt(roles=ROLES, lora_targets=["query", "value"]),
                         1e-3, "UniPELT: gated prefix 10 + gated seq_bn (reduction 16) + "
                               "gated LoRA r8 on query/value"),
    "seq_bn_drop2": MethodRun(
        lambda steps: peft_jax.adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), 2, roles=ROLES), 1e-3,
        "AdapterDrop: seq_bn in layers 2-5 only (none in the lowest 2)"),
    "seq_bn_drop4": MethodRun(
        lambda steps: peft_jax.adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), 4, roles=ROLES), 1e-3,
        "AdapterDrop: seq_bn in layers 4-5 only (none in the lowest 4)"),
    "adalora": MethodRun(
        lambda steps: peft_jax.place(["query", "value"], peft_jax.AdaLora(
            init_r=12, target_r=8, alpha=16.0, tinit=10, tfinal=30, delta_t=5, total_step=steps)),
        3e-3, "AdaLoRA on query/value: init_r 12 -> average rank 8 (tinit 10, tfinal 30, deltaT 5)"),
    "lora_qv_r8": MethodRun(
        lambda steps: peft_jax.LoraConfig(targets=["query", "value"], rank=8, alpha=16.0), 3e-3,
        "LoRA r8 alpha 16 on query/value (AdaLoRA's comparator)"),
    "mam": MethodRun(lambda steps: peft_jax.mam(roles=ROLES), 1e-3,
                     "MAM: prefix 30 (MLP 800) + parallel FFN adapter (reduction 2)"),
}
DEFAULT_METHODS = "seq_bn,double_seq_bn,par_bn,compacter++,prompt_tuning,prefix_tuning,mam"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def attach(model: Any, config: Any, seed: int) -> tuple[str, str]:
    """Attaches ``config`` and a trained head; returns ``(mode, head adapter name)``.

    Runs recorded before 2026-12-02 04:30 UTC (``methods_minilm.json``) attached configs with an
    input tap (prompt / prefix tuning) to ``model.backbone`` and the head as a second adapter,
    to work around an ``embed_path`` lookup bug fixed in commit aa0b79e; the model computes the
    same function either way, and ``compose(method, head)`` on the classifier is used for all now.
    """
    head = peft_jax.place(["classifier"], peft_jax.methods.ModulesToSave())
    peft_nnx.attach(model, peft_jax.compose(config, head),
                    rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    return "compose(method, head) on the classifier", "default"


def init_head(model: Any, name: str, kernel: np.ndarray, bias: np.ndarray) -> None:
    head = getattr(model.classifier, name)  # the trained copy (ModulesToSave)
    head.kernel[...] = kernel.astype(head.kernel[...].dtype)
    head.bias[...] = bias.astype(head.bias[...].dtype)


def run_method(name: str, *, path: Any, num_labels: int, train: dict, test: dict,
               head_init: tuple[np.ndarray, np.ndarray], steps: int, batch_size: int,
               lr: float | None, seed: int, log_every: int) -> dict[str, Any]:
    spec = METHODS[name]
    lr = spec.lr if lr is None else lr
    t0 = time.perf_counter()
    model = models.load_encoder(path, "float32", num_labels=num_labels, seed=seed)
    config = spec.build(steps)
    mode, head_name = attach(model, config, seed)
    adalora = next((p.method for p in config.placements() if isinstance(p.method, peft_jax.AdaLora)), None)
    summary = peft_nnx.summary(model)
    init_head(model, head_name, *head_init)
    parts = split_model(model)
    model.eval()
    eval_parts = split_model(model)
    settings = TrainSettings(lr=lr, steps=steps, batch_size=batch_size, seed=seed)
    tx = optimizer(settings, steps)
    if adalora is not None:
        tx = allocate_ranks(tx, adalora)
    step = peft_jax.make_train_step(parts.loss(make_classification_loss()), tx, has_aux=True)
    evaluate = make_classification_eval(eval_parts, parts.frozen, test, batch_size=EVAL_BATCH,
                                        bucket=BUCKET)
    batches = LengthBucketedBatches(train, batch_size, seed=seed, bucket=BUCKET)
    print(f"[{name}] {spec.describe} | {summary} | lr {lr} batch {batch_size} steps {steps}",
          flush=True)
    result = fit(step, parts.trainable, step.init(parts.trainable), parts.frozen, batches,
                 num_steps=steps, evaluate=evaluate, eval_every=0, log_every=log_every,
                 rng=jax.random.key(seed + 2), log=lambda s: print(f"[{name}] {s}", flush=True),
                 progress=False)
    final = result.last_eval or {}
    extra: dict[str, Any] = {}
    if adalora is not None:
        report_dir = Path(__file__).parent / "results" / "adalora_ranks" / f"{name}_seed{seed}"
        write_rank_report(report_dir, adalora, result.opt_state)
        report = rank_report(adalora, result.opt_state)
        nnx.update(model, result.trainable)
        peft_nnx.fold(model)  # -> plain LoRA with the ranks kept
        extra = {"ranks_kept": report["kept_total"], "rank_budget_target": report["budget_target"],
                 "ranks_by_layer": {x["path"]: x["rank"] for x in report["layers"]},
                 "trainable_params_after_fold": peft_nnx.summary(model).trainable,
                 "rank_report": str(report_dir.relative_to(Path(__file__).parent.parent))}
    train_records = [r for r in result.history if "loss" in r and "eval_accuracy" not in r]
    eval_records = [r for r in result.history if "eval_accuracy" in r]
    return {
        "method": name,
        "description": spec.describe,
        "config": [repr(p.method) for p in config.placements()],
        "attach": mode,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": summary.percent,
        "test_accuracy": final.get("accuracy"),
        "test_loss": final.get("loss"),
        "steps": result.step,
        "epochs": result.step / batches.steps_per_epoch,
        "batch_size": batch_size,
        "lr": lr,
        "train_seconds": result.train_seconds,
        "eval_seconds": eval_records[-1]["eval_seconds"] if eval_records else None,
        "wall_seconds": time.perf_counter() - t0,
        "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in train_records]))
        if train_records else None,
        "first_logged_train_loss": train_records[0]["loss"] if train_records else None,
        "last_logged_train_loss": train_records[-1]["loss"] if train_records else None,
        "last_logged_train_accuracy": train_records[-1].get("accuracy") if train_records else None,
        "seed": seed,
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="override every method's lr")
    p.add_argument("--seed", type=int, default=0, help="seed of the baselines (and of the runs)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: every method once per seed (default: --seed)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", default=None, help="JSON file (rewritten after every method)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {list(METHODS)}")

    t_start = time.perf_counter()
    record: dict[str, Any] = {
        "command": " ".join(["python", "experiments/train_methods.py", *sys.argv[1:]])
        if argv is None else " ".join(["python", "experiments/train_methods.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seed": args.seed,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "model": MODEL, "data": DATA, "max_length": MAX_LENGTH, "bucket": BUCKET,
        "optimizer": "AdamW (weight decay 0.01), 6% linear warmup then linear decay to 0, "
                     "global-norm clip 1.0 (peft_jax.train.recipe.optimizer)",
        "head_init": "linear probe (fit_linear_head on frozen mean-pooled features), as "
                     "peft-jax train's default",
        "model_dropout": False,
    }
    checkpoint = models.resolve(MODEL)
    dataset = data.load_dataset(DATA)
    tokenizer = models.load_tokenizer(checkpoint.path)
    train = data.tokenize_examples(tokenizer, dataset.train, MAX_LENGTH)
    test = data.tokenize_examples(tokenizer, dataset.test, MAX_LENGTH)

    t0 = time.perf_counter()
    base_model = models.load_encoder(checkpoint.path, "float32",
                                     num_labels=dataset.num_labels, seed=args.seed)
    kw = dict(batch_size=EVAL_BATCH, bucket=BUCKET)
    train_feats, test_feats = (frozen_features(base_model, a, **kw) for a in (train, test))
    base = baselines(train_feats, train["labels"], test_feats, test["labels"], seed=args.seed)
    head_init = fit_linear_head(train_feats, train["labels"], num_classes=dataset.num_labels)
    del base_model
    record["baselines"] = {
        "majority_accuracy": base.majority_accuracy,
        "linear_probe_accuracy": base.linear_probe_accuracy,
        "seconds": time.perf_counter() - t0,
        "how": "computed in this run: peft_jax.train.baselines.baselines on frozen_features "
               "(mean-pooled, L2-normalised) of the unadapted encoder",
    }
    print(f"baselines: majority {base.majority_accuracy:.4f} | linear probe "
          f"{base.linear_probe_accuracy:.4f} ({record['baselines']['seconds']:.1f}s)", flush=True)
    reference = Path(__file__).parent / "results" / "train_default.json"
    if reference.exists():
        ref = json.loads(reference.read_text())
        record["lora_reference"] = {k: ref.get(k) for k in (
            "test_accuracy", "trainable_params", "trainable_percent", "steps", "train_seconds")}
        record["lora_reference"]["file"] = "experiments/results/train_default.json"
        record["lora_reference"]["settings"] = "LoRA r8 a16 all-linear top 3 layers, batch 32, " \
                                               "lr 3e-3, prefix cache"
    record["runs"] = []
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    for seed, name in ((s, n) for s in seeds for n in names):
        out = run_method(name, path=checkpoint.path, num_labels=dataset.num_labels, train=train,
                         test=test, head_init=head_init, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=seed,
                         log_every=args.log_every)
        out["beats_probe"] = out["test_accuracy"] is not None and \
            out["test_accuracy"] > base.linear_probe_accuracy
        record["runs"].append(out)
        print(f"[{name}] test accuracy {out['test_accuracy']:.4f} (probe "
              f"{base.linear_probe_accuracy:.4f}) | {out['trainable_params']:,} trainable "
              f"({out['trainable_percent']:.3f}%) | train {out['train_seconds']:.0f}s", flush=True)
        record["load_average_end"] = list(os.getloadavg())
        record["wall_seconds"] = time.perf_counter() - t_start
        if args.out:
            io.write_json_atomic(Path(args.out), record)
    return record


if __name__ == "__main__":
    main()
