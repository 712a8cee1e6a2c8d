"""FLOPs of one training step, full fine-tuning vs LoRA r8 on all seven linears (XLA cost analysis).

    python experiments/bench_flops.py --json

Reference config (peft_jax.models.decoder_config.reference_config): hidden 512, 8 layers, 8 heads,
8 KV heads, FFN 1408, vocab 8192; sequence 256, batch 8, fp32, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference_steps import compare  # noqa: E402

from peft_jax.models.decoder_config import reference_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args()
    result = compare(reference_config(), batch=args.batch, seq=args.seq, rank=args.rank)
    line = json.dumps({k: v for k, v in result.items() if k != "config"} | {"batch": args.batch,
                      "seq": args.seq, "rank": args.rank})
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        os.replace(args.out + ".tmp", args.out)
    if args.json:
        print(line)
    else:
        print(f"full fine-tuning step: {result['full_flops']:.4g} FLOPs ({result['full_trainable_params']:,} trainable)")
        print(f"LoRA r{args.rank} step:          {result['lora_flops']:.4g} FLOPs ({result['lora_trainable_params']:,} trainable)")
        print(f"LoRA / full:            {result['lora_over_full_flops']:.4f}")


if __name__ == "__main__":
    main()
