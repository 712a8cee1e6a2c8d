"""Reference outputs from the real AdapterHub library (``adapters``) on a tiny random BERT.

Run with the AdapterHub venv (``bash scripts/setup_adapterhub.sh``), never imported by the tests::

    .venv-adapterhub/bin/python tests/interop/adapterhub_ref.py REQUEST.json

AdapterHub pins transformers ~=4.57, which cannot share the main venv with transformers 5, so
tests/interop/test_adapterhub.py writes a request, runs this script in a subprocess and reads the
``.npz`` files it writes. Only the standard library and numpy are imported at module level, so
pytest's ``--doctest-modules`` can import this file in the main venv without torch or adapters.

A request is one case or ``{"cases": [case, ...]}`` (one process for many cases: importing torch
and transformers costs seconds). A case::

    {"out": "/tmp/x/seq_bn.npz",            # where to write the result
     "bert": {"vocab_size": 99, ...},        # BertConfig kwargs (dropout is forced to 0)
     "adapter": "seq_bn",                    # a name in adapters.ADAPTER_CONFIG_MAP
     "overrides": {"reduction_factor": 4},   # optional; for a union ("unipelt", "mam"): a dict
                                             #   keyed by component ("prefix_tuning",
                                             #   "bottleneck", "lora", ...) or index ("0", ...)
     "seed": 0,                              # base weights: torch.manual_seed(seed)
     "noise": 0.2,                           # adapter params: noise * N(0, 1), seeded by seed+1
     "input_ids": [[...]], "attention_mask": [[...]]}

What is randomised: the base BERT comes from ``BertModel(config)`` under ``torch.manual_seed``.
Then every parameter AdapterHub adds (named ``*.adapters.a.*``, ``shared_parameters.a.*``,
``*.prefix_tunings.a.*``, ``*.prefix_gates.a.*``, ``*.loras.a.*``, ...) is overwritten with
``noise * randn`` from a generator seeded with ``seed + 1`` (in sorted name order), so no zero
init (``mam_adapter``'s up projection, LoRA's B, PHM biases) hides a bug and gates are not at
their init either. LayerNorm weights added by an adapter become ``1 + noise * randn``.

The ``.npz`` holds:

* ``base/<HF name>``: the base BertModel state dict (torch layout, ``Linear`` weights are
  ``(out, in)``), taken before ``adapters.init``; the same tensors are also written as an HF
  checkpoint directory ``<out without .npz>_base/`` (``config.json`` + ``model.safetensors``) so
  the library's own loader can read them.
* ``adapter/<AH name>``: every parameter the adapter added, under AdapterHub's state-dict name
  (e.g. ``encoder.layer.0.output.adapters.a.adapter_down.0.weight``,
  ``shared_parameters.a.phm_rule``).
* ``last_hidden_state``: the adapted model's output, ``model.eval()``, float32.
* ``hidden_states``: the adapted model's embedding output and each layer's output, stacked.
* ``base_last_hidden_state``: the same inputs through the model before ``adapters.init``.
* ``meta``: a JSON string with the resolved adapter config (``to_dict()``), the adapter name,
  the package versions and the names in insertion order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ADAPTER_NAME = "a"
# Substrings that mark a parameter as added by AdapterHub for adapter ``a``.
_ADAPTER_MARKERS = tuple(
    s.format(ADAPTER_NAME)
    for s in ("adapters.{}.", "shared_parameters.{}.", "prefix_tunings.{}.", "prefix_gates.{}.",
              "loras.{}.", "refts.{}.", "prompt_tunings.{}.", "adapter_fusion_layer.{}.")
)


def _component_key(cfg) -> str:
    arch = getattr(cfg, "architecture", None)
    return "bottleneck" if arch is None else arch


def _resolve_config(name: str, overrides: dict):
    """The AdapterHub config object for ``name`` with ``overrides`` applied."""
    from adapters import AdapterConfig, ConfigUnion  # noqa: PLC0415

    base = AdapterConfig.load(name)
    if not isinstance(base, ConfigUnion):
        return base.replace(**overrides) if overrides else base
    parts = list(base.configs)
    for key, changes in (overrides or {}).items():
        hits = [i for i, c in enumerate(parts) if str(i) == key or _component_key(c) == key]
        if len(hits) != 1:
            raise ValueError(f"override key {key!r} matches {len(hits)} components of {name!r} "
                             f"({[_component_key(c) for c in parts]})")
        parts[hits[0]] = parts[hits[0]].replace(**changes)
    return ConfigUnion(*parts)


def _order(name: str):
    """Sort key: layer index numerically, then the name (``layer.10`` after ``layer.2``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def _to_numpy(t) -> np.ndarray:
    return t.detach().cpu().to(dtype=t.dtype).numpy().copy()


def run_case(case: dict) -> dict:
    import adapters  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    out = Path(case["out"])
    seed = int(case.get("seed", 0))
    noise = float(case.get("noise", 0.2))
    bert_kw = dict(case["bert"])
    bert_kw.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = BertConfig(**bert_kw)
    config._attn_implementation = "eager"  # one attention path; sdpa gives the same numbers

    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.tensor(np.asarray(case["input_ids"], dtype=np.int64))
    mask = torch.tensor(np.asarray(case["attention_mask"], dtype=np.int64))

    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_dir = out.with_name(out.stem + "_base")
    model.save_pretrained(base_dir, safe_serialization=True)
    with torch.no_grad():
        base_out = model(input_ids=ids, attention_mask=mask).last_hidden_state

    adapters.init(model)
    ah_config = _resolve_config(case["adapter"], case.get("overrides") or {})
    model.add_adapter(ADAPTER_NAME, config=ah_config)
    model.set_active_adapters(ADAPTER_NAME)

    # A tensor can sit under several names (the prefix pool is reachable from the model and
    # from every layer's attention); keep one per tensor, the shortest, which is the name
    # AdapterHub's own state dict starts with (``prefix_tuning.prefix_tunings.a...``).
    aliases: dict[int, list[str]] = {}
    params = {}
    all_params = list(model.named_parameters(remove_duplicate=False))
    base_ids = {id(p) for name, p in all_params if name in base_sd}  # base tensors, any alias
    for name, p in all_params:
        if name in base_sd or id(p) in base_ids:
            continue
        if not any(m in name for m in _ADAPTER_MARKERS):
            raise RuntimeError(f"unexpected new parameter {name!r} (not an adapter marker)")
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    added = {}
    for key, names in aliases.items():
        added[min(names, key=lambda n: (len(n), n))] = params[key]
    added = dict(sorted(added.items(), key=lambda kv: _order(kv[0])))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in sorted(added):
            p = added[name]
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            is_norm_weight = isinstance(owner, torch.nn.LayerNorm) and name.endswith(".weight")
            p.copy_(1.0 + noise * r if is_norm_weight else noise * r)
    for name, t in model.state_dict().items():
        if name in base_sd and not torch.equal(t, base_sd[name]):
            raise RuntimeError(f"adding the adapter changed base tensor {name!r}")

    model.eval()
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    arrays = {f"base/{k}": _to_numpy(v) for k, v in base_sd.items()}
    arrays.update({f"adapter/{k}": _to_numpy(v) for k, v in added.items()})
    arrays["last_hidden_state"] = _to_numpy(res.last_hidden_state)
    arrays["hidden_states"] = np.stack([_to_numpy(h) for h in res.hidden_states])
    arrays["base_last_hidden_state"] = _to_numpy(base_out)
    meta = {
        "adapter_name": ADAPTER_NAME,
        "adapter": case["adapter"],
        "config": ah_config.to_dict(),
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "adapter_names": list(added),
        "adapter_shapes": {k: list(v.shape) for k, v in added.items()},
        "aliases": {n: sorted(aliases[id(t)]) for n, t in added.items() if len(aliases[id(t)]) > 1},
        "base_dir": str(base_dir),
    }
    arrays["meta"] = np.array(json.dumps(meta, default=str))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return meta


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print("usage: adapterhub_ref.py REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    cases = request["cases"] if "cases" in request else [request]
    for case in cases:
        meta = run_case(case)
        print(f"{case['adapter']}: {len(meta['adapter_names'])} adapter tensors -> {case['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
