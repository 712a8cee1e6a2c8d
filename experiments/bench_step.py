"""Training speed on the reference config: LoRA vs full fine-tuning (and HF PEFT with --peer).

    python experiments/bench_step.py --json [--peer hf-peft]

Each contender is compiled / warmed up first, then the contenders run in alternating rounds of
``--steps`` steps each, so machine noise hits them alike; the figure per contender is the median
round. Tokens/s = batch * seq / step time. Reference config: hidden 512, 8 layers, 8 heads, 8 KV
heads, FFN 1408, vocab 8192, seq 256, batch 8, fp32, AdamW, LoRA r8 (alpha 16) on all 7 linears.
The decoder uses the library's default per-layer remat policy unless ``--remat`` says otherwise.

Besides wall time, each round records the process CPU time (all threads), which a shared, loaded
machine distorts far less: ``cpu_seconds_per_step`` and ``ratio_cpu_time_vs_hf_peft``. On a loaded
machine torch's OpenMP threads spin-wait for each other and lose most of their time, so by
default the HF PEFT peer runs with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported,
unless the environment already sets it), which is the peer's best case here; ``--peer-omp-wait
default`` keeps torch's own behaviour. The load average before and after is part of the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from peft_jax.models.decoder_config import reference_config  # noqa: E402
from reference_steps import build  # noqa: E402


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _JaxContender:
    def __init__(self, ref):
        self.ref = ref

    def run(self) -> float:
        return float(jax.block_until_ready(self.ref.run()))


def _time_round(contender, steps: int) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` per step over one round."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        contender.run()
    return (time.perf_counter() - start) / steps, (_cpu_seconds() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--peer", choices=["hf-peft"], help="also run this peer in the same invocation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--remat", default="default",
                        help="decoder per-layer remat policy (none, full, projections, ...; default: "
                             "the library default, DecoderConfig.remat)")
    parser.add_argument("--peer-omp-wait", choices=["passive", "default"], default="passive",
                        help="OMP_WAIT_POLICY of the torch peer (see above)")
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args()
    load_before = os.getloadavg()

    config = reference_config()
    if args.remat != "default":
        config = dataclasses.replace(config, remat=None if args.remat == "none" else args.remat)
    contenders = {
        "lora": _JaxContender(build(config, batch=args.batch, seq=args.seq, lora_rank=args.rank)),
        "full": _JaxContender(build(config, batch=args.batch, seq=args.seq, lora_rank=None)),
    }
    omp_wait = None
    if args.peer == "hf-peft":
        if args.peer_omp_wait == "passive":
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        omp_wait = os.environ.get("OMP_WAIT_POLICY", "default")
        from hf_peer import HfPeftStep

        contenders["hf_peft_lora"] = HfPeftStep(config, batch=args.batch, seq=args.seq, rank=args.rank)
    for contender in contenders.values():  # compile + warm up
        contender.run()
        contender.run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu_times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, contender in contenders.items():
            wall, cpu = _time_round(contender, args.steps)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    step_time = {name: statistics.median(t) for name, t in times.items()}
    cpu_time = {name: statistics.median(t) for name, t in cpu_times.items()}
    tokens = args.batch * args.seq
    result = {
        "lora_tokens_per_s": tokens / step_time["lora"],
        "full_tokens_per_s": tokens / step_time["full"],
        "lora_over_full_step_time": step_time["lora"] / step_time["full"],
        "lora_over_full_cpu_time": cpu_time["lora"] / cpu_time["full"],
    }
    if "hf_peft_lora" in step_time:
        result["hf_peft_lora_tokens_per_s"] = tokens / step_time["hf_peft_lora"]
        result["ratio_tokens_per_s_vs_hf_peft"] = step_time["hf_peft_lora"] / step_time["lora"]
        result["ratio_cpu_time_vs_hf_peft"] = cpu_time["hf_peft_lora"] / cpu_time["lora"]
        result["hf_peft_omp_wait_policy"] = omp_wait
    result |= {"step_seconds": step_time, "cpu_seconds_per_step": cpu_time,
               "step_seconds_all_rounds": times, "remat": config.remat,
               "rounds": args.rounds, "steps_per_round": args.steps,
               "batch": args.batch, "seq": args.seq, "rank": args.rank, "jax": jax.__version__,
               "backend": jax.default_backend(), "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(),
               "load_avg_1m": os.getloadavg()[0], "load_avg_before": list(load_before),
               "load_avg_after": list(os.getloadavg())}
    line = json.dumps(result)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(line + "\n")
        os.replace(args.out + ".tmp", args.out)
    print(line if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
