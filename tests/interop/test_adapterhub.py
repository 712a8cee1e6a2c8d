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

Prefix tuning and AdapterHub's unions (``COMBO_CASES``) go through the same harness: prefix tuning
(reparameterized, flat, gated with one or two gates), MAM and UniPELT, each built here by the
library's recipe (`peft_jax.methods.recipes.prefix_tuning` with ``count_positions=False``, since
AdapterHub does not shift BERT's positions after the prefix; `mam`; `unipelt`). AdapterHub's prefix
pool (``prefix_tuning.prefix_tunings.a.self_prefix.wte`` / ``control_trans``) maps to the shared
params ``a/shared/prefix_*``, its flat ``control_trans`` vector ``(N * 2L * H * d)`` to each
attention tap's ``prefix_key`` / ``prefix_value``, its prefix gates to ``prefix_gate_*``, its gated
LoRA (``loras.a.lora_A`` / ``lora_B`` / ``gate``) to `GatedLora`'s params. Every option our recipe
shares with AdapterHub's resolved config must agree (so the recipes' defaults are AdapterHub's),
and after `peft_jax.nnx.fold` (prefix MLP evaluated into flat prefixes) the outputs must not move.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
from peft_jax.core.select import compile_selector  # noqa: E402
from peft_jax.hooks.taps import ResidualTap  # noqa: E402
from peft_jax.methods import bottleneck as bn  # noqa: E402
from peft_jax.methods import prefix as pt  # noqa: E402
from peft_jax.methods import recipes  # noqa: E402
from peft_jax.methods.base import AttentionSite  # noqa: E402
from peft_jax.methods.config import at_taps  # noqa: E402
from peft_jax.methods.gated_lora import GatedLora  # noqa: E402
from peft_jax.methods.phm import Phm  # noqa: E402
from peft_jax.models.encoder import ROLES, load_encoder  # noqa: E402

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
# Prefix tuning and unions: name -> (AdapterHub config name, its overrides, our config, noise).
# A prefix barely moves BERT's outputs at noise 0.2, so those cases draw larger adapter tensors.
COMBO_CASES: dict[str, tuple[str, dict, object, float]] = {
    "prefix_tuning": ("prefix_tuning", {}, lambda: recipes.prefix_tuning(
        30, projection=True, encoder_hidden_size=512, count_positions=False), 1.0),
    "prefix_tuning_flat": ("prefix_tuning_flat", {}, lambda: recipes.prefix_tuning(
        30, count_positions=False), 1.0),
    "prefix_tuning_two_gates": ("prefix_tuning", {
        "prefix_length": 7, "bottleneck_size": 24, "use_gating": True, "shared_gating": False},
        lambda: recipes.prefix_tuning(7, projection=True, encoder_hidden_size=24, use_gating=True,
                                      shared_gating=False, count_positions=False), 1.0),
    "mam": ("mam", {}, lambda: recipes.mam(roles=ROLES), 0.5),
    "unipelt": ("unipelt", {}, lambda: recipes.unipelt(roles=ROLES, lora_targets=["query", "value"]),
                0.5),
}
AH_PREFIX = f"prefix_tuning.prefix_tunings.{ADAPTER}.self_prefix."
# Our shared prefix params -> (AdapterHub's pool tensor, transposed?).
PREFIX_SHARED = {"prefix_embedding": ("wte.weight", False),
                 "prefix_hidden_kernel": ("control_trans.0.weight", True),
                 "prefix_hidden_bias": ("control_trans.0.bias", False),
                 "prefix_out_kernel": ("control_trans.2.weight", True),
                 "prefix_out_bias": ("control_trans.2.bias", False)}
# Per-site params of prefix tuning and gated LoRA -> (AdapterHub's name under the layer, transposed?).
PREFIX_GATE = {"prefix_gate_kernel": ("weight", True), "prefix_gate_bias": ("bias", False)}
GATED_LORA = {"lora_a": ("lora_A", True), "lora_b": ("lora_B", True),
              "lora_gate/kernel": ("gate.weight", True), "lora_gate/bias": ("gate.bias", False)}
