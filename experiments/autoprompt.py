"""AutoPrompt on a frozen SmolLM2-135M, a zero-shot classifier of the fine-food reviews.

The frozen LM reads ``[trigger] review "\\nOverall, the product is"`` and the class is the larger of
the next-token logits of " great" (label ``great``) and " bad" (label ``other``); the loss is the
cross-entropy of those two logits. `peft_jax.prompts.search` looks for an ``N``-token trigger on a
subset of the TRAIN split; accuracies are measured on a held-out subset of the TEST split, never
used for searching or tuning, for (a) the found trigger, (b) a hand-written prompt of the same
token length, (c) a seeded random trigger (the search's starting point) and no trigger. Then
prompt tuning (same steps, batches and lr) starts from the found trigger, from the random trigger
and from the library's ``N(0, 1)`` init, and its loss curves and final accuracies are recorded.

Discrete prompts (a-c) are scored as real token ids put before the review; the script checks on
one batch that this equals the virtual-token path the search optimizes.

Example:
    python experiments/autoprompt.py  # writes experiments/results/autoprompt.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import peft_jax
from peft_jax import data, io, models
from peft_jax import nnx as peft_nnx
from peft_jax.models.lm_tokenizer import load_lm_tokenizer
from peft_jax.prompts import AutoPromptConfig, search

sys.path.insert(0, str(Path(__file__).parent))
from train_methods import cpu_model  # noqa: E402

MODEL, DATA = "smollm2-135m", "fine-foods"
HAND = "Review of a food product from Amazon:"  # 8 tokens with SmolLM2's tokenizer
SUFFIX = "\nOverall, the product is"
VERBALIZER = (" bad", " great")  # label 0 ("other"), label 1 ("great")
RESULTS = Path(__file__).parent / "results"


def encode(tok: Any, examples: list, prompt: tuple[int, ...], review_tokens: int) -> dict[str, np.ndarray]:
    """``prompt + review[:review_tokens] + SUFFIX`` as left-padded rows of one fixed length."""
    suffix = tok.encode(SUFFIX)
    length = len(prompt) + review_tokens + len(suffix)
    ids = np.full((len(examples), length), tok.pad_token_id, np.int32)
    mask = np.zeros((len(examples), length), np.int32)
    for row, (text, _) in enumerate(examples):
        seq = [*prompt, *tok.encode(text)[:review_tokens], *suffix]
        ids[row, length - len(seq):], mask[row, length - len(seq):] = seq, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.array([y for _, y in examples], np.int32)}


def make_loss(label_ids: jax.Array):
    def label_logits(model, batch):
        h, _ = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
        return model.logits(h[:, -1])[:, label_ids].astype(jnp.float32)

    def loss(model, batch):
        return optax.softmax_cross_entropy_with_integer_labels(label_logits(model, batch), batch["labels"]).mean()

    return label_logits, loss


def make_rank_loss(label_logits):
    """Pairwise logistic loss on ``logit(great) - logit(bad)`` over the batch's (great, other)
    pairs: a smooth AUC surrogate, blind to the bias between the two label words (0 for a
    batch with one class only)."""

    def loss(model, batch):
        logits = label_logits(model, batch)
        score = logits[:, 1] - logits[:, 0]
        great = batch["labels"] == 1
        pairs = (great[:, None] & ~great[None, :]).astype(jnp.float32)
        margins = jax.nn.softplus(-(score[:, None] - score[None, :]))
        return jnp.sum(pairs * margins) / jnp.maximum(jnp.sum(pairs), 1.0)

    return loss


def label_scores(model: nnx.Module, label_logits, arrays: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [n, 2], labels [n])`` over the whole batches of ``arrays``."""
    fn = nnx.jit(label_logits)
    n = len(arrays["labels"]) // batch_size * batch_size
    logits = np.concatenate([np.asarray(fn(model, {k: v[i:i + batch_size] for k, v in arrays.items()}))
                             for i in range(0, n, batch_size)])
    return logits, arrays["labels"][:n]


