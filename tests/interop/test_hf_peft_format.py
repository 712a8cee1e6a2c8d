"""Our HF PEFT file export / import against the real ``peft`` (torch CPU), tiny random Llama and BERT.

(a) an adapter attached here with random weights, exported, loads with ``PeftModel.from_pretrained``
and gives our logits (1e-4 fp32); (b) an adapter made and saved by HF PEFT imports here and gives its
logits; (c) export-then-import returns the state bitwise. Negative control: the exported model's logits
differ from the bare base's.
"""

import copy

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import test_hf_peft_lora as ref  # noqa: E402  (its helpers and module fixture: the same bases, batch, tolerance)

import peft_jax  # noqa: E402
from peft_jax.io import hf_peft  # noqa: E402
from peft_jax.io.frontends import nnx_base  # noqa: E402

bases = ref.bases

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

KEYS = {"llama": hf_peft.DECODER, "bert": hf_peft.ENCODER}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}
# name -> (our LoraConfig kwargs, HF LoraConfig kwargs)
CASES = {
    "lora": ({}, {}),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "embed": ({}, {}),  # LoRA on the token embedding too (lora_embedding_A / _B)
    "head": ({"modules_to_save": ["classifier"]}, {"modules_to_save": ["classifier"]}),  # a head trained whole
    "patterns": ({"rank_pattern": {r".*/v_proj": 2}, "alpha_pattern": {r".*/down_proj": 3.0}},
                 {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}),
}
PARAMS = [("llama", c) for c in ("lora", "rslora", "dora", "patterns", "embed")] + [("bert", "lora"), ("bert", "head")]
EXTRA_TARGETS = {"embed": ["embed_tokens"]}



def _randomised(model, seed):
    state = peft_jax.nnx.adapter_state(model, "default")
    keys = jax.random.split(jax.random.key(seed), len(state))
    new = {k: np.asarray(v) + 0.3 * np.asarray(jax.random.normal(kk, v.shape, v.dtype))
           for kk, (k, v) in zip(keys, sorted(state.items()))}
    peft_jax.nnx.load_adapter_state(model, new)
    return new


@pytest.mark.parametrize("arch,case", PARAMS)
def test_export_loads_in_hf_and_round_trips(bases, tmp_path, arch, case):
    hf_base, d = bases[arch]
    ours = ref._load_ours(arch, d)
    cfg = peft_jax.LoraConfig(targets=TARGETS[arch] + EXTRA_TARGETS.get(case, []), rank=4, alpha=8,
                              **CASES[case][0])
    ours = peft_jax.nnx.attach(ours, cfg, rngs=nnx.Rngs(1))
    state = _randomised(ours, 3)
    parts = peft_jax.io.frontends.nnx_parts(ours, "default")
    out = hf_peft.export_hf_peft(parts, tmp_path / "a", key_map=KEYS[arch])
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), out).eval()
    batch = ref._batch(arch)
    logits = ref._assert_logits_match(arch, hf, ours, batch)  # (a)
    bare = ref._hf_logits(arch, hf_base, batch)
    assert np.abs(bare - ref._hf_logits(arch, hf, batch)).max() > 1e-2  # negative control
    assert logits.size
    _, again = hf_peft.import_hf_peft(out, architecture=parts.architecture, base=nnx_base(ours), key_map=KEYS[arch])
    assert sorted(again) == sorted(state)  # (c)
    for k in state:
        np.testing.assert_array_equal(again[k], state[k])


@pytest.mark.parametrize("arch,case", PARAMS)
def test_hf_made_adapter_imports(bases, tmp_path, arch, case):
    hf_base, d = bases[arch]
    hf = peft.get_peft_model(copy.deepcopy(hf_base), peft.LoraConfig(
        target_modules=TARGETS[arch] + EXTRA_TARGETS.get(case, []), r=4, lora_alpha=8, **CASES[case][1])).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    hf.save_pretrained(tmp_path / "h")
    ours = ref._load_ours(arch, d)
    config, state = hf_peft.import_hf_peft(tmp_path / "h", architecture=type(ours).__name__, base=nnx_base(ours),
                                           key_map=KEYS[arch])
    ours = peft_jax.nnx.attach(ours, config, rngs=nnx.Rngs(0))
    peft_jax.nnx.load_adapter_state(ours, state)
    ref._assert_logits_match(arch, hf, ours, ref._batch(arch))  # (b)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_one_call_save_and_load(bases, tmp_path, arch):
    """`save_hf_peft` / `load_hf_peft` with the key map picked from the model's architecture."""
    hf_base, d = bases[arch]
    ours = peft_jax.nnx.attach(ref._load_ours(arch, d), peft_jax.LoraConfig(targets=TARGETS[arch], rank=4),
                               rngs=nnx.Rngs(1))
    _randomised(ours, 4)
    out = hf_peft.save_hf_peft(ours, tmp_path / "a", task_type="CAUSAL_LM" if arch == "llama" else None)
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), out).eval()
    ref._assert_logits_match(arch, hf, ours, ref._batch(arch))
    again = hf_peft.load_hf_peft(ref._load_ours(arch, d), out, name="other")
    ref._assert_logits_match(arch, hf, again, ref._batch(arch))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny random Qwen2 (biased q/k/v, tied embeddings), saved; decoder helpers of `ref` apply."""
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ref.LLAMA, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(d, safe_serialization=True)
    return hf, d


def test_qwen2_both_ways(qwen2, tmp_path):
    hf_base, d = qwen2
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    ours = peft_jax.nnx.attach(ref._load_ours("llama", d), peft_jax.LoraConfig(targets=targets, rank=4, alpha=8),
                               rngs=nnx.Rngs(1))
    _randomised(ours, 6)
    out = hf_peft.save_hf_peft(ours, tmp_path / "a", task_type="CAUSAL_LM")
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), out).eval()
    batch = ref._batch("llama")
    ref._assert_logits_match("llama", hf, ours, batch)  # ours -> HF
    assert np.abs(ref._hf_logits("llama", hf_base, batch) - ref._hf_logits("llama", hf, batch)).max() > 1e-2

    made = peft.get_peft_model(copy.deepcopy(hf_base), peft.LoraConfig(target_modules=targets, r=2, lora_alpha=4))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    made.eval().save_pretrained(tmp_path / "h")
    again = hf_peft.load_hf_peft(ref._load_ours("llama", d), tmp_path / "h")
    ref._assert_logits_match("llama", made, again, batch)  # HF -> ours