AH_LORA_MATRIX = {"query": "q", "key": "k", "value": "v"}
PHM_FIELDS = {f.name for f in dataclasses.fields(Phm)}
# AdapterHub's location keys -> our roles (BertSelfOutput / BertOutput).
AH_LOCATION = {"attention": "attention.output", "ffn": "output"}


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, dict]:
    """All reference cases from one AdapterHub subprocess: name -> arrays and meta."""
    d = tmp_path_factory.mktemp("adapterhub")
    specs = [(name, ah_name, overrides, 0.2) for name, (ah_name, overrides) in CASES.items()]
    specs += [(name, ah_name, overrides, noise)
              for name, (ah_name, overrides, _, noise) in COMBO_CASES.items()]
    cases = [dict(out=str(d / f"{name}.npz"), bert=BERT, adapter=ah_name, overrides=overrides,
                  seed=i, noise=noise, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)
             for i, (name, ah_name, overrides, noise) in enumerate(specs)]
    request = d / "request.json"
    request.write_text(json.dumps({"cases": cases}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(AH_PYTHON), str(REF_SCRIPT), str(request)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"adapterhub_ref.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = {}
    for (name, *_), case in zip(specs, cases, strict=True):
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


def _methods(layer) -> list[tuple[object, tuple[str, ...]]]:
    """``(method, its top-level param names)`` of adapter ``a`` at an adapted layer."""
    slot = dict(layer.slots())[ADAPTER]
    return list(zip(slot.methods, slot.param_names))


def _ah_flat_prefix(ah: dict[str, np.ndarray], site) -> np.ndarray:
    """AdapterHub's flat ``control_trans`` ``(N * 2L * H * d)`` viewed ``(N, 2L, H, d)``, as its
    ``FlatPrefixTuning.forward`` views it (layer ``l``: rows ``2l`` keys, ``2l + 1`` values)."""
    flat = ah[AH_PREFIX + "control_trans"]
    return flat.reshape(-1, 2 * site.num_layers, site.num_kv_heads, site.head_dim)


def _to_ours(model, ref) -> tuple[dict[str, np.ndarray], set[str]]:
    """Our canonical adapter state filled from AdapterHub's tensors, and the AH names used.

    Each of our keys is mapped by the method that owns it at its site: a bottleneck through
    `adapterhub_names`, prefix tuning to AdapterHub's prefix pool and gates, a gated LoRA to the
    layer's ``loras.a`` module."""
    ah = _ah_tensors(ref)
    layers = dict(peft_jax.nnx.adapted_layers(model))
    bottlenecks = [m for layer in layers.values() for m, _ in _methods(layer)
                   if isinstance(m, bn.Bottleneck)]
    values, used = {}, set()
    for key, current in peft_jax.nnx.adapter_state(model, ADAPTER).items():
        derived = None
        if key.startswith(f"{ADAPTER}/shared/"):
            rel = key[len(f"{ADAPTER}/shared/"):]
            if rel in PREFIX_SHARED:
                name, transpose = PREFIX_SHARED[rel]
                ah_key = AH_PREFIX + name
            else:
                entry = bn.adapterhub_names(bottlenecks[0])["shared/" + rel]
                assert entry.shared, key
                ah_key, transpose = f"shared_parameters.{ADAPTER}.{entry.key}", entry.transpose
        else:
            path, rel = key.split(f"/{ADAPTER}/", 1)
            site = layers[path].site
            (method,) = [m for m, names in _methods(layers[path]) if rel.split("/")[0] in names]
            if isinstance(method, bn.Bottleneck):
                entry = bn.adapterhub_names(method)[rel]
                ah_key = (f"encoder.layer.{site.index}.{AH_LOCATION[site.role]}.adapters.{ADAPTER}."
                          f"{entry.key}")
                transpose = entry.transpose
            elif isinstance(method, pt.PrefixTuning) and rel in PREFIX_GATE:
                name, transpose = PREFIX_GATE[rel]
                ah_key = (f"encoder.layer.{site.index}.attention.self.prefix_tuning.prefix_gates."
                          f"{ADAPTER}.{name}")
            elif isinstance(method, pt.PrefixTuning):  # a flat prefix: one slice of AH's vector
                ah_key, transpose = AH_PREFIX + "control_trans", False
                row = 2 * site.index + {"prefix_key": 0, "prefix_value": 1}[rel]
                derived = _ah_flat_prefix(ah, site)[:, row]
            elif isinstance(method, GatedLora):
                layer_index, matrix = re.fullmatch(
                    r"encoder/layer/(\d+)/attention/self/(query|key|value)", path).groups()
                name, transpose = GATED_LORA[rel]
                ah_key = f"encoder.layer.{layer_index}.attention.self.{matrix}.loras.{ADAPTER}.{name}"
            else:
                raise AssertionError(f"no AdapterHub mapping for {type(method).__name__} ({key})")
        assert ah_key in ah, f"{key} -> {ah_key}, which AdapterHub does not have"
        value = derived if derived is not None else ah[ah_key].T if transpose else ah[ah_key]
        assert value.shape == tuple(current.shape), (key, ah_key, value.shape, current.shape)
        values[key] = value
        used.add(ah_key)
    return values, used


def _unused(ref, used: set[str]) -> list[str]:
    return sorted(n for n in ref["meta"]["adapter_names"]
                  if not used & set(ref["meta"]["aliases"].get(n, [n])))


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
    values, used = _to_ours(model, ref)
    unused = _unused(ref, used)
    assert not unused, f"AdapterHub tensors with no counterpart here: {unused}"
    peft_jax.nnx.load_adapter_state(model, values)

    ours = np.asarray(model(ids, mask).last_hidden_state)
    theirs = arrays["last_hidden_state"]
    assert np.abs(theirs - base).max() > 0.05, "the reference adapter barely changes the output"
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


# --- prefix tuning, MAM, UniPELT -----------------------------------------------------------------
def _components(ref) -> dict[str, dict]:
    """AdapterHub's resolved config per component (``prefix_tuning``, ``bottleneck``, ``lora``)."""
    cfg = ref["meta"]["config"]
    parts = cfg["configs"] if cfg.get("architecture") == "union" else [cfg]
    out = {}
    for part in parts:
        key = part.get("architecture") or "bottleneck"
        assert key not in out, f"two {key} components"
        out[key] = part
    return out


def _our_components(cfg) -> dict[str, tuple[object, object]]:
    """Our config's methods per AdapterHub component: ``{kind: (method, placement)}``."""
    out = {}
    for p in cfg.placements():
        method = p.method_for("encoder/layer/0/attention/self/query")
        assert not isinstance(method, pt.PrefixPositions), \
            "AdapterHub does not shift BERT's positions after the prefix: count_positions=False"
        kind = ("prefix_tuning" if isinstance(method, pt.PrefixTuning) else "bottleneck"
                if isinstance(method, bn.Bottleneck) else "lora")
        if kind == "bottleneck" and kind in out:  # one adapter per role: same method
            assert out[kind][0] == method
            out[kind] = (method, (*out[kind][1], p))
            continue
        assert kind not in out, f"two {kind} placements"
        out[kind] = (method, (p,))
    return out


def _roles_of(placements) -> tuple[str, ...]:
    return tuple(role for role in ("attention", "ffn")
                 if any(p.targets == getattr(ROLES, role) for p in placements))


@pytest.mark.parametrize("case", list(COMBO_CASES))
def test_combination_options_match_adapterhub(refs, case):
    """Our recipe has AdapterHub's components, and every option they share has its value."""
    ah = _components(refs[case])
    ours = _our_components(COMBO_CASES[case][2]())
    assert set(ours) == set(ah)
    if "prefix_tuning" in ah:
        method, _ = ours["prefix_tuning"]
        c = ah["prefix_tuning"]
        assert method.num_virtual_tokens == c["prefix_length"]
        assert method.projection == (not c["flat"])
        if method.projection:
            assert method.encoder_hidden_size == c["bottleneck_size"]
            assert c["non_linearity"] == "tanh"  # our MLP's activation
        assert (method.use_gating, method.dropout) == (c["use_gating"], c["dropout"])
        if method.use_gating:
            assert method.shared_gating == c["shared_gating"]
        assert c["leave_out"] == [] and c["encoder_prefix"]
    if "bottleneck" in ah:
        method, placements = ours["bottleneck"]
        c = ah["bottleneck"]
        for f in dataclasses.fields(bn.Bottleneck):
            if f.name in c:
                assert getattr(method, f.name) == c[f.name], f.name
        assert method.phm is None and not c["phm_layer"]
        wanted = tuple(role for role, key in (("attention", "mh_adapter"), ("ffn", "output_adapter"))
                       if c[key])
        assert _roles_of(placements) == wanted
    if "lora" in ah:
        method, (placement,) = ours["lora"]
        c = ah["lora"]
        assert isinstance(method, GatedLora) == c["use_gating"]
        lora = method.lora if isinstance(method, GatedLora) else method
        assert (lora.rank, lora.alpha, lora.dropout) == (c["r"], c["alpha"], c["dropout"])
        assert c["selfattn_lora"] and not c["intermediate_lora"] and not c["output_lora"]
        assert c["composition_mode"] == "add" and not c["use_dora"] and c["init_weights"] == "lora"
        selected = compile_selector(placement.targets)
        matrices = {AH_LORA_MATRIX[m] for m in AH_LORA_MATRIX
                    if selected(f"encoder/layer/0/attention/self/{m}", None)}
        assert matrices == set(c["attn_matrices"])


def _run(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK)).last_hidden_state)


