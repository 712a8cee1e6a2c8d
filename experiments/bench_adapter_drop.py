"""AdapterDrop's speed on the real MiniLM-L6 encoder: step and inference time with 0, 2, 4 layers dropped.

For each ``n`` a Pfeiffer bottleneck (``seq_bn``) and a trained classifier copy are attached to
``minilm-l6`` with `peft_jax.adapter_drop` (no adapters in layers ``0 .. n-1``), and the library's
jitted train step (`peft_jax.make_train_step`, AdamW) and a jitted forward pass are timed on a
fixed batch of real reviews: ``--repeats`` timed calls after two warm-up calls, median reported,
rounds of the ``n`` values interleaved so that drift on a shared machine hits all alike.

Example:
    python experiments/bench_adapter_drop.py --out experiments/results/adapter_drop_bench.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

from train_methods import MODEL, cpu_model  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax import data, io, models  # noqa: E402
from peft_jax import nnx as peft_nnx  # noqa: E402
from peft_jax.models.encoder import ROLES  # noqa: E402
from peft_jax.train.classify import make_classification_loss  # noqa: E402
from peft_jax.train.parts import split_model  # noqa: E402


def build(path: str, n: int, num_labels: int) -> tuple[Any, Any]:
    model = models.load_encoder(path, "float32", num_labels=num_labels, seed=0)
    config = peft_jax.compose(peft_jax.adapter_drop(peft_jax.adapters("seq_bn", roles=ROLES), n, roles=ROLES),
                              peft_jax.place(["classifier"], peft_jax.methods.ModulesToSave()))
    peft_nnx.attach(model, config, rngs=nnx.Rngs(0))
    return model, peft_nnx.summary(model)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drops", default="0,2,4")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    drops = [int(x) for x in args.drops.split(",")]

    checkpoint = models.resolve(MODEL)
    dataset = data.load_dataset("fine-foods")
    tokenizer = models.load_tokenizer(checkpoint.path)
    rows = data.tokenize_examples(tokenizer, dataset.train[: args.eval_batch_size], args.max_length)
    rows = {k: jnp.asarray(np.asarray(v)) for k, v in rows.items()}
    train_batch = {k: v[: args.batch_size] for k, v in rows.items()}

    contenders = {}
    for n in drops:
        model, summary = build(checkpoint.path, n, dataset.num_labels)
        parts = split_model(model)
        tx = optax.adamw(1e-3)
        step = peft_jax.make_train_step(parts.loss(make_classification_loss()), tx, has_aux=True,
                                        donate=False)
        state = {"trainable": parts.trainable, "opt": step.init(parts.trainable)}

        def train(step=step, state=state, frozen=parts.frozen):
            return step(state["trainable"], state["opt"], frozen, train_batch)[2]["loss"]

        graphdef, trainable, frozen = peft_nnx.split(model)
        forward = jax.jit(lambda t, f: nnx.merge(graphdef, t, f)(rows["input_ids"], rows["attention_mask"]))

        def infer(forward=forward, trainable=trainable, frozen=frozen):
            return forward(trainable, frozen)

        for fn in (train, infer):  # compile + warm up
            fn()
            fn()
        contenders[n] = {"train": train, "infer": infer, "summary": summary, "step_s": [], "infer_s": []}
        print(f"drop {n}: {summary}", flush=True)

    for _ in range(args.rounds):
        for n, c in contenders.items():
            c["step_s"] += timed(c["train"], args.repeats)
            c["infer_s"] += timed(c["infer"], args.repeats)

    base = contenders[drops[0]]
    rows_out = []
    for n, c in contenders.items():
        step_s, infer_s = statistics.median(c["step_s"]), statistics.median(c["infer_s"])
        rows_out.append({
            "dropped_layers": n, "trainable_params": c["summary"].trainable,
            "median_step_s": step_s, "median_inference_s": infer_s,
            "step_speedup_vs_first": statistics.median(base["step_s"]) / step_s,
            "inference_speedup_vs_first": statistics.median(base["infer_s"]) / infer_s,
        })
        print(f"drop {n}: step {step_s * 1e3:.1f} ms | inference {infer_s * 1e3:.1f} ms", flush=True)
    record = {
        "command": " ".join(["python", "experiments/bench_adapter_drop.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
        "backend": jax.default_backend(), "jax_version": jax.__version__, "model": MODEL,
        "method": "seq_bn (reduction 16) + trained classifier copy, peft_jax.adapter_drop",
        "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "max_length": args.max_length, "repeats": args.repeats, "rounds": args.rounds,
        "optimizer": "optax.adamw(1e-3)", "results": rows_out,
    }
    if args.out:
        io.write_json_atomic(Path(args.out), record)
    return record


if __name__ == "__main__":
    main()
