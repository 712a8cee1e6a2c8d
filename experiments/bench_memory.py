"""Peak memory of training the reference config: LoRA vs full fine-tuning, each in its own process.

    python experiments/bench_memory.py --json

Each child process builds the reference decoder (hidden 512, 8 layers, FFN 1408, vocab 8192, fp32),
runs ``--steps`` AdamW steps at batch 8 x seq 256, and reports its peak resident memory
(``ru_maxrss``), XLA's compiled memory analysis of the step, and the optimizer-state bytes next
to what the trainable leaves imply (AdamW: two moments per trainable scalar, plus step counters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _remat_arg(value: str) -> str | None:
    return None if value == "none" else value


def _vm_hwm_mb() -> float | None:
    """Peak resident memory so far (Linux ``VmHWM``), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _child(kind: str, steps: int, batch: int, seq: int, rank: int, remat) -> dict:
    sys.path.insert(0, HERE)
    import resource

    import jax

    from peft_jax.models.decoder_config import reference_config
    from reference_steps import build

    config = reference_config()
    if remat != "default":
        config = dataclasses.replace(config, remat=_remat_arg(remat))
    ref = build(config, batch=batch, seq=seq, lora_rank=rank if kind == "lora" else None)
    peak_after_build = _vm_hwm_mb()
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    compiled = ref.step.lower(ref.trainable, ref.opt_state, ref.frozen, ref.batch).compile()
    peak_after_compile = _vm_hwm_mb()
    memory = compiled.memory_analysis()
    for _ in range(steps):
        jax.block_until_ready(ref.run())
    trainable_bytes = nbytes(ref.trainable)
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_after_build_mb": peak_after_build,
        "peak_rss_after_compile_mb": peak_after_compile,
        "trainable_bytes": trainable_bytes,
        "frozen_bytes": nbytes(ref.frozen),
        "opt_state_bytes": nbytes(ref.opt_state),
        "opt_state_bytes_implied": 2 * trainable_bytes,
        "xla_temp_mb": memory.temp_size_in_bytes / 2**20,
        "xla_argument_mb": memory.argument_size_in_bytes / 2**20,
        "remat": config.remat,
        "flops": compiled.cost_analysis().get("flops"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--remat", default="default",
                        help="decoder per-layer remat policy for both runs: none, full, dots, "
                             "dots_no_batch, ... (default: the library default, DecoderConfig.remat)")
    parser.add_argument("--remat-full", default=None,
                        help="a different policy for the full fine-tuning run (default: --remat)")
    parser.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from peft_jax.models.decoder_config import reference_config

    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.batch, args.seq, args.rank, args.remat)))
        return
    runs = {}
    for kind in ("lora", "full"):
        remat = args.remat_full if kind == "full" and args.remat_full is not None else args.remat
        cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
               "--remat", remat]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[kind] = json.loads(out.strip().splitlines()[-1])
    result = {
        "lora_peak_mb": runs["lora"]["peak_rss_mb"],
        "full_peak_mb": runs["full"]["peak_rss_mb"],
        "lora_over_full_peak_memory": runs["lora"]["peak_rss_mb"] / runs["full"]["peak_rss_mb"],
        "lora_opt_state_bytes": runs["lora"]["opt_state_bytes"],
        "full_opt_state_bytes": runs["full"]["opt_state_bytes"],
        "lora": runs["lora"], "full": runs["full"],
        "lora_remat": runs["lora"]["remat"], "full_remat": runs["full"]["remat"],
        "library_default_remat": reference_config().remat,
        "batch": args.batch, "seq": args.seq, "rank": args.rank, "steps": args.steps,
        "load_avg_1m": os.getloadavg()[0],
    }
    line = json.dumps(result)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(line + "\n")
        os.replace(args.out + ".tmp", args.out)
    print(line if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
