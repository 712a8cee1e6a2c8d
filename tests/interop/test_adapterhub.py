"""Parity of our bottleneck adapters with the real AdapterHub (``adapters`` 1.3.0) on a tiny BERT.

AdapterHub pins transformers ~=4.57, which cannot share the main venv with transformers 5, so it
lives in ``.venv-adapterhub`` (``bash scripts/setup_adapterhub.sh``) and runs in one subprocess
(``adapterhub_ref.py``) for all cases. Without that venv the module is skipped.

For each case the reference builds a seeded random ``BertModel`` (hidden 32, 2 layers, 4 heads,
intermediate 64, dropout 0), saves it as an HF checkpoint, adds adapter ``a`` with the AdapterHub
config, overwrites *every* adapter tensor (gates, scalings, PHM rules, zero-init up projections
too) with seeded noise and runs a padded batch. Here the library's own loader reads that
checkpoint, the matching preset (`peft_jax.methods.bottleneck.preset`) is attached at the
encoder's residual taps of the preset's roles (``locations``), AdapterHub's tensors are written
into the canonical layout through `adapterhub_names` (``"<tap path>/a/<param>"``, shared state
``"a/shared/<param>"``), and ``last_hidden_state`` must agree to 1e-4 at every position (the
gates average over padding too, as AdapterHub's do). Every AdapterHub tensor must be used and
every one of ours filled, and the adapter must move the output clearly away from the base model,
so a no-op adapter cannot pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
AH_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"
REF_SCRIPT = Path(__file__).with_name("adapterhub_ref.py")

if not AH_PYTHON.exists():
    pytest.skip(f"no AdapterHub venv at {AH_PYTHON.relative_to(ROOT)}; create it with "
                "`bash scripts/setup_adapterhub.sh`", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax.hooks.taps import ResidualTap  # noqa: E402
from peft_jax.methods import bottleneck as bn  # noqa: E402
from peft_jax.methods.config import at_taps  # noqa: E402
from peft_jax.methods.phm import Phm  # noqa: E402
from peft_jax.models.encoder import load_encoder  # noqa: E402

pytestmark = pytest.mark.interop

TOL = 1e-4
ADAPTER = "a"  # adapterhub_ref.ADAPTER_NAME
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
# Row 0 is padded, so a gate that averaged over real tokens only would disagree.
INPUT_IDS = [[2, 5, 7, 9, 11, 13, 0, 0], [3, 4, 8, 10, 12, 14, 16, 18]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]
# hidden 32: Compacter's default rf 32 gives m = 1, which phm_dim 4 cannot divide; rf 4 gives 8.
CASES: dict[str, tuple[str, dict]] = {
    "seq_bn": ("seq_bn", {}),
    "double_seq_bn": ("double_seq_bn", {}),
    "par_bn": ("par_bn", {}),
    "scaled_par_bn": ("scaled_par_bn", {}),
    "compacter": ("compacter", {"reduction_factor": 4}),
    "compacter++": ("compacter++", {"reduction_factor": 4}),
    # The options the presets leave at their defaults.
    "seq_bn_ln_gate_channel": ("seq_bn", {"ln_before": True, "ln_after": True, "use_gating": True,
                                          "scaling": "channel", "residual_before_ln": "post_add"}),
    "double_seq_bn_ln_after": ("double_seq_bn", {
        "ln_after": True, "adapter_residual_before_ln": True, "residual_before_ln": False,
        "non_linearity": "gelu_new", "reduction_factor": {"0": 4, "default": 8}}),
    "par_bn_gate_ln_after": ("par_bn", {"use_gating": True, "ln_after": True}),
    "compacter_own_factorized_rule": ("compacter", {
        "reduction_factor": 4, "shared_phm_rule": False, "factorized_phm_rule": True,
        "phm_rank": 2}),
    "compacter++_shared_w": ("compacter++", {"reduction_factor": 4, "shared_W_phm": True}),
    "compacter++_full_w_no_bias": ("compacter++", {"reduction_factor": 4,
                                                   "factorized_phm_W": False, "phm_bias": False}),
}
PHM_FIELDS = {f.name for f in dataclasses.fields(Phm)}
# AdapterHub's location keys -> our roles (BertSelfOutput / BertOutput).
AH_LOCATION = {"attention": "attention.output", "ffn": "output"}


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, dict]:
    """All reference cases from one AdapterHub subprocess: name -> arrays and meta."""
    d = tmp_path_factory.mktemp("adapterhub")
    cases = [dict(out=str(d / f"{name}.npz"), bert=BERT, adapter=ah_name, overrides=overrides,
                  seed=i, noise=0.2, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)
             for i, (name, (ah_name, overrides)) in enumerate(CASES.items())]
    request = d / "request.json"
    request.write_text(json.dumps({"cases": cases}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(AH_PYTHON), str(REF_SCRIPT), str(request)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"adapterhub_ref.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = {}
    for name, case in zip(CASES, cases, strict=True):
        with np.load(case["out"]) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        out[name] = {"arrays": arrays, "meta": meta}
    return out


def _ours(ah_name: str, overrides: dict) -> bn.Bottleneck:
    """Our preset with AdapterHub's overrides (its ``phm_*`` options go into `Phm`)."""
    phm_kw = {k: v for k, v in overrides.items() if k in PHM_FIELDS}
    kw = {k: v for k, v in overrides.items() if k not in PHM_FIELDS}
    if phm_kw:
        kw["phm"] = Phm(**phm_kw)
    return bn.preset(ah_name, **kw)


