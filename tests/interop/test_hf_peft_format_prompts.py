"""HF PEFT's file format for the prompt family, both ways, against the real ``peft`` (torch CPU).

(a) Ours (random, non-zero params) -> `export_virtual_tokens` -> adapter_config.json +
adapter_model.safetensors -> ``peft.PeftModel.from_pretrained``: same logits. (b) HF's
``get_peft_model`` (params randomised) -> ``save_pretrained`` -> `import_virtual_tokens` -> ours:
same logits. Tiny random Llama (GQA) for prompt / P- / prefix tuning and LLaMA-Adapter, BERT for
prompt and prefix tuning; 1e-4 in fp32 on unpadded batches (the padding conventions are pinned in
test_hf_peft_prompts.py). Every case also checks that the adapter moves the outputs far beyond the
tolerance, so an adapter lost on the way cannot pass.
"""

import copy
import json

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402

import peft_jax  # noqa: E402
from peft_jax import errors  # noqa: E402
from peft_jax.io.atomic import atomic_directory  # noqa: E402
from peft_jax.io.frontends import nnx_parts  # noqa: E402
from peft_jax.io.hf_peft.virtual_tokens import export_virtual_tokens, import_virtual_tokens  # noqa: E402
from peft_jax.io.tensor_files import read_tensors, write_tensors  # noqa: E402
from peft_jax.models.decoder_load import load_decoder  # noqa: E402
from peft_jax.models.encoder import load_encoder  # noqa: E402

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

TOL = 1e-4
N = 5
HIDDEN = 12
VOCAB = 64
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


# --- bases and batches ------------------------------------------------------------------------------
def _saved(model, tmp_path_factory, name):
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d, safe_serialization=True)
    return model, d


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    return _saved(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    return _saved(transformers.BertModel(transformers.BertConfig(**BERT)), tmp_path_factory, "bert")


IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7))
MASK = np.ones_like(IDS)


def _hf_out(hf, virtual: bool) -> np.ndarray:
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    out = (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()
    return out[:, N:] if virtual else out  # HF returns the virtual positions of prompts too


def _our_out(ours) -> np.ndarray:
    out = ours(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
    return np.asarray(getattr(out, "last_hidden_state", out))


# --- the two sides of each case -------------------------------------------------------------------
KV_HEADS = {"llama": LLAMA["num_key_value_heads"], "bert": BERT["num_attention_heads"]}
ARCH = {"llama": ("CAUSAL_LM", "Decoder"), "bert": ("FEATURE_EXTRACTION", "Encoder")}
CASES = {  # name: (our config, HF config for a task type)
    "prompt": (peft_jax.prompt_tuning(N), lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=N)),
    "p_tuning_mlp": (peft_jax.p_tuning(N, encoder="mlp", encoder_hidden_size=HIDDEN),
                     lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=N, encoder_hidden_size=HIDDEN)),
    "p_tuning_lstm": (peft_jax.p_tuning(N, encoder="lstm", encoder_hidden_size=HIDDEN, encoder_num_layers=2),
                      lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=N, encoder_hidden_size=HIDDEN,
                                                         encoder_reparameterization_type="LSTM",
                                                         encoder_num_layers=2)),
    "prefix": (peft_jax.prefix_tuning(N), lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N)),
    "prefix_projection": (peft_jax.prefix_tuning(N, projection=True, encoder_hidden_size=HIDDEN),
                          lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N, prefix_projection=True,
                                                            encoder_hidden_size=HIDDEN)),
    "llama_adapter": (peft_jax.llama_adapter(4, 2),
                      lambda t: peft.AdaptionPromptConfig(task_type=t, adapter_len=4, adapter_layers=2)),
}
LLAMA_CASES = list(CASES)
BERT_CASES = ["prompt", "prefix"]


def _virtual(name: str) -> bool:
    return name == "prompt" or name.startswith("p_tuning")


def _ours(arch, d):
    return load_decoder(d)[0] if arch == "llama" else load_encoder(d, "float32")


def _randomise_ours(model):
    rng = np.random.default_rng(7)
    state = peft_jax.nnx.adapter_state(model)
    values = {}
    for key, value in state.items():
        if key.endswith("adaption_gate"):
            values[key] = np.full(value.shape, 0.7, np.float32)
        else:
            values[key] = rng.normal(0, 0.5, value.shape).astype(np.float32)
    peft_jax.nnx.load_adapter_state(model, values)


def _write_hf_dir(directory, fields, tensors, task, base_dir):
    config = {**fields, "base_model_name_or_path": str(base_dir), "task_type": task, "revision": None,
              "inference_mode": True}
    with atomic_directory(directory) as tmp:
        write_tensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory


