"""`peft-jax`: the command line. Argparse turns flags into library calls; no logic lives here.

Example:
    $ peft-jax train                                  # LoRA on minilm-l6, fine-food reviews
    $ peft-jax train --rank 4 --targets all-linear --epochs 1 --out runs/r4
    $ peft-jax train --config run.yaml --lr 5e-4      # flags override the file
    $ peft-jax train --out runs/a --resume            # continue a stopped run where it stopped
    $ peft-jax train --model smollm2-135m --data austen --steps 200   # a causal LM on text
    $ peft-jax generate --model smollm2-135m --greedy --chat --prompt "What is the capital of France?"
    $ peft-jax generate --model smollm2-135m --adapter runs/lm/adapter --greedy --prompt "It is a truth"
    $ peft-jax export --adapter runs/r4/adapter --format hf-peft --out exports/r4-hf
    $ peft-jax import --from downloads/some-hf-lora --model smollm2-135m --out adapters/some
    $ peft-jax merge --model smollm2-135m --adapter runs/lm/adapter --out merged/smollm2-lm
    $ peft-jax eval --run runs/default                  # test scores of a finished run, as JSON
    $ peft-jax predict --run runs/default --input reviews.txt --out predictions.jsonl
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from peft_jax import errors

__all__ = ["build_parser", "main"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="LoRA-tune a model on a dataset and report it against baselines",
        description="LoRA-tune an encoder classifier (default: minilm-l6 on the fine-food "
                    "reviews) and report test accuracy next to the majority-class and "
                    "frozen-encoder linear-probe baselines; or, with a decoder as --model "
                    "(smollm2-135m, gemma3-270m, an HF-layout dir or .gguf), tune a causal "
                    "language model on text or chat data (default: the Austen novels) and report "
                    "held-out perplexity and sample generations before and after. Defaults come "
                    "from peft_jax.train.TrainSettings (peft_jax.train.settings.LM_DEFAULTS "
                    "for decoders); --config FILE (JSON or YAML) overrides them and flags "
                    "override the file.",
        argument_default=argparse.SUPPRESS)
    add = p.add_argument
    add("--config", metavar="FILE", help="JSON or YAML file of settings (keys as the flags)")
    add("--model", metavar="NAME_OR_PATH",
        help="registered model (minilm-l6; decoders smollm2-135m, gemma3-270m), an HF-layout "
             "dir or a .gguf file (default: minilm-l6)")
    add("--data", metavar="NAME_OR_PATH",
        help="classification: a registered dataset (fine-foods, the default), a CSV / TSV / "
             "JSONL table, or a dir with train and test tables; language model: austen (the "
             "default), a .txt file, or a .jsonl of text, prompt/completion or messages rows")
    add("--text-column", metavar="NAME", help="the table's text column (default: text)")
    add("--label-column", metavar="NAME", help="the table's label column (default: label)")
    add("--val-fraction", type=float, metavar="F",
        help="share of the training rows held out for periodic evaluation (default: 0.1; the "
             "test split is evaluated once, at the end)")
    add("--test-fraction", type=float, metavar="F",
        help="share of a single table's rows held out for testing (default: 0.2)")
    add("--method", help="PEFT method (default: lora); its own options are the --METHOD.FIELD flags "
                         "below. Known: " + ", ".join(sorted(_method_names())))
    add("--rank", type=int, help="LoRA rank r")
    add("--alpha", type=float, help="LoRA alpha (scale = alpha / r)")
    add("--lora-dropout", type=float, help="dropout on the LoRA input")
    add("--targets", help="comma-separated module names, a preset (attention, all-linear) or a "
                          "regex on '/'-joined module paths")
    add("--layers", help="adapt only these layers: top:K, 3-5, 0,2 or all (default: top:3 for "
                         "encoders, all for decoders)")
    add("--modules-to-save", help="modules trained fully (default: classifier; none for decoders)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps", default=argparse.SUPPRESS)
    steps.add_argument("--epochs", type=float, help="passes over the training set",
                       default=argparse.SUPPRESS)
    add("--batch-size", type=int, help="examples per step")
    add("--lr", type=float, help="peak learning rate (AdamW, warmup then linear decay)")
    add("--weight-decay", type=float)
    add("--warmup", type=float, help="fraction of steps spent warming up")
    add("--eval-every", type=int, help="evaluate every N steps (0: only at the end; default: "
                                       "every epoch)")
    add("--early-stopping", type=int, metavar="PATIENCE",
        help="stop when the validation loss has not improved for PATIENCE evaluations (default: 0, off)")
    add("--log-every", type=int, help="a progress line every N steps")
    add("--eval-batch-size", type=int)
    add("--eval-rows", type=int, metavar="N",
        help="evaluate on the first N rows of each held-out split (default: all; 64 for decoders)")
    add("--max-length", type=int, help="tokens per text after truncation; a language model's "
                                       "block length (default: 128; 256 for decoders)")
    add("--bucket", type=int, help="padded lengths are multiples of this")
    add("--head-init", choices=("probe", "random"),
        help="start the classifier from the linear probe (LP-FT) or at random")
    add("--model-dropout", action=argparse.BooleanOptionalAction,
        help="run the base model's dropout while training")
    add("--cache-prefix", action=argparse.BooleanOptionalAction,
        help="when only upper layers are adapted, run the frozen lower layers once and train "
             "from their cached output (default: on)")
    add("--seed", type=int)
    add("--mesh", metavar="AXES", help="train over a device mesh, e.g. data=8 or data=2,fsdp=4 "
                                       "(axes data, fsdp, tensor; default: one device)")
    add("--save-every", type=int, metavar="K",
        help="checkpoint to DIR/checkpoints every K steps and at the end (0: only at the end)")
    add("--keep", type=int, metavar="N", help="keep the last N checkpoints")
    add("--resume", action="store_true",
        help="continue the run in --out DIR from its newest checkpoint (same settings)")
    add("--out", metavar="DIR", help="output directory (default: runs/<timestamp>)")
    add("--overwrite", action="store_true",
        help="allow a non-empty --out directory (its old checkpoints are deleted)")
    _add_method_options(p)
    p.set_defaults(func=_train)


def _method_names() -> list[str]:
    from peft_jax.train.method_choice import METHOD_CHOICES  # noqa: PLC0415

    return list(METHOD_CHOICES)


_OPTION = "method_option:"  # argparse dest prefix of a --METHOD.FIELD flag


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One group of --METHOD.FIELD flags per method, from its config's fields."""
    from peft_jax.train.method_choice import METHOD_CHOICES, option_specs  # noqa: PLC0415

    for method, choice in METHOD_CHOICES.items():
        specs = option_specs(method)
        if not specs:
            continue
        group = p.add_argument_group(f"--method {method} options", choice.description)
        for spec in specs:
            kind = (dict(action=argparse.BooleanOptionalAction) if spec.type is bool
                    else dict(type=spec.type, metavar=spec.type.__name__.upper()))
            group.add_argument(spec.flag, dest=f"{_OPTION}{method}.{spec.field}",
                               help=f"default: {spec.default}", **kind)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with a decoder and print the completion",
        description="Generate text with a registered decoder (smollm2-135m, gemma3-270m), a "
                    ".gguf file or an HF-layout directory; prints only the completion. Sampling "
                    "defaults: temperature 0.8, top-p 0.95 (see --greedy).")
    add = p.add_argument
    add("--model", required=True, metavar="NAME_OR_PATH", help="registered name, .gguf or HF dir")
    add("--adapter", metavar="DIR",
        help="adapter directory to apply (peft_jax, HF PEFT or AdapterHub files)")
    add("--prompt", required=True, help="the prompt text")
    add("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens")
    add("--greedy", action="store_true", help="argmax decoding instead of sampling")
    add("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add("--system", help="system message (with --chat)")
    add("--temperature", type=float, metavar="T")
    add("--top-k", type=int, metavar="K")
    add("--top-p", type=float, metavar="P")
    add("--seed", type=int, default=0, metavar="S", help="sampling seed")
    add("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    p.set_defaults(func=_generate)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write an adapter in another format (HF PEFT, AdapterHub)",
        description="Load the adapter in --adapter onto its base and write it in --format to --out. "
                    "The base is the one the adapter records, or --model.")
    add = p.add_argument
    add("--adapter", required=True, metavar="DIR", help="adapter directory (any format)")
    add("--format", required=True, choices=("hf-peft", "adapterhub", "peft_jax"), help="output format")
    add("--out", required=True, metavar="DIR", help="new output directory")
    add("--model", metavar="NAME_OR_PATH", help="the base model (default: as the adapter records)")
    add("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_command("export_command"))


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="read an HF PEFT or AdapterHub adapter into peft_jax's format",
        description="Attach the adapter in --from to its base (checking every tensor against it) "
                    "and save it in peft_jax's own format, which records the base's identity.")
    add = p.add_argument
    add("--from", dest="source", required=True, metavar="DIR", help="HF PEFT or AdapterHub adapter directory")
    add("--out", required=True, metavar="DIR", help="new output directory")
    add("--model", metavar="NAME_OR_PATH", help="the base model (default: base_model_name_or_path)")
    add("--num-labels", type=int, metavar="N", help="classes, for an encoder classifier")
    add("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_command("import_command"))


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge an adapter into its base and write an HF-layout checkpoint",
        description="Merge the adapter into the base's weights and write config.json + "
                    "safetensors (sharded above --max-shard-size) that transformers loads.")
    add = p.add_argument
    add("--model", required=True, metavar="NAME_OR_PATH", help="registered name, .gguf or HF dir")
    add("--adapter", required=True, metavar="DIR", help="adapter directory (any format)")
    add("--out", required=True, metavar="DIR", help="new output directory")
    add("--max-shard-size", default="2GB", metavar="SIZE", help="largest shard file (default: 2GB)")
    add("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_command("merge_command"))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a finished run's adapter on its test split or another dataset",
        description="Rebuild the base model of a `peft-jax train` run, load its adapter and print "
                    "JSON scores: accuracy, macro-F1, per-class precision / recall / F1 and the "
                    "confusion matrix for a classifier; perplexity for a language model.")
    add = p.add_argument
    add("--run", required=True, metavar="DIR", help="the --out directory of a finished run")
    add("--data", metavar="NAME_OR_PATH",
        help="dataset to score, every row of it (default: the run's own test split)")
    add("--batch-size", type=int, metavar="N", help="rows per forward pass (default: the run's)")
    p.set_defaults(func=_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="label texts (classifier) or continue them (language model) with a run's adapter",
        description="Apply a finished run's adapter to every text of --input (.txt, one per line; "
                    "or .jsonl with a 'text' field) and write one JSON line each to --out: label and "
                    "class probabilities, or the greedy generation.")
    add = p.add_argument
    add("--run", required=True, metavar="DIR", help="the --out directory of a finished run")
    add("--input", required=True, metavar="FILE", help=".txt (one text per line) or .jsonl with 'text'")
    add("--out", required=True, metavar="FILE", help="the JSONL file to write (atomically)")
    add("--max-new-tokens", type=int, default=32, metavar="N", help="language models: new tokens (default: 32)")
    p.set_defaults(func=_predict)


def _eval(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from peft_jax.train.evaluation import evaluate_run  # noqa: PLC0415 (keeps `--help` fast)

    print(json.dumps(evaluate_run(args.run, args.data, batch_size=args.batch_size), indent=1), flush=True)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from peft_jax.train.evaluation import predict_run  # noqa: PLC0415

    count = predict_run(args.run, args.input, args.out, max_new_tokens=args.max_new_tokens)
    print(f"wrote {count} predictions to {args.out}", flush=True)
    return 0


def _command(name: str):
    """A handler calling ``peft_jax.io.commands.<name>`` with the parsed flags."""

    def run(args: argparse.Namespace) -> int:
        from peft_jax.io import commands  # noqa: PLC0415 (keeps `--help` fast)

        flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
        print(getattr(commands, name)(**flags), flush=True)
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-jax`` argument parser."""
    parser = argparse.ArgumentParser(prog="peft-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_import(sub)
    _add_merge(sub)
    _add_eval(sub)
    _add_predict(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from peft_jax.models import resolve  # noqa: PLC0415 (keeps `--help` fast)
    from peft_jax.train.method_choice import options_for  # noqa: PLC0415
    from peft_jax.train.recipe import run  # noqa: PLC0415
    from peft_jax.train.settings import TrainSettings, load_config_file  # noqa: PLC0415

    given = {tuple(k[len(_OPTION):].split(".", 1)): v for k, v in vars(args).items() if k.startswith(_OPTION)}
    flags = {k: v for k, v in vars(args).items()
             if k not in ("func", "command", "config") and not k.startswith(_OPTION)}
    file_values = load_config_file(args.config) if "config" in args else {}
    if given:
        method = flags.get("method") or file_values.get("method") or TrainSettings.method
        flags["method_options"] = {**file_values.get("method_options", {}), **options_for(method, given)}
    model = flags.get("model") or file_values.get("model") or TrainSettings.model
    family = resolve(model).family if isinstance(model, str) else "encoder"
    settings = TrainSettings.from_sources(file_values, flags, family=family)
    run(settings, log=lambda line: print(line, flush=True))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from peft_jax.models.generate_text import generate_command  # noqa: PLC0415

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    print(generate_command(**flags), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-jax`` console script; returns the exit status.

    Errors that peft_jax reports on bad input (`peft_jax.errors.PeftError`) are printed as one
    ``error: ...`` message with exit status 2, without a traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except errors.PeftError as e:
        print(f"peft-jax {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
