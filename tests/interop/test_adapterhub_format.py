"""AdapterHub's adapter files (`peft_jax.io.adapterhub`) against the real ``adapters`` 1.3.0.

(a) AdapterHub -> ours: ``adapterhub_files.py save`` builds a seeded tiny ``BertAdapterModel``, adds
each adapter with every tensor set to seeded noise and calls ``model.save_adapter(dir, "a")`` (torch
pickle; one case ``use_safetensors=True``); `import_adapterhub` + attach + ``load_adapter_state`` on
our encoder (loaded from the same base checkpoint) must give AdapterHub's ``last_hidden_state``
within 1e-4, and the adapter must move the output clearly (> 0.05) so a no-op cannot pass.

(b) ours -> AdapterHub: the same preset attached here with random non-zero weights, written by
`save_adapterhub` (``adapter.safetensors``; one case ``pytorch_adapter.bin``) and read by
``model.load_adapter(dir)`` in AdapterHub (``use_safetensors=True`` for safetensors) must give our
``last_hidden_state`` within 1e-4, with no missing or unexpected keys.

One AdapterHub subprocess per direction. The bad-input tests need no AdapterHub.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import peft_jax
from peft_jax import errors
from peft_jax.io.adapterhub import (
    AH_CONFIG,
    AH_SAFE_WEIGHTS,
    AH_TORCH_WEIGHTS,
    export_adapterhub,
    import_adapterhub,
    load_adapterhub,
    save_adapterhub,
)
from peft_jax.methods import bottleneck as bn
from peft_jax.methods.config import at_taps
from peft_jax.methods.phm import Phm

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
AH_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"
FILES_SCRIPT = Path(__file__).with_name("adapterhub_files.py")
TOL = 1e-4
NAME = "default"
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
INPUT_IDS = [[2, 5, 7, 9, 11, 13, 0, 0], [3, 4, 8, 10, 12, 14, 16, 18]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]
# case -> (AdapterHub config name, overrides, AdapterHub's weights file is safetensors / ours is torch).
CASES = {
    "seq_bn": ("seq_bn", {}, False),
    "double_seq_bn": ("double_seq_bn", {}, True),
    "compacter": ("compacter", {"reduction_factor": 4}, False),
    "compacter++": ("compacter++", {"reduction_factor": 4}, False),
}
PHM_FIELDS = {"phm_dim", "shared_phm_rule", "factorized_phm_rule", "phm_rank", "shared_W_phm",
              "factorized_phm_W", "phm_bias"}


def _subprocess(tmp: Path, mode: str, cases: list[dict]) -> list[dict]:
    if not AH_PYTHON.exists():
        pytest.skip(f"no AdapterHub venv at {AH_PYTHON.relative_to(ROOT)}; create it with "
                    "`bash scripts/setup_adapterhub.sh`")
    request = tmp / f"{mode}.json"
    request.write_text(json.dumps({"mode": mode, "cases": cases}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(AH_PYTHON), str(FILES_SCRIPT), str(request)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"adapterhub_files.py {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = []
    for case in cases:
        with np.load(case["out"]) as z:
            out.append({"last": z["last_hidden_state"], "base": z["base_last_hidden_state"],
                        "meta": json.loads(str(z["meta"]))})
    return out


def _case(tmp: Path, i: int, case: str, **kw) -> dict:
    return dict(out=str(tmp / f"{case}.npz"), bert=BERT, seed=i, input_ids=INPUT_IDS,
                attention_mask=ATTENTION_MASK, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict]:
    """(a): AdapterHub's saved adapter directories and outputs, one subprocess."""
    tmp = tmp_path_factory.mktemp("ah_save")
    cases = [_case(tmp, i, case, dir=str(tmp / case), name="a", adapter=ah, overrides=ov, noise=0.2,
                   safetensors=st)
             for i, (case, (ah, ov, st)) in enumerate(CASES.items())]
    return {case: dict(r, dir=c["dir"], seed=c["seed"])
            for case, c, r in zip(CASES, cases, _subprocess(tmp, "save", cases), strict=True)}


def _run(model) -> np.ndarray:
    import jax.numpy as jnp  # noqa: PLC0415

    return np.asarray(model(jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK)).last_hidden_state)


def _encoder(base_dir: str):
    from peft_jax.models.encoder import load_encoder  # noqa: PLC0415

    return load_encoder(base_dir, "float32")


