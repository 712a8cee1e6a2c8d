"""HF PEFT AdaLoRA files both ways against the real ``peft`` (torch CPU), tiny random Llama and BERT
(the bases and helpers of ``test_hf_peft_methods``).

An AdaLoRA adapter made by HF PEFT, every param randomised (``lora_E`` off its zero init), then
given a non-trivial ``rank_pattern`` as HF's allocator leaves it (one layer pruned to rank 0, one
kept whole, the others partly; the pruned ``E`` entries zeroed, as ``masked_fill_`` does) and
saved (HF slices the tensors to the kept ranks): (a) loads here with `load_hf_peft` and gives
HF's logits (1e-4 fp32); (b) saved again with `save_hf_peft` (full ``init_r`` rows,
``rank_pattern: null``) loads in ``PeftModel.from_pretrained`` with the same logits; (c) our export
loads back bitwise. An adapter attached here exports to HF with our logits. Bad configs and
exports give typed errors that name the field.
"""

import copy
import json

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import test_hf_peft_methods as ref  # noqa: E402  (bases fixture, batch, logits helpers)

import peft_jax  # noqa: E402
from peft_jax import errors  # noqa: E402
from peft_jax.io import hf_peft  # noqa: E402
from peft_jax.io.frontends import AdapterParts  # noqa: E402

bases = ref.bases
pytestmark = [
    *ref.pytestmark,
    # HF warns (about DeepSpeed / FSDP shards) when it saves a layer pruned to rank 0 as (0, n)
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape:UserWarning"),
    # HF checks AdaLoRA's rank_pattern keys ('<module>.lora_E') as LoRA module patterns and warns
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning"),
]
INIT_R = 4
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj"], "bert": ["query", "value"]}


def _hf_config(arch):
    return peft.AdaLoraConfig(init_r=INIT_R, target_r=2, lora_alpha=8, target_modules=TARGETS[arch],
                              total_step=10, tinit=1, tfinal=2, deltaT=2, beta1=0.8, beta2=0.9,
                              orth_reg_weight=0.3)


def _method():
    return peft_jax.AdaLora(init_r=INIT_R, target_r=2, alpha=8.0, total_step=10, tinit=1, tfinal=2, delta_t=2,
                            beta1=0.8, beta2=0.9, orth_reg_weight=0.3)


def _prune(made) -> dict[str, list[bool]]:
    """An allocator-like rank pattern on HF's model: layer 0 keeps no rank, layer 1 all, the rest some."""
    from peft.tuners.adalora.layer import SVDLinear

    rng = np.random.default_rng(5)
    layers = sorted((n.removeprefix("base_model.model."), m) for n, m in made.named_modules()
                    if isinstance(m, SVDLinear))
    pattern = {}
    for i, (name, layer) in enumerate(layers):
        keep = [False] * INIT_R if i == 0 else [True] * INIT_R if i == 1 else list(rng.random(INIT_R) < 0.5)
        keep = [bool(k) for k in keep]
        with torch.no_grad():
            layer.lora_E["default"].masked_fill_(~torch.tensor(keep).view(-1, 1), 0.0)
        pattern[f"{name}.lora_E.default"] = keep
    made.peft_config["default"].rank_pattern = pattern
    return {k.removesuffix(".default"): v for k, v in pattern.items()}


def _logits(arch, model, batch, ours=False):
    fn = ref._our_logits if ours else ref._hf_logits
    return ref._real(arch, fn(arch, model, batch), batch)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_both_ways(bases, tmp_path, arch):
    hf_base, d = bases[arch]
    torch.manual_seed(1)
    made = peft.get_peft_model(copy.deepcopy(hf_base), _hf_config(arch))
    ref._randomise(made, 11)
    pattern = _prune(made)
    made.eval().save_pretrained(tmp_path / "hf")
    batch = ref._batch(arch)
    want = _logits(arch, made, batch)
    assert np.abs(want - _logits(arch, hf_base, batch)).max() > 1e-2
    saved = json.loads((tmp_path / "hf" / hf_peft.HF_CONFIG).read_text())
    assert saved["rank_pattern"] == pattern
    _, tensors = hf_peft.read_hf_peft(tmp_path / "hf")  # HF sliced the tensors to the kept ranks
    assert {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")} == {
        k: sum(v) for k, v in pattern.items()}
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), tmp_path / "hf").eval()
    assert float(np.abs(_logits(arch, reloaded, batch) - want).max()) < ref.TOL  # HF reads its own file so

    ours = hf_peft.load_hf_peft(ref._load_ours(arch, d), tmp_path / "hf")  # (a)
    got = _logits(arch, ours, batch, ours=True)
    diff_a = float(np.abs(got - want).max())
    assert diff_a < ref.TOL, diff_a
    state = peft_jax.nnx.adapter_state(ours, "default")
    for key, keep in pattern.items():  # the dropped ranks are rows of zeros, E = 0 included
        path = ref._ours_path(arch, key.removesuffix(".lora_E"))
        e = np.asarray(state[f"{path}/default/lora_e"])
        assert e.shape == (INIT_R,) and not e[~np.array(keep)].any(), path
        assert not np.asarray(state[f"{path}/default/lora_a"])[:, ~np.array(keep)].any(), path

    out = hf_peft.save_hf_peft(ours, tmp_path / "ours")  # (b)
    assert json.loads((out / hf_peft.HF_CONFIG).read_text())["rank_pattern"] is None
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), out).eval()
    diff_b = float(np.abs(_logits(arch, back, batch) - got).max())
    assert diff_b < ref.TOL, diff_b
    assert back.peft_config["default"].init_r == INIT_R and back.peft_config["default"].total_step == 10

    again = hf_peft.load_hf_peft(ref._load_ours(arch, d), out)  # (c)
    after = peft_jax.nnx.adapter_state(again, "default")
    assert sorted(state) == sorted(after)
    assert all(np.array_equal(np.asarray(state[k]), np.asarray(after[k])) for k in state)
    print(f"{arch}: max |logit diff| import {diff_a:.2e}, export {diff_b:.2e}")


