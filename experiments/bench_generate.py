"""Generation speed on CPU: peft_jax vs transformers' ``generate`` on SmolLM2-135M (GGUF, fp32).

    python experiments/bench_generate.py --json [--prompt-len 128 --new-tokens 32 --rounds 7]

Both load the same GGUF file into float32 and continue the same prompts (``--prompt-len`` real
tokens per row, no padding) greedily for exactly ``--new-tokens`` tokens (stop tokens off), at
batch 1 and batch 8. A run of 1 new token is the prefill (plus one token); a full run minus it
is the decode, so

    prefill tokens/s = batch * prompt_len / T(1),  decode tokens/s = batch * (new - 1) / (T(new) - T(1)).

peft_jax is compiled first (compile time reported separately); then the contenders run in
alternating rounds (the order flips each round) so machine noise hits them alike. A round's
decode figure comes from its own T(1) and T(new), measured back to back; each figure is the
median over rounds (``*_best``: the fastest round, the one least hit by other load).
transformers runs at torch's default thread count and at 1 thread (``--torch-threads``): on a
loaded machine torch's spinning OpenMP threads can slow it down many times. The load average is
recorded before and after. Writes ``experiments/results/generate_smollm2_cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from peft_jax.models import load, resolve
from peft_jax.models.generate import generate
from peft_jax.models.lm_tokenizer import LMTokenizer

DEFAULT_OUT = Path(__file__).parent / "results" / "generate_smollm2_cpu.json"


def _prompts(tokenizer: LMTokenizer, batch: int, length: int) -> np.ndarray:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    need = batch * length
    ids = (ids * (need // len(ids) + 1))[:need]
    return np.asarray(ids, np.int32).reshape(batch, length)


class _Ours:
    name = "peft_jax"

    def __init__(self, model):
        self.model = model

    def run(self, ids: np.ndarray, new: int) -> np.ndarray:
        out = generate(self.model, ids, np.ones_like(ids), max_new_tokens=new, stop_tokens=())
        return np.asarray(jax.block_until_ready(out.tokens))


class _Transformers:
    """transformers' generate with ``threads`` torch intra-op threads (0: torch's default)."""

    def __init__(self, model, threads: int):
        import torch  # noqa: PLC0415

        self.torch, self.model = torch, model
        self.threads = threads or torch.get_num_threads()
        self.name = "transformers" if not threads else f"transformers_{threads}thread"

    @staticmethod
    def load(path: Path):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def run(self, ids: np.ndarray, new: int) -> np.ndarray:
        t = self.torch
        t.set_num_threads(self.threads)
        with t.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.generate(
                t.from_numpy(ids.astype(np.int64)), attention_mask=t.ones(ids.shape, dtype=t.long),
                max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                eos_token_id=None, temperature=None, top_p=None, top_k=None)
        return out[:, ids.shape[1]:].numpy()


def _timed(contender, ids: np.ndarray, new: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    tokens = contender.run(ids, new)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--torch-threads", default="0,1",
                        help="transformers contenders by torch thread count (0: torch's default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to write the JSON line")
    args = parser.parse_args()
    log = (lambda *_: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()

    path = resolve("smollm2-135m").path
    tokenizer = LMTokenizer.from_gguf(path)
    t0 = time.perf_counter()
    ours = _Ours(load(path, "float32"))
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_model = _Transformers.load(path)
    load_theirs = time.perf_counter() - t0
    import torch  # noqa: PLC0415

    default_threads = torch.get_num_threads()
    theirs = [_Transformers(hf_model, int(n)) for n in args.torch_threads.split(",")]
    contenders = [ours, *theirs]
    prompts = {b: _prompts(tokenizer, b, args.prompt_len) for b in batches}
    compile_s = {}
    for b in batches:  # compile (and warm up transformers) outside the timed rounds
        for new in (1, args.new_tokens):
            compile_s[f"b{b}_new{new}"] = round(_timed(ours, prompts[b], new)[0], 2)
        for c in theirs:
            _timed(c, prompts[b], 2)
    log("compiled", compile_s)

    times = {(c.name, b, new): [] for c in contenders for b in batches
             for new in (1, args.new_tokens)}
    agree = {}
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for b in batches:
            outs = {}
            for c in order:  # T(1) and T(new) back to back: their difference is one round's decode
                for new in (1, args.new_tokens):
                    seconds, outs[c.name] = _timed(c, prompts[b], new)
                    times[c.name, b, new].append(seconds)
            same = outs["peft_jax"] == outs[theirs[0].name]
            agree[b] = float(np.mean(np.cumprod(same, axis=1)[:, -1]))
        log(f"round {r}:", {f"{k[0]} b{k[1]} new{k[2]}": round(v[-1], 3) for k, v in times.items()})

    results = {}
    for b in batches:
        for c in contenders:
            t1s, tns = times[c.name, b, 1], times[c.name, b, args.new_tokens]
            prefill = [b * args.prompt_len / t for t in t1s]
            decode = [b * (args.new_tokens - 1) / (tn - t1) if tn > t1 else 0.0
                      for t1, tn in zip(t1s, tns)]  # 0: other load swamped that round
            results.setdefault(f"batch{b}", {})[c.name] = {
                "prefill_tok_s": round(statistics.median(prefill), 1),
                "decode_tok_s": round(statistics.median(decode), 1),
                "prefill_tok_s_best": round(max(prefill), 1),
                "decode_tok_s_best": round(max(decode), 1),
                "rounds_prefill_s": [round(t, 4) for t in t1s],
                "rounds_generate_s": [round(t, 4) for t in tns]}
        results[f"batch{b}"]["greedy_rows_identical"] = agree.get(b)
    result = {
        "bench": "generate", "model": "smollm2-135m (GGUF Q4_1 dequantized)", "dtype": "float32",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "results": results, "peft_jax_compile_s": compile_s,
        "load_s": {"peft_jax": round(load_ours, 2), "transformers": round(load_theirs, 2)},
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "torch_default_threads": default_threads,
        "jax": jax.__version__, "torch": torch.__version__, "platform": platform.platform(),
    }
    line = json.dumps(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n", encoding="utf-8")
    print(line if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