@pytest.mark.slow  # the module's two AdapterHub subprocesses and 8 attaches take ~70 s together
@pytest.mark.parametrize("case", list(CASES))
def test_adapterhub_saved_adapter_imports(saved, case):
    ref = saved[case]
    model = _encoder(ref["meta"]["base_dir"])
    base = _run(model)
    np.testing.assert_allclose(base, ref["base"], atol=TOL, rtol=0)
    config, state = import_adapterhub(ref["dir"], name=NAME)
    peft_jax.nnx.attach(model, config, rngs=nnx.Rngs(0), name=NAME)
    assert set(state) == set(peft_jax.nnx.adapter_state(model, NAME)), "import and attach disagree on params"
    peft_jax.nnx.load_adapter_state(model, state)
    ours = _run(model)
    assert np.abs(ref["last"] - base).max() > 0.05, "the AdapterHub adapter barely changes the output"
    diff = np.abs(ours - ref["last"]).max()
    print(f"{case}: AdapterHub -> ours max abs diff {diff:.2e}")
    assert diff <= TOL


def _ours(ah_name: str, overrides: dict) -> bn.Bottleneck:
    phm_kw = {k: v for k, v in overrides.items() if k in PHM_FIELDS}
    kw = {k: v for k, v in overrides.items() if k not in PHM_FIELDS}
    if phm_kw:
        kw["phm"] = Phm(**phm_kw)
    return bn.preset(ah_name, **kw)