def _adapted(ref, cfg):
    model = load_encoder(ref["meta"]["base_dir"], "float32")
    peft_jax.nnx.attach(model, cfg, rngs=nnx.Rngs(0), name=ADAPTER)
    return model


def _check_fold_against_eject(model, values: dict, ref) -> None:
    """`peft_jax.methods.prefix.fold` of our MLP gives AdapterHub's ``eject()``: the MLP on
    ``wte`` viewed ``(N, 2L, H, d)`` (numpy, from AdapterHub's tensors)."""
    ah = _ah_tensors(ref)
    layers = {p: layer for p, layer in peft_jax.nnx.adapted_layers(model)
              if isinstance(layer.site, AttentionSite)}
    (method,) = {m for layer in layers.values() for m, _ in _methods(layer)
                 if isinstance(m, pt.PrefixTuning)}
    shared = {k: jnp.asarray(values[f"{ADAPTER}/shared/{k}"]) for k in PREFIX_SHARED}
    sites = [layer.site for layer in layers.values()]
    flat, per_site = pt.fold(method, shared, sites)
    assert not flat.projection
    get = {k: ah[AH_PREFIX + name].astype(np.float64) for k, (name, _) in PREFIX_SHARED.items()}
    hidden = np.tanh(get["prefix_embedding"] @ get["prefix_hidden_kernel"].T + get["prefix_hidden_bias"])
    ejected = hidden @ get["prefix_out_kernel"].T + get["prefix_out_bias"]
    site = sites[0]
    view = ejected.reshape(method.num_virtual_tokens, 2 * site.num_layers, site.num_kv_heads,
                           site.head_dim)
    tol = 2e-6 * np.abs(view).max()  # float32 sums over the MLP's hidden width, values ~ 50
    for path, layer in layers.items():
        i = layer.site.index
        np.testing.assert_allclose(per_site[path]["prefix_key"], view[:, 2 * i], atol=tol, rtol=0)
        np.testing.assert_allclose(per_site[path]["prefix_value"], view[:, 2 * i + 1], atol=tol, rtol=0)


