"""FLOPs of one training step, full fine-tuning vs each weight method (XLA cost analysis).

    python experiments/bench_flops.py --json            # every method
    python experiments/bench_flops.py --methods lora ia3

LoRA r8 (alpha 16) on all seven linears keeps the original fields (``lora_flops``,
``lora_over_full_flops``, ...); ``methods`` holds every method's FLOPs, ratio to full fine-tuning
and trainable count (configs in ``reference_steps.method_configs``).

Reference config (peft_jax.models.decoder_config.reference_config): hidden 512, 8 layers, 8 heads,
8 KV heads, FFN 1408, vocab 8192; sequence 256, batch 8, fp32, AdamW.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from peft_jax.models.decoder_config import reference_config  # noqa: E402
from reference_steps import compare_methods, method_configs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=sorted(method_configs()), help="default: all")
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args()
    config = reference_config()
    names = sorted(set(args.methods or method_configs()) | {"lora"})
    measured = compare_methods(config, batch=args.batch, seq=args.seq, rank=args.rank, names=names)
    lora = measured["methods"]["lora"]
    result = {
        "config": dataclasses.asdict(config) | {"batch": args.batch, "seq": args.seq, "rank": args.rank},
        "full_flops": measured["full_flops"], "lora_flops": lora["flops"],
        "lora_over_full_flops": lora["over_full_flops"],
        "full_trainable_params": measured["full_trainable_params"],
        "lora_trainable_params": lora["trainable_params"], "methods": measured["methods"],
        "backend": jax.default_backend(), "jax_version": jax.__version__,
    }
    line = json.dumps({k: v for k, v in result.items() if k != "config"} | {"batch": args.batch,
                      "seq": args.seq, "rank": args.rank})
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        os.replace(args.out + ".tmp", args.out)
    if args.json:
        print(line)
    else:
        print(f"full fine-tuning: {result['full_flops']:.4g} FLOPs per step, "
              f"{result['full_trainable_params']:,} trainable")
        for name, m in result["methods"].items():
            print(f"{name:>10}: {m['flops']:.4g} FLOPs, {m['over_full_flops']:.4f} of full, "
                  f"{m['trainable_params']:,} trainable")


if __name__ == "__main__":
    main()
