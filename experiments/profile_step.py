"""Where one training step of the reference config spends its time and memory, per XLA op.

    taskset -c 0 python experiments/profile_step.py [--kind lora full] [--remat POLICY] [--top 25]

For each contender (LoRA r8 on all seven linears, or full fine-tuning; AdamW, batch 8 x seq 256):
compiles the step and prints XLA's ``memory_analysis()`` (deterministic: temp / argument bytes) and
``cost_analysis()`` FLOPs, then traces ``--steps`` steps with ``jax.profiler`` and sums, per
executed HLO op (thunk), the duration of its trace event. Each op is classed by what it is
(matmul, copy/transpose, fusion, ...), by the Python function that produced it (from the HLO's
stack frames: attention, RMSNorm, RoPE, MLP, LoRA factors, LM head / cross-entropy, optimizer)
and by pass (ops of the backward pass, including rematerialized forward work, count as backward).

An event lasts from the op's start to its end on the thread that launched it, so on a shared,
loaded machine a parallel op stretches while one of its threads waits for the CPU. Pinned to one
core (``taskset -c 0``) the durations add up to about the CPU time of the step, which is the
figure to compare; shares are more robust than absolute values either way.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from peft_jax.models.decoder_config import reference_config  # noqa: E402
from reference_steps import build  # noqa: E402

# An op belongs to the first label (in this order) with one of its functions anywhere in the
# op's stack (so a LoRA matmul inside a Linear counts as "lora", the LM head as "lm_head+loss").
_SOURCES = [
    ("lora", ("low_rank", "Lora.delta")),
    ("attention", ("attend",)),
    ("mask", ("build_attention_mask",)),
    ("rope", ("apply_rope", "rope_angles")),
    ("rmsnorm", ("RMSNorm.__call__",)),
    ("lm_head+loss", ("Decoder.logits", "causal_lm_loss", "softmax_cross_entropy")),
    ("linear", ("Linear.__call__",)),
    ("mlp", ("MLP.__call__",)),
    ("embed", ("Embed.__call__", "Decoder.embed")),
    ("optimizer", ("update_fn", "apply_updates", "tree_update_moment", "safe_increment")),
    ("residual", ("DecoderLayer.__call__",)),
]

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?) ([a-z][\w-]*)\((.*)$")


def _stack_tables(text: str):
    """``frame_id -> [function names, innermost first]`` from the HLO text's stack tables."""
    sections = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = sections.setdefault(line, {})
            continue
        if current is None or not line.strip() or line.startswith(("HloModule", "ENTRY", "%")):
            if line.startswith(("ENTRY", "%", "HloModule")):
                current = None
            continue
        key, _, rest = line.strip().partition(" ")
        if key.isdigit():
            current[int(key)] = rest
    functions = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
    loc_fn = {}
    for k, v in sections.get("FileLocations", {}).items():
        m = re.search(r"function_name_id=(\d+)", v)
        loc_fn[k] = functions.get(int(m.group(1)), "?") if m else "?"
    frames = {}
    for k, v in sections.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        # The text prints parent_frame_id one above the parent's id (the root prints its own id).
        frames[k] = (loc_fn.get(int(loc.group(1)), "?") if loc else "?",
                     int(parent.group(1)) - 1 if parent else 0)

    def chain(frame_id: int) -> list[str]:
        out = []
        while frame_id in frames and len(out) < 64:
            name, frame_id = frames[frame_id]
            out.append(name)
        return out

    return chain


def _instructions(text: str):
    """``name -> dict(opcode, shape, kind, calls, op_name, frame)`` for every HLO instruction,
    plus ``computation -> [opcodes]`` to tell fusions that contain a dot."""
    info, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line.startswith("%") or line.startswith("ENTRY"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        comps[current].append(opcode)
        kind = re.search(r"kind=(\w+)", rest)
        calls = re.search(r"calls=%([\w.-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        operands = re.findall(r"%([\w.-]+)", rest.split("), ")[0]) if opcode != "parameter" else []
        info[name] = dict(opcode=opcode, shape=shape, kind=kind.group(1) if kind else None,
                          operands=operands,
                          calls=calls.group(1) if calls else None,
                          op_name=op_name.group(1) if op_name else "",
                          frame=int(frame.group(1)) if frame else 0)
    return info, comps


_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8}


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string such as ``f32[8,256]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _op_bytes(name: str, info: dict) -> int:
    """Bytes an executed op reads and writes (operands + result), the memory-traffic proxy."""
    ins = info[name]
    if ins["opcode"] in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
        return 0
    return _shape_bytes(ins["shape"]) + sum(_shape_bytes(info[o]["shape"]) for o in ins["operands"]
                                            if o in info)