def test_ours_to_hf(bases, tmp_path):
    """An AdaLoRA attached here (random factors, some E entries zero as after pruning) in HF PEFT."""
    hf_base, d = bases["llama"]
    ours = ref._load_ours("llama", d)
    peft_jax.nnx.attach(ours, peft_jax.place(TARGETS["llama"], _method()), rngs=nnx.Rngs(0))
    ours.eval()
    rng = np.random.default_rng(3)
    state = {k: rng.normal(0, 0.3, np.shape(v)).astype(np.float32)
             for k, v in peft_jax.nnx.adapter_state(ours, "default").items()}
    for k in state:
        if k.endswith("lora_e"):
            state[k][rng.random(INIT_R) < 0.4] = 0.0
    peft_jax.nnx.load_adapter_state(ours, state)
    batch = ref._batch("llama")
    got = _logits("llama", ours, batch, ours=True)
    out = hf_peft.save_hf_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), out).eval()
    want = _logits("llama", back, batch)
    assert np.abs(want - _logits("llama", hf_base, batch)).max() > 1e-2
    diff = float(np.abs(want - got).max())
    assert diff < ref.TOL, diff


# --- typed errors (toy tensors, no torch model) ------------------------------------------------------
KM = hf_peft.KeyMap(prefix="model.")
BASE = {"q/kernel": np.zeros((3, 4), np.float32), "k/kernel": np.zeros((3, 4), np.float32)}


def _site(path, method=None):
    return (path, "linear", (method or peft_jax.AdaLora(init_r=2, target_r=1, total_step=10),))


def _state(path, r=2):
    rng = np.random.default_rng(0)
    return {f"{path}/default/lora_a": rng.normal(size=(3, r)).astype(np.float32),
            f"{path}/default/lora_e": rng.normal(size=(r,)).astype(np.float32),
            f"{path}/default/lora_b": rng.normal(size=(r, 4)).astype(np.float32)}


def _export(tmp_path, sites=None, state=None):
    parts = AdapterParts("default", "Toy", tuple(sites or [_site("q")]), state or _state("q"), BASE)
    return hf_peft.export_hf_peft(parts, tmp_path / "a", key_map=KM)


def _import(d):
    return hf_peft.import_hf_peft(d, architecture="Toy", base=BASE, key_map=KM)


def _edit_config(d, **fields):
    cfg = json.loads((d / hf_peft.HF_CONFIG).read_text())
    (d / hf_peft.HF_CONFIG).write_text(json.dumps({**cfg, **fields}))


def test_toy_round_trip(tmp_path):
    config, state = _import(_export(tmp_path))
    assert config.placements()[0].method_for("q") == peft_jax.AdaLora(init_r=2, target_r=1, total_step=10)
    assert all(np.array_equal(v, _state("q")[k]) for k, v in state.items()) and len(state) == 3


@pytest.mark.parametrize("fields,named", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"total_step": None}, "total_step"),
    ({"rank_pattern": {"model.q.lora_E": 1}}, "rank_pattern"),
    ({"rank_pattern": {"model.q.lora_E": [True]}}, "rank_pattern"),
    ({"rank_pattern": {"model.q": [True, True]}}, "rank_pattern"),
])
def test_unsupported_field_is_named(tmp_path, fields, named):
    d = _export(tmp_path)
    _edit_config(d, **fields)
    with pytest.raises(errors.InvalidConfigError, match=named):
        _import(d)


def test_tensors_that_do_not_fit_the_rank_pattern(tmp_path):
    d = _export(tmp_path)
    _edit_config(d, rank_pattern={"model.q.lora_E": [True, False]})  # the file still holds both ranks
    with pytest.raises(errors.CheckpointError, match="rank_pattern"):
        _import(d)
    _edit_config(d, rank_pattern={"model.k.lora_E": [True, False]})  # a module without tensors
    with pytest.raises(errors.CheckpointError, match="model.k"):
        _import(d)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    other = peft_jax.AdaLora(init_r=2, target_r=1, total_step=20)
    with pytest.raises(errors.InvalidConfigError, match="total_step"):
        _export(tmp_path, [_site("q"), _site("k", other)], {**_state("q"), **_state("k")})
    lora = peft_jax.Lora(rank=2)
    with pytest.raises(errors.InvalidConfigError, match="AdaLora"):
        _export(tmp_path, [_site("q"), ("k", "linear", (lora,))], _state("q"))
    assert not (tmp_path / "a").exists()