def _base_out(base, arch):
    with torch.no_grad():
        out = base(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    return (out.logits if arch == "llama" else out.last_hidden_state).numpy()


def _check(got, ref, base_ref):
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff < TOL, diff
    moved = float(np.abs(base_ref - ref).max())
    print(f"max abs diff {diff:.2e}, adapter moves outputs by {moved:.2e}")
    assert moved > 100 * TOL  # the adapter matters


def _export_case(arch, name, fixture, tmp_path):
    base, d = fixture
    task, _ = ARCH[arch]
    ours = _ours(arch, d)
    peft_jax.nnx.attach(ours, CASES[name][0], rngs=nnx.Rngs(0))
    _randomise_ours(ours)
    fields, tensors = export_virtual_tokens(nnx_parts(ours, "default"))
    out = _write_hf_dir(tmp_path / "hf", fields, tensors, task, d)
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    mine = _our_out(ours)
    _check(mine, _hf_out(hf, _virtual(name)), _base_out(base, arch))
    # our own file imports back (P-tuning as prompt tuning, a projected prefix as a flat one)
    again = _ours(arch, d)
    hf_config = json.loads((out / "adapter_config.json").read_text())
    config, state = import_virtual_tokens(hf_config, read_tensors(out / "adapter_model.safetensors"),
                                          ARCH[arch][1], "back", num_kv_heads=KV_HEADS[arch])
    peft_jax.nnx.attach(again, config, rngs=nnx.Rngs(1), name="back")
    peft_jax.nnx.load_adapter_state(again, state)
    diff = float(np.abs(_our_out(again) - mine).max())
    print(f"round trip max abs diff {diff:.2e}")
    assert diff < TOL, diff


def _import_case(arch, name, fixture, tmp_path):
    base, d = fixture
    task, architecture = ARCH[arch]
    torch.manual_seed(3)
    hf = peft.get_peft_model(copy.deepcopy(base), CASES[name][1](task)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if key.endswith("adaption_gate"):
                p.fill_(0.7)
            elif p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    tensors = read_tensors(tmp_path / "hf" / "adapter_model.safetensors")
    config, state = import_virtual_tokens(hf_config, tensors, architecture, "mine")
    ours = _ours(arch, d)
    peft_jax.nnx.attach(ours, config, rngs=nnx.Rngs(0), name="mine")
    assert set(state) == set(peft_jax.nnx.adapter_state(ours, "mine"))
    peft_jax.nnx.load_adapter_state(ours, state)
    _check(_our_out(ours), _hf_out(hf, _virtual(name)), _base_out(base, arch))


# --- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LLAMA_CASES)
def test_llama_export_loads_in_hf_peft(llama, name, tmp_path):
    _export_case("llama", name, llama, tmp_path)


@pytest.mark.parametrize("name", LLAMA_CASES)
def test_llama_hf_peft_file_imports(llama, name, tmp_path):
    _import_case("llama", name, llama, tmp_path)


@pytest.mark.parametrize("name", BERT_CASES)
def test_bert_export_loads_in_hf_peft(bert, name, tmp_path):
    _export_case("bert", name, bert, tmp_path)


@pytest.mark.parametrize("name", BERT_CASES)
def test_bert_hf_peft_file_imports(bert, name, tmp_path):
    _import_case("bert", name, bert, tmp_path)


# --- refusals --------------------------------------------------------------------------------------------
def test_refusals(llama):
    _, d = llama
    ours = _ours("llama", d)
    peft_jax.nnx.attach(ours, peft_jax.prefix_tuning(N, use_gating=True), rngs=nnx.Rngs(0), name="gated")
    with pytest.raises(errors.InvalidConfigError, match="prefix gates"):
        export_virtual_tokens(nnx_parts(ours, "gated"))
    both = peft_jax.compose(peft_jax.LoraConfig(targets=["q_proj"], rank=2), peft_jax.prompt_tuning(N))
    peft_jax.nnx.attach(ours, both, rngs=nnx.Rngs(0), name="mixed")
    with pytest.raises(errors.InvalidConfigError, match="one method type"):
        export_virtual_tokens(nnx_parts(ours, "mixed"))
    prefix = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": N, "num_layers": 2, "num_attention_heads": None,
              "token_dim": 16}
    flat = {"prompt_embeddings": np.zeros((N, 64), np.float32)}
    with pytest.raises(errors.CheckpointError, match="num_kv_heads="):
        import_virtual_tokens(prefix, flat, "Decoder", "a")
    state = import_virtual_tokens(prefix, flat, "Decoder", "a", num_kv_heads=2)[1]
    assert state["layers/1/self_attn/attention_tap/a/prefix_key"].shape == (N, 2, 8)
    with pytest.raises(errors.CheckpointError, match="num_kv_heads=4"):
        import_virtual_tokens({**prefix, "num_attention_heads": 2}, flat, "Decoder", "a", num_kv_heads=4)
    table = {"prompt_embeddings": np.zeros((N, 32), np.float32)}
    hf = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": N, "token_dim": 32, "task_type": "CAUSAL_LM"}
    with pytest.raises(errors.InvalidConfigError, match="new_field"):
        import_virtual_tokens({**hf, "new_field": 1}, table, "Decoder", "a")
    with pytest.raises(errors.CheckpointError, match="num_virtual_tokens=6"):
        import_virtual_tokens({**hf, "num_virtual_tokens": 6}, table, "Decoder", "a")
    with pytest.raises(errors.UnsupportedArchitectureError, match="Decoder"):
        import_virtual_tokens(hf, table, "SomethingElse", "a")
    with pytest.raises(errors.InvalidConfigError, match="LORA"):
        import_virtual_tokens({**hf, "peft_type": "LORA"}, table, "Decoder", "a")