def _config(ah_name: str, method: bn.Bottleneck):
    """The preset on the residual taps of its roles (AdapterHub's mh_adapter / output_adapter)."""
    roles = bn.locations(ah_name)
    return at_taps("residual", method, where=lambda site: site.role in roles)


def _has_residual_taps(model) -> bool:
    return any(isinstance(m, ResidualTap) for _, m in nnx.iter_graph(model))


def _ah_tensors(ref) -> dict[str, np.ndarray]:
    """AdapterHub's adapter tensors under each of their names (aliases included)."""
    arrays, meta = ref["arrays"], ref["meta"]
    out = {}
    for name in meta["adapter_names"]:
        value = arrays[f"adapter/{name}"]
        for alias in meta["aliases"].get(name, [name]):
            out[alias] = value
    return out


def _to_ours(model, method: bn.Bottleneck, ref) -> tuple[dict[str, np.ndarray], set[str]]:
    """Our canonical adapter state filled from AdapterHub's tensors, and the AH names used."""
    names = bn.adapterhub_names(method)
    ah = _ah_tensors(ref)
    sites = {path: layer.site for path, layer in peft_jax.nnx.adapted_layers(model)}
    values, used = {}, set()
    for key, current in peft_jax.nnx.adapter_state(model, ADAPTER).items():
        if key.startswith(f"{ADAPTER}/shared/"):
            entry = names["shared/" + key[len(f"{ADAPTER}/shared/"):]]
            assert entry.shared, key
            ah_key = f"shared_parameters.{ADAPTER}.{entry.key}"
        else:
            path, rel = key.split(f"/{ADAPTER}/", 1)
            site = sites[path]
            entry = names[rel]
            ah_key = (f"encoder.layer.{site.index}.{AH_LOCATION[site.role]}.adapters.{ADAPTER}."
                      f"{entry.key}")
        assert ah_key in ah, f"{key} -> {ah_key}, which AdapterHub does not have"
        value = ah[ah_key].T if entry.transpose else ah[ah_key]
        assert value.shape == tuple(current.shape), (key, ah_key, value.shape, current.shape)
        values[key] = value
        used.add(ah_key)
    return values, used


@pytest.mark.parametrize("case", list(CASES))
def test_preset_options_match_adapterhub(refs, case):
    """Every option our preset shares with AdapterHub's resolved config has its value."""
    ah_name, overrides = CASES[case]
    ours = _ours(ah_name, overrides)
    ah_cfg = refs[case]["meta"]["config"]
    for f in dataclasses.fields(bn.Bottleneck):
        if f.name in ah_cfg and f.name != "reduction_factor":
            assert getattr(ours, f.name) == ah_cfg[f.name], f.name
    rf = ours.reduction_factor
    assert (dict(rf) if isinstance(rf, tuple) else rf) == ah_cfg["reduction_factor"]
    assert (ours.phm is not None) == ah_cfg["phm_layer"]
    if ours.phm is not None:
        for name in PHM_FIELDS:
            assert getattr(ours.phm, name) == ah_cfg[name], name
    wanted = tuple(role for role, key in (("attention", "mh_adapter"), ("ffn", "output_adapter"))
                   if ah_cfg[key])
    assert bn.locations(ah_name) == wanted


@pytest.mark.parametrize("case", list(CASES))
def test_matches_adapterhub(refs, case):
    ah_name, overrides = CASES[case]
    ref = refs[case]
    arrays = ref["arrays"]
    model = load_encoder(ref["meta"]["base_dir"], "float32")
    ids, mask = jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK)
    base = np.asarray(model(ids, mask).last_hidden_state)
    np.testing.assert_allclose(base, arrays["base_last_hidden_state"], atol=TOL, rtol=0)
    if not _has_residual_taps(model):
        pytest.skip("peft_jax.models.encoder places no ResidualTap yet (after attention.output "
                    "and output, with role= and index=); this parity test needs them")

    method = _ours(ah_name, overrides)
    peft_jax.nnx.attach(model, _config(ah_name, method), rngs=nnx.Rngs(0), name=ADAPTER)
    values, used = _to_ours(model, method, ref)
    canonical = set(ref["meta"]["adapter_names"])
    unused = sorted(n for n in canonical
                    if not used & set(ref["meta"]["aliases"].get(n, [n])))
    assert not unused, f"AdapterHub tensors with no counterpart here: {unused}"
    peft_jax.nnx.load_adapter_state(model, values)

    ours = np.asarray(model(ids, mask).last_hidden_state)
    theirs = arrays["last_hidden_state"]
    assert np.abs(theirs - base).max() > 0.05, "the reference adapter barely changes the output"
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
