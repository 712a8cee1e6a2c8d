"""Every `--method` from the command line: a short run on a tiny BERT classifier (and, for a
spread of families, on a tiny decoder) trains, saves an adapter that `peft-jax eval` loads back to
the recorded scores; method options arrive as --METHOD.FIELD flags; bad options are typed errors."""

import json

import pytest
from train import tiny, tiny_decoder

from peft_jax import cli
from peft_jax.train.evaluation import evaluate_run
from peft_jax.train.method_choice import METHOD_CHOICES

FAST = ["--max-length", "16", "--bucket", "16", "--batch-size", "8", "--eval-batch-size", "24",
        "--steps", "3", "--eval-every", "0", "--lr", "1e-2", "--rank", "2", "--alpha", "4"]
# options that fit the tiny models (hidden 16 / 32); everything else at the method's defaults
OPTIONS = {"vera": ["--vera.rank", "4"], "oft": ["--oft.oft_block_size", "4"],
           "prompt": ["--prompt.num_virtual_tokens", "3"], "p-tuning": ["--p-tuning.num_virtual_tokens", "3"],
           "prefix": ["--prefix.num_virtual_tokens", "3"], "llama-adapter": ["--llama-adapter.adapter_len", "3"],
           "seq_bn": ["--seq_bn.reduction_factor", "4"], "compacter": ["--compacter.reduction_factor", "4"],
           "compacter++": ["--compacter++.reduction_factor", "4"]}


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return tiny.write_model(root / "model"), tiny.write_data(root / "data")


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    (root / "story.txt").write_text("\n".join(tiny_decoder.LINES * 30))
    return tiny_decoder.write_decoder(root / "model"), root / "story.txt"


@pytest.mark.parametrize("method", sorted(METHOD_CHOICES))
def test_every_method_trains_a_classifier_that_loads_back(method, encoder_files, tmp_path):
    model, data = encoder_files
    out = tmp_path / "run"
    layers = [] if METHOD_CHOICES[method].at_taps else ["--layers", "top:1"]
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--method", method,
                     *OPTIONS.get(method, []), *layers, "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and 0 < results["trainable_params"] < results["total_params"]
    assert results["settings"]["method_options"] == {
        f.split(".")[1]: int(v) for f, v in zip(OPTIONS.get(method, [])[::2], OPTIONS.get(method, [])[1::2])}
    assert evaluate_run(out)["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-4)


@pytest.mark.parametrize("method", ["ia3", "prefix", "llama-adapter", "seq_bn"])
def test_methods_train_a_language_model(method, decoder_files, tmp_path):
    model, text = decoder_files
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(text), "--method", method,
                     *OPTIONS.get(method, []), "--eval-rows", "1000", "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_perplexity_after"] != results["test_perplexity_before"]
    assert evaluate_run(out)["perplexity"] == pytest.approx(results["test_perplexity_after"], rel=1e-4)


@pytest.mark.parametrize("argv,match", [
    (["--method", "lora", "--vera.rank", "4"], "belong to another method"),
    (["--method", "nope"], "unknown method"),
    (["--method", "oft", "--oft.oft_block_size", "5"], "oft"),
])
def test_bad_method_flags(argv, match, encoder_files, tmp_path, capsys):
    model, data = encoder_files
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), *argv, "--out", str(out), *FAST]) == 2
    assert match in capsys.readouterr().err and not out.exists()