def _random_state(model, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in peft_jax.nnx.adapter_state(model, NAME).items():
        r = 0.2 * rng.standard_normal(value.shape).astype(np.float32)
        out[key] = (1 + r) if key.endswith("/scale") else r
    return out


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory) -> dict[str, dict]:
    """(b): our adapters written with `save_adapterhub`, loaded by AdapterHub, one subprocess."""
    tmp = tmp_path_factory.mktemp("ah_load")
    ours, cases = {}, []
    for case, (ah, overrides, torch_file) in CASES.items():
        model = _encoder(saved[case]["meta"]["base_dir"])
        roles = bn.locations(ah)
        cfg = at_taps("residual", _ours(ah, overrides), where=lambda site, roles=roles: site.role in roles)
        peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(0), name=NAME)
        peft_jax.nnx.load_adapter_state(model, _random_state(model, saved[case]["seed"] + 100))
        ours[case] = _run(model)
        out = save_adapterhub(model, tmp / case, name=NAME, adapter_name="b",
                              weights="torch" if torch_file else "safetensors")
        cases.append(_case(tmp, saved[case]["seed"], case, dir=str(out), use_safetensors=not torch_file))
    results = _subprocess(tmp, "load", cases)
    return {case: dict(r, ours=ours[case], dir=c["dir"]) for case, c, r in zip(CASES, cases, results, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_loads_in_adapterhub(exported, case):
    res = exported[case]
    files = sorted(os.listdir(res["dir"]))
    assert files == sorted([AH_CONFIG, AH_TORCH_WEIGHTS if CASES[case][2] else AH_SAFE_WEIGHTS])
    meta = res["meta"]
    assert meta["name"] == "b"
    assert meta["missing_keys"] == [] and meta["unexpected_keys"] == [], meta
    assert np.abs(res["ours"] - res["base"]).max() > 0.05, "our random adapter barely changes the output"
    diff = np.abs(res["last"] - res["ours"]).max()
    print(f"{case}: ours -> AdapterHub max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_exported_config_is_adapterhubs(saved, exported, case):
    """Our ``adapter_config.json`` is the one AdapterHub writes for the same preset (name aside)."""
    theirs = json.loads((Path(saved[case]["dir"]) / AH_CONFIG).read_text())
    ours = json.loads((Path(exported[case]["dir"]) / AH_CONFIG).read_text())
    assert (theirs.pop("name"), ours.pop("name")) == ("a", "b")
    assert ours == theirs


@pytest.mark.slow
def test_load_adapterhub_one_call(saved):
    """`load_adapterhub` (import, every check, attach, write) gives AdapterHub's output."""
    ref = saved["compacter"]
    model = load_adapterhub(_encoder(ref["meta"]["base_dir"]), ref["dir"], name="x")
    before = _run(model)
    assert np.abs(before - ref["last"]).max() <= TOL
    with pytest.raises(errors.PeftError):  # the same adapter name again: refused, the model unchanged
        load_adapterhub(model, ref["dir"], name="x")
    np.testing.assert_array_equal(_run(model), before)


# --- bad input (no AdapterHub) -------------------------------------------------------------------
PATH = "encoder/layer/0/output/residual"


def _small(tmp: Path, **kw) -> tuple[Path, dict]:
    m = bn.seq_bn(reduction_factor=4)
    rng = np.random.default_rng(0)
    shapes = {"down/kernel": (8, 2), "down/bias": (2,), "up/kernel": (2, 8), "up/bias": (8,)}
    state = {f"{PATH}/{NAME}/{k}": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return export_adapterhub([(PATH, "residual", (m,))], state, tmp / "ah", **kw), state


def test_round_trip_without_adapterhub(tmp_path):
    out, state = _small(tmp_path)
    config, back = import_adapterhub(out)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    record = json.loads((out / AH_CONFIG).read_text())
    assert record["config"]["output_adapter"] and not record["config"]["mh_adapter"]
    assert record["config"]["reduction_factor"] == 4 and record["hidden_size"] == 8


def test_unknown_config_field_is_named(tmp_path):
    out, _ = _small(tmp_path)
    record = json.loads((out / AH_CONFIG).read_text())
    record["config"]["frobnicate"] = True
    (out / AH_CONFIG).write_text(json.dumps(record))
    with pytest.raises(errors.InvalidConfigError, match="frobnicate"):
        import_adapterhub(out)


def test_other_architecture_refused(tmp_path):
    out, _ = _small(tmp_path)
    record = json.loads((out / AH_CONFIG).read_text())
    record["config"] = {"architecture": "lora", "r": 8}
    (out / AH_CONFIG).write_text(json.dumps(record))
    with pytest.raises(errors.InvalidConfigError, match="'lora'"):
        import_adapterhub(out)


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    out, _ = _small(tmp_path)
    data = (out / AH_SAFE_WEIGHTS).read_bytes()
    (out / AH_SAFE_WEIGHTS).write_bytes(data[: len(data) - 16])
    with pytest.raises(errors.CheckpointError):
        import_adapterhub(out)


def test_truncated_torch_file_is_a_checkpoint_error(tmp_path):
    pytest.importorskip("torch")
    out, _ = _small(tmp_path, weights="torch")
    data = (out / AH_TORCH_WEIGHTS).read_bytes()
    (out / AH_TORCH_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError, match="pytorch_adapter.bin"):
        import_adapterhub(out)


def test_missing_weight_is_a_checkpoint_error(tmp_path):
    out, _ = _small(tmp_path)
    from peft_jax.io.tensor_files import read_tensors, write_tensors  # noqa: PLC0415

    tensors = read_tensors(out / AH_SAFE_WEIGHTS)
    tensors.pop("bert.encoder.layer.0.output.adapters.default.adapter_up.bias")
    write_tensors(out / AH_SAFE_WEIGHTS, tensors)
    with pytest.raises(errors.CheckpointError, match="adapter_up.bias"):
        import_adapterhub(out)


def test_non_empty_out_dir_refused_without_overwrite(tmp_path):
    out, state = _small(tmp_path)
    before = (out / AH_SAFE_WEIGHTS).read_bytes()
    with pytest.raises(errors.CheckpointError, match="overwrite=True"):
        _small(tmp_path)
    assert (out / AH_SAFE_WEIGHTS).read_bytes() == before
    _small(tmp_path, overwrite=True)


def test_non_bottleneck_site_refused_before_writing(tmp_path):
    with pytest.raises(errors.UnsupportedArchitectureError, match="bottleneck"):
        export_adapterhub([("encoder/layer/0/attention/self/query", "linear", (peft_jax.Lora(rank=2),))],
                          {}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_shared_w_compacter_round_trip(tmp_path):
    """Compacter++ with shared ``B`` factors: shared state goes to ``shared_parameters`` and back."""
    m = bn.compacter_pp(reduction_factor=4, phm=Phm(shared_W_phm=True, phm_bias=False))
    names = bn.adapterhub_names(m)
    shapes = {"shared/phm_rule": (4, 4, 4), "shared/w_down_left": (4, 2, 1), "shared/w_down_right": (4, 1, 1),
              "shared/w_up_left": (4, 1, 1), "shared/w_up_right": (4, 1, 2)}
    assert set(names) == set(shapes)
    rng = np.random.default_rng(1)
    state = {f"{NAME}/{k}": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    out = export_adapterhub([(PATH, "residual", (m,))], state, tmp_path / "ah")
    record = json.loads((out / AH_CONFIG).read_text())
    assert record["hidden_size"] == 8 and record["config"]["shared_W_phm"]
    from peft_jax.io.tensor_files import read_tensors  # noqa: PLC0415

    assert "bert.shared_parameters.default.W_down_left" in read_tensors(out / AH_SAFE_WEIGHTS)
    with pytest.raises(errors.InvalidConfigError, match="num_layers="):
        import_adapterhub(out)  # nothing per layer: the files alone do not say where it goes
    config, back = import_adapterhub(out, num_layers=1)
    assert config.placements()[0].method == m
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
