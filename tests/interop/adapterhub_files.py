"""AdapterHub's own ``save_adapter`` / ``load_adapter`` on a tiny random BERT, for the file-format tests.

Run with the AdapterHub venv, never imported by the tests (only the standard library and numpy at
module level, so ``--doctest-modules`` can import it without torch)::

    .venv-adapterhub/bin/python tests/interop/adapterhub_files.py REQUEST.json

A request is ``{"mode": "save" | "load", "cases": [case, ...]}`` (one process for every case:
importing torch costs seconds). Both modes build ``adapters.BertAdapterModel(BertConfig(**bert))``
(dropout 0) under ``torch.manual_seed(seed)``, so the same seed gives the same base weights; its keys
start with ``bert.``, as AdapterHub's usual model classes write them (a bare ``BertModel`` loses the
shared PHM parameters on ``save_adapter``: its filter wants ``.shared_parameters.``).

``save``: writes the base as an HF checkpoint ``<dir>_base/``, adds adapter ``name`` with the config
``adapter`` (+ ``overrides``), sets every parameter it added to ``noise * randn`` (LayerNorm weights
``1 + noise * randn``; generator seeded ``seed + 1``, sorted names), runs the batch and calls
``model.save_adapter(dir, name, use_safetensors=safetensors)``.

``load``: ``model.load_adapter(dir, use_safetensors=use_safetensors)``, activates it and runs the batch.

Each case writes ``out`` (``.npz``): ``last_hidden_state``, ``base_last_hidden_state`` and ``meta``
(JSON: ``base_dir``, the loaded adapter's name, config, missing / unexpected keys).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _model(case: dict):
    import torch  # noqa: PLC0415
    from adapters import BertAdapterModel  # noqa: PLC0415
    from transformers import BertConfig  # noqa: PLC0415

    kw = dict(case["bert"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = BertConfig(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(int(case.get("seed", 0)))
    return BertAdapterModel(config).eval()


def _run(model, case: dict) -> np.ndarray:
    import torch  # noqa: PLC0415

    ids = torch.tensor(np.asarray(case["input_ids"], dtype=np.int64))
    mask = torch.tensor(np.asarray(case["attention_mask"], dtype=np.int64))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.detach().numpy().copy()


def _randomise(model, base_names: set[str], seed: int, noise: float) -> list[str]:
    import torch  # noqa: PLC0415

    added = {n: p for n, p in model.named_parameters() if n not in base_names}
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in sorted(added):
            p = added[name]
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            is_norm_weight = isinstance(owner, torch.nn.LayerNorm) and name.endswith(".weight")
            p.copy_(1.0 + noise * r if is_norm_weight else noise * r)
    return sorted(added)


def save_case(case: dict) -> dict:
    from adapters import AdapterConfig  # noqa: PLC0415

    model = _model(case)
    base_dir = Path(case["dir"] + "_base")
    model.bert.save_pretrained(base_dir, safe_serialization=True)
    base = _run(model, case)
    base_names = {n for n, _ in model.named_parameters()}
    name = case["name"]
    config = AdapterConfig.load(case["adapter"], **(case.get("overrides") or {}))
    model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    added = _randomise(model, base_names, int(case.get("seed", 0)), float(case.get("noise", 0.2)))
    model.eval()
    out = _run(model, case)
    model.save_adapter(case["dir"], name, use_safetensors=bool(case.get("safetensors", False)))
    return {"base": base, "out": out, "meta": {"base_dir": str(base_dir), "name": name, "added": added,
                                                 "config": config.to_dict()}}


def load_case(case: dict) -> dict:
    model = _model(case)
    base = _run(model, case)
    info: dict = {}
    name = model.load_adapter(case["dir"], use_safetensors=bool(case.get("use_safetensors", False)),
                              loading_info=info)
    model.set_active_adapters(name)
    model.eval()
    out = _run(model, case)
    return {"base": base, "out": out, "meta": {"name": name, "missing_keys": info.get("missing_keys", []),
                                                 "unexpected_keys": info.get("unexpected_keys", []),
                                                 "config": model.adapters_config.get(name).to_dict()}}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: adapterhub_files.py REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    run = {"save": save_case, "load": load_case}[request["mode"]]
    for case in request["cases"]:
        res = run(case)
        np.savez(case["out"], last_hidden_state=res["out"], base_last_hidden_state=res["base"],
                 meta=np.array(json.dumps(res["meta"], default=str)))
        print(f"{request['mode']} {case['dir']}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