def _classify(name: str, info: dict, comps: dict, chain) -> tuple[str, str, str]:
    """``(what, source, pass)`` of an executed op."""
    ins = info.get(name)
    if ins is None:
        base = name.split(".")[0]
        return base, "?", "?"
    opcode = ins["opcode"]
    if opcode == "fusion":
        inner = comps.get(ins["calls"], [])
        what = "matmul" if ("dot" in inner or "convolution" in inner) else (
            "reduce-fusion" if "reduce" in inner else "elementwise-fusion")
        if what == "elementwise-fusion" and set(inner) <= {"parameter", "copy", "transpose", "bitcast"}:
            what = "copy/transpose"
    elif opcode in ("dot", "convolution"):
        what = "matmul"
    elif opcode in ("copy", "transpose"):
        what = "copy/transpose"
    else:
        what = opcode
    functions = chain(ins["frame"])
    source = "other"
    for label, needles in _SOURCES:
        if any(any(n in f for n in needles) for f in functions):
            source = label
            break
    phase = "backward" if "transpose(" in ins["op_name"] else (
        "optimizer" if source == "optimizer" else "forward")
    return what, source, phase


def profile(kind: str, *, remat: str, steps: int, batch: int, seq: int, rank: int,
            top: int, all_ops: bool = False) -> dict:
    """Compile, trace and aggregate one contender; returns a JSON-able summary."""
    config = reference_config()
    if remat != "default":
        config = dataclasses.replace(config, remat=None if remat == "none" else remat)
    ref = build(config, batch=batch, seq=seq, lora_rank=rank if kind == "lora" else None)
    compiled = ref.step.lower(ref.trainable, ref.opt_state, ref.frozen, ref.batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    text = compiled.as_text()
    info, comps = _instructions(text)
    chain = _stack_tables(text)
    for _ in range(2):
        jax.block_until_ready(ref.run())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        wall = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(ref.run())
            wall.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        per_op = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if stats.get("hlo_module") == "jit_step" and "hlo_op" in stats:
                        per_op[stats["hlo_op"]] += event.duration_ns / 1e9 / steps
    total = sum(per_op.values())
    by_what, by_source, by_phase, by_pair = (collections.Counter() for _ in range(4))
    rows = []
    for name, sec in per_op.items():
        what, source, phase = _classify(name, info, comps, chain)
        by_what[what] += sec
        by_source[source] += sec
        by_phase[phase] += sec
        by_pair[f"{source}/{what}"] += sec
        ins = info.get(name, {})
        rows.append((sec, name, what, source, phase, ins.get("shape", "?")))
    rows.sort(reverse=True)
    share = lambda c: {k: [round(v, 4), round(v / total, 3)] for k, v in c.most_common()}  # noqa: E731
    return {
        "kind": kind, "remat": config.remat,
        "wall_s_per_step": sorted(wall)[len(wall) // 2],
        "op_cpu_s_per_step": total,
        "xla_temp_mb": memory.temp_size_in_bytes / 2**20,
        "xla_argument_mb": memory.argument_size_in_bytes / 2**20,
        "xla_output_mb": memory.output_size_in_bytes / 2**20,
        "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
        "by_kind": share(by_what), "by_source": share(by_source), "by_phase": share(by_phase),
        "by_source_kind": share(by_pair),
        "all_ops": [dict(op=n, cpu_s=round(s, 5), what=w, source=src, phase=ph, shape=shp)
                    for s, n, w, src, ph, shp in rows] if all_ops else [],
        "top_ops": [dict(op=n, cpu_s=round(s, 4), share=round(s / total, 3), what=w, source=src,
                         phase=ph, shape=shp) for s, n, w, src, ph, shp in rows[:top]],
        "load_avg_1m": os.getloadavg()[0],
    }


def _print(summary: dict) -> None:
    print(f"== {summary['kind']} (remat={summary['remat']}): wall {summary['wall_s_per_step']:.2f} s/step,"
          f" op CPU time {summary['op_cpu_s_per_step']:.2f} s/step, load {summary['load_avg_1m']:.1f}")
    print(f"   XLA temp {summary['xla_temp_mb']:.0f} MB, arguments {summary['xla_argument_mb']:.0f} MB,"
          f" {summary['flops'] / 1e9:.0f} GFLOP, {summary['bytes_accessed'] / 2**30:.1f} GiB accessed")
    for key in ("by_phase", "by_kind", "by_source", "by_source_kind"):
        items = ", ".join(f"{k} {v[1]:.0%}" for k, v in summary[key].items() if v[1] >= 0.005)
        print(f"   {key}: {items}")
    print("   top ops:")
    for r in summary["top_ops"]:
        print(f"     {r['cpu_s'] * 1e3:8.1f} ms {r['share']:6.1%}  {r['what']:<18} {r['source']:<13}"
              f" {r['phase']:<9} {r['shape'][:40]:<40} {r['op']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--remat", default="default",
                        help="DecoderConfig.remat for this run (none, full, projections, ...; "
                             "default: the library default)")
    parser.add_argument("--all-ops", action="store_true", help="keep every op in the --out JSON")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="write the summaries as JSON to this file")
    args = parser.parse_args()
    summaries = []
    for kind in args.kind:
        summary = profile(kind, remat=args.remat, steps=args.steps, batch=args.batch, seq=args.seq,
                          rank=args.rank, top=args.top, all_ops=args.all_ops)
        _print(summary)
        summaries.append(summary)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summaries, f, indent=1)


if __name__ == "__main__":
    main()