@pytest.mark.parametrize("case", list(COMBO_CASES))
def test_combination_matches_adapterhub(refs, case):
    """Same weights -> same ``last_hidden_state`` as AdapterHub, before and after `fold`."""
    _, _, build, _ = COMBO_CASES[case]
    ref = refs[case]
    arrays = ref["arrays"]
    model = _adapted(ref, build())
    with peft_jax.nnx.disabled(model):
        base = _run(model)
    np.testing.assert_allclose(base, arrays["base_last_hidden_state"], atol=TOL, rtol=0)
    values, used = _to_ours(model, ref)
    unused = _unused(ref, used)
    assert not unused, f"AdapterHub tensors with no counterpart here: {unused}"
    peft_jax.nnx.load_adapter_state(model, values)

    ours = _run(model)
    theirs = arrays["last_hidden_state"]
    assert np.abs(theirs - base).max() > 0.05, "the reference adapter barely changes the output"
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)

    projected = any(k.startswith(f"{ADAPTER}/shared/prefix_") for k in values)
    if projected:
        _check_fold_against_eject(model, values, ref)
    peft_jax.nnx.fold(model)
    state = peft_jax.nnx.adapter_state(model, ADAPTER)
    assert not any(k.startswith(f"{ADAPTER}/shared/prefix_") for k in state), "fold kept the MLP"
    taps = [p for p, layer in peft_jax.nnx.adapted_layers(model)
            if isinstance(layer.site, AttentionSite)]
    assert taps and all(f"{p}/{ADAPTER}/prefix_key" in state for p in taps)
    folded = _run(model)
    np.testing.assert_allclose(folded, ours, atol=1e-5, rtol=0)
    np.testing.assert_allclose(folded, theirs, atol=TOL, rtol=0)


def test_prefix_positions_are_not_shifted_in_adapterhub(refs):
    """HF PEFT's convention (``count_positions=True``: real tokens start at position ``N``) does
    not reproduce AdapterHub on BERT, so the parity cases above must use ``count_positions=False``."""
    ref = refs["prefix_tuning"]
    model = _adapted(ref, recipes.prefix_tuning(30, projection=True, encoder_hidden_size=512))
    values, _ = _to_ours(model, ref)
    peft_jax.nnx.load_adapter_state(model, values)
    assert np.abs(_run(model) - ref["arrays"]["last_hidden_state"]).max() > 1e-2