def auc(score: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``score`` for label 1 (ties count half): how well the prompt separates the
    classes whatever the threshold."""
    pos, neg = score[labels == 1], score[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def best_threshold(score: np.ndarray, labels: np.ndarray) -> float:
    """The cut on ``logit(great) - logit(bad)`` with the best accuracy on these (search) rows."""
    cuts = np.concatenate([[-np.inf], np.sort(score)])
    accs = [np.mean((score > c) == labels) for c in cuts]
    return float(cuts[int(np.argmax(accs))])


def evaluate(model: nnx.Module, label_logits, arrays: dict, batch_size: int,
             threshold: float | None = None) -> dict[str, float]:
    """Argmax accuracy, CE, AUC, and the accuracy at a threshold fitted on the search rows."""
    logits, labels = label_scores(model, label_logits, arrays, batch_size)
    n = len(labels)
    logp = logits - np.logaddexp(logits[:, 0], logits[:, 1])[:, None]
    score = logits[:, 1] - logits[:, 0]
    out = {"accuracy": float(np.mean(logits.argmax(-1) == labels)),
           "loss": float(-np.mean(logp[np.arange(n), labels])), "auc": auc(score, labels),
           "predicted_great": float(np.mean(logits.argmax(-1) == 1)), "examples": int(n)}
    if threshold is not None:
        out["calibrated_accuracy"] = float(np.mean((score > threshold) == labels))
        out["threshold"] = threshold
    return out


def calibrated(model: nnx.Module, label_logits, search_arrays: dict, test_arrays: dict,
               batch_size: int) -> dict[str, float]:
    """`evaluate` on the test rows with the threshold fitted on the search (TRAIN) rows."""
    logits, labels = label_scores(model, label_logits, search_arrays, batch_size)
    cut = best_threshold(logits[:, 1] - logits[:, 0], labels)
    return evaluate(model, label_logits, test_arrays, batch_size, threshold=cut)


def with_prompt(model: nnx.Module, placement: Any, seed: int) -> nnx.Module:
    copy = nnx.merge(*nnx.split(model))  # shares the frozen arrays
    peft_nnx.attach(copy, placement, rngs=nnx.Rngs(seed))
    return copy


def tune(model: nnx.Module, placement: Any, loss_fn, arrays: dict, *, steps: int, batch_size: int, lr: float,
         seed: int, label_logits, eval_every: int, eval_batch_size: int
         ) -> tuple[nnx.Module, list[float], list[tuple[int, float]]]:
    """Prompt tuning with Adam (only the prompt is trainable). Returns the model, the per-step
    batch losses, and ``(step, CE on all of arrays)`` every ``eval_every`` steps (from step 0)."""
    tuned = with_prompt(model, placement, seed)
    graphdef, trainable, frozen = peft_nnx.split(tuned)
    step = peft_jax.make_train_step(peft_nnx.make_loss(graphdef, loss_fn), optax.adam(lr))
    opt_state = step.init(trainable)
    batches = data.ShuffledBatches(arrays, batch_size, seed=seed)
    losses, curve = [], []
    for i in range(steps + 1):
        if i % eval_every == 0:
            nnx.update(tuned, trainable)
            curve.append((i, evaluate(tuned, label_logits, arrays, eval_batch_size)["loss"]))
        if i == steps:
            break
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, next(batches))
        losses.append(float(metrics["loss"]))
    nnx.update(tuned, trainable)
    return tuned, losses, curve


def candidate_vocabulary(tok: Any, vocab_size: int) -> tuple[int, ...]:
    """Ids that decode to printable ASCII with a letter, minus special tokens and the label words."""
    special = set(tok.tokenizer.get_added_tokens_decoder())
    labels = {w.strip().lower() for w in VERBALIZER}
    keep = []
    for i in range(vocab_size):
        text = tok.decode([i])
        if (i not in special and text.isascii() and text.isprintable() and any(c.isalpha() for c in text)
                and text.strip().lower() not in labels):
            keep.append(i)
    return tuple(keep)


def plot(record: dict, path: Path) -> str | None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(record["search"]["history"], marker=".")
    objective = record["settings"].get("objective", "ce")
    a.set(title="AutoPrompt search: batch loss of the kept trigger", xlabel="step", ylabel=f"search loss ({objective})")
    for name, run in record["prompt_tuning"].items():
        steps, values = zip(*run["curve"])
        b.plot(steps, values, marker="o", label=f"from {name} (test AUC {run['test']['auc']:.3f})")
    b.set(title=f"Prompt tuning, Adam lr {record['settings']['pt_lr']}", xlabel="step",
          ylabel=f"CE on the {record['settings']['search_examples']} search reviews")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.relpath(path)


def markdown(r: dict) -> str:
    s, acc = r["settings"], r["accuracy"]
    lines = [
        "# AutoPrompt on frozen SmolLM2-135M (fine-food reviews, zero-shot verbalizer)", "",
        f"Command: `{r['command']}`  ", f"Date: {r['date']}; CPU: {r['cpu_model']} ({r['cpu_count']} cores); "
        f"jax {r['jax_version']}; wall {r['wall_seconds']:.0f} s.", "",
        f"Input: `[trigger] review[:{s['review_tokens']} tokens] {SUFFIX!r}`; prediction: larger next-token logit of "
        f"{VERBALIZER[1]!r} (great) vs {VERBALIZER[0]!r} (other). Search on {s['search_examples']} TRAIN reviews, "
        f"scores on {acc['found']['examples']} held-out TEST reviews (never searched or tuned on). "
        f"Majority class on that test subset: {r['test_majority']:.3f}.", "",
        f"Search: {s['num_tokens']} tokens, {s['steps']} steps, k={s['candidates_per_step']} candidates, "
        f"batch {s['batch_size']}, objective {s.get('objective', 'ce')}, {r['search']['vocabulary']} allowed ids, "
        f"seed {s['seed']}, "
        f"start = the random trigger (c); {r['search']['accepted']} flips accepted; {r['search']['seconds']:.0f} s.",
        "", "Columns: test AUC of `logit(great) - logit(bad)` (threshold-free separation); accuracy at the "
        "threshold fitted on the search (TRAIN) rows; plain argmax accuracy; 2-way CE; share predicted great "
        "by argmax.", "",
        "| prompt | tokens | test AUC | calibrated accuracy | argmax accuracy | test CE | share predicted great |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (("found", "(a) AutoPrompt trigger"), ("hand", "(b) hand-written"), ("random", "(c) random"),
                       ("none", "no trigger")):
        m = acc[key]
        lines.append(f"| {label} | {m['text']!r} | {m['auc']:.3f} | {m['calibrated_accuracy']:.3f} | "
                     f"{m['accuracy']:.3f} | {m['loss']:.3f} | {m['predicted_great']:.2f} |")
    lines += ["", f"Virtual-token path vs real token ids (found trigger, one batch): max |logit diff| = "
              f"{r['real_token_check']['max_abs_logit_diff']:.2e}.", "",
              f"Prompt tuning: {s['pt_steps']} steps, batch {s['batch_size']}, Adam lr {s['pt_lr']}, same batches "
              "(seed) for every init.", "",
              "Search-set CE (all search reviews, not one batch) during prompt tuning, then the test scores:", "",
              "| init | " + " | ".join(f"step {i}" for i, _ in next(iter(r["prompt_tuning"].values()))["curve"])
              + " | test AUC | calibrated accuracy | test CE |",
              "|---|" + "---|" * (len(next(iter(r["prompt_tuning"].values()))["curve"]) + 3)]
    for name, run in r["prompt_tuning"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for _, v in run["curve"])
                     + f" | {run['test']['auc']:.3f} | {run['test']['calibrated_accuracy']:.3f} | "
                     f"{run['test']['loss']:.3f} |")
    lines += ["", "Caveats: one seed; the search curve is the loss on each step's own batch of "
              f"{s['batch_size']} (a new batch every step), so it is noisy and not monotone; prompt-tuning curves are "
              "measured on all search reviews at the same steps for every init. The argmax accuracy stays near the "
              "majority class when the verbalizer favours one word; AUC and the calibrated accuracy do not.", "",
              f"Plot: {r['plot'] or 'not written (matplotlib missing)'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=36, help="search steps")
    p.add_argument("--candidates", type=int, default=8, help="HotFlip candidates per step")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--review-tokens", type=int, default=40)
    p.add_argument("--search-examples", type=int, default=256, help="TRAIN reviews to search and tune on")
    p.add_argument("--eval-examples", type=int, default=192, help="held-out TEST reviews to score")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--pt-steps", type=int, default=30)
    p.add_argument("--pt-lr", type=float, default=1e-2)
    p.add_argument("--pt-eval-every", type=int, default=10, help="search-set CE every N tuning steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", choices=("ce", "rank"), default="ce",
                   help="search objective: 2-way CE, or the pairwise ranking loss (an AUC surrogate); "
                        "prompt tuning always uses CE")
    p.add_argument("--out", default=str(RESULTS / "autoprompt"), help="path stem of the .json/.md/.png")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    record: dict[str, Any] = {
        "command": " ".join(["python", "experiments/autoprompt.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
        "backend": jax.default_backend(), "jax_version": jax.__version__, "model": MODEL, "data": DATA,
        "hand_written": HAND, "suffix": SUFFIX, "verbalizer": {"other": VERBALIZER[0], "great": VERBALIZER[1]},
    }
    tok = load_lm_tokenizer(MODEL)
    model = models.load(MODEL, "float32")
    model.config = dataclasses.replace(model.config, remat=None)  # short sequences: no remat needed
    hand = tuple(tok.encode(HAND))
    n = len(hand)
    label_ids = jnp.array([tok.encode(w)[0] for w in VERBALIZER])
    label_logits, loss_fn = make_loss(label_ids)

    dataset = data.load_dataset(DATA)
    rng = np.random.default_rng(args.seed)
    train = [dataset.train[i] for i in rng.choice(len(dataset.train), args.search_examples, replace=False)]
    test = [dataset.test[i] for i in rng.choice(len(dataset.test), args.eval_examples, replace=False)]
    train_arrays = encode(tok, train, (), args.review_tokens)
    vocab = candidate_vocabulary(tok, model.config.vocab_size)
    random_ids = tuple(int(i) for i in np.random.default_rng([args.seed, 1]).choice(vocab, n))
    config = AutoPromptConfig(num_tokens=n, candidates_per_step=args.candidates, steps=args.steps,
                              batch_size=args.batch_size, candidate_ids=vocab, seed=args.seed)
    record["settings"] = {"num_tokens": n, "steps": args.steps, "candidates_per_step": args.candidates,
                          "batch_size": args.batch_size, "review_tokens": args.review_tokens,
                          "search_examples": args.search_examples, "pt_steps": args.pt_steps, "pt_lr": args.pt_lr,
                          "pt_eval_every": args.pt_eval_every, "objective": args.objective,
                          "seed": args.seed, "data_seed": args.seed, "random_trigger_seed": [args.seed, 1]}
    print(f"{n}-token triggers; {len(vocab)} allowed ids; searching {args.steps} steps ...", flush=True)

    t0 = time.perf_counter()
    search_loss = make_rank_loss(label_logits) if args.objective == "rank" else loss_fn
    found = search(model, search_loss, train_arrays, config, init_ids=random_ids, tokenizer=tok)
    record["search"] = {"token_ids": found.token_ids, "tokens": found.tokens, "text": found.text,
                        "history": found.history, "accepted": found.accepted, "vocabulary": len(vocab),
                        "init_ids": random_ids, "seconds": time.perf_counter() - t0}
    print(f"found {found.text!r} ({found.accepted} flips, {record['search']['seconds']:.0f} s); batch loss "
          f"{found.history[0]:.3f} -> {found.history[-1]:.3f}", flush=True)

    t0 = time.perf_counter()
    record["test_majority"] = float(max(np.mean([y for _, y in test]), 1 - np.mean([y for _, y in test])))
    prompts = {"found": found.token_ids, "hand": hand, "random": random_ids, "none": ()}
    record["accuracy"] = {}
    for key, ids in prompts.items():
        m = calibrated(model, label_logits, encode(tok, train, ids, args.review_tokens),
                       encode(tok, test, ids, args.review_tokens), args.eval_batch_size)
        record["accuracy"][key] = {**m, "token_ids": ids, "text": tok.decode(ids)}
        print(f"{key:>6}: AUC {m['auc']:.3f}, calibrated accuracy {m['calibrated_accuracy']:.3f}, accuracy "
              f"{m['accuracy']:.3f}, CE {m['loss']:.3f} ({tok.decode(ids)!r})", flush=True)
    record["eval_seconds"] = time.perf_counter() - t0

    one = {k: v[:args.eval_batch_size] for k, v in encode(tok, test, (), args.review_tokens).items()}
    real = {k: v[:args.eval_batch_size] for k, v in encode(tok, test, found.token_ids, args.review_tokens).items()}
    virtual = nnx.jit(label_logits)(with_prompt(model, found.prompt_tuning(), args.seed), one)
    record["real_token_check"] = {"max_abs_logit_diff": float(jnp.max(jnp.abs(
        virtual - nnx.jit(label_logits)(model, real))))}

    t0 = time.perf_counter()
    inits = {"found trigger": found.prompt_tuning(),
             "random trigger": peft_jax.prompt_tuning(n, prompt_init="text", token_ids=random_ids),
             "N(0,1)": peft_jax.prompt_tuning(n, prompt_init="random")}
    test_arrays = encode(tok, test, (), args.review_tokens)
    record["prompt_tuning"] = {}
    for name, placement in inits.items():
        tuned, losses, curve = tune(model, placement, loss_fn, train_arrays, steps=args.pt_steps,
                                    batch_size=args.batch_size, lr=args.pt_lr, seed=args.seed,
                                    label_logits=label_logits, eval_every=args.pt_eval_every,
                                    eval_batch_size=args.eval_batch_size)
        m = calibrated(tuned, label_logits, train_arrays, test_arrays, args.eval_batch_size)
        record["prompt_tuning"][name] = {"losses": losses, "curve": curve, "test": m}
        print(f"prompt tuning from {name}: search-set CE {curve[0][1]:.3f} -> {curve[-1][1]:.3f}, test AUC "
              f"{m['auc']:.3f}", flush=True)
    record["prompt_tuning_seconds"] = time.perf_counter() - t0
    record["wall_seconds"] = time.perf_counter() - t_start
    record["load_average_end"] = list(os.getloadavg())

    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    record["plot"] = plot(record, stem.with_suffix(".png"))
    io.write_json_atomic(stem.with_suffix(".json"), record)
    io.write_text_atomic(stem.with_suffix(".md"), markdown(record))
    print(f"wrote {stem}.json / .md{' / .png' if record['plot'] else ''} ({record['wall_seconds']:.0f} s)", flush=True)
    return record


if __name__ == "__main__":
    main()
