"""`peft-jax train` on a decoder: a tiny random LLaMA on plain text (perplexity falls, samples and
HF PEFT CAUSAL_LM files written) and on chat rows (it learns the taught answer format), plus bad
input (typed errors, exit 2, nothing written)."""

import json
import re

import jax
import pytest
from train import tiny_decoder

from peft_jax import cli
from peft_jax.train.metrics import read_metrics

COLORS = ["red", "blue", "green", "black", "white", "pink", "brown", "gray"]
THINGS = ["cat", "sky", "tree", "box", "car", "cup", "hat", "door", "bird", "fish"]
FAST = ["--max-length", "32", "--bucket", "32", "--batch-size", "8", "--eval-batch-size", "8",
        "--log-every", "5", "--rank", "4", "--alpha", "8"]


def _story(n=400):
    return [f"the {THINGS[i % 10]} is {COLORS[i % 8]} and the {THINGS[(i + 3) % 10]} is "
            f"{COLORS[(i + 5) % 8]}." for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lines = _story(40) + [f"what color is the {t}? the {t} is {c}." for t in THINGS for c in COLORS]
    return tiny_decoder.write_decoder(tmp_path_factory.mktemp("tiny-lm"), lines, vocab_size=400,
                                      hidden_size=48)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("text")
    (root / "story.txt").write_text("\n".join(_story()))
    out = root / "run"
    rc = cli.main(["train", "--model", str(model_dir), "--data", str(root / "story.txt"),
                   "--steps", "40", "--lr", "5e-2", "--eval-every", "20", "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_text_run_lowers_held_out_perplexity(text_run, capsys):
    results = json.loads((text_run / "results.json").read_text())
    assert results["task"] == "causal-lm" and results["data_kind"] == "text"
    assert results["test_perplexity_after"] < 0.7 * results["test_perplexity_before"]
    assert results["val_perplexity_after"] < results["val_perplexity_before"]
    assert len(results["samples"]) == 3 and all(s["before"] != s["after"] for s in results["samples"])
    assert results["steps"] == 40 and results["trainable_params"] < 0.2 * results["total_params"]
    evals = [r for r in read_metrics(text_run / "metrics.jsonl") if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [20, 40]
    config = json.loads((text_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    names = {m.rsplit(".", 1)[-1] for m in config["target_modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (text_run / "metrics.png").is_file()
    env = results["environment"]
    assert env["versions"]["jax"] == jax.__version__ and env["peak_rss_bytes"] > 0 and env["cpu_model"]


def _chat_rows(n, seed):
    rows = []
    for i in range(n):
        thing, color = THINGS[(i * 7 + seed) % 10], COLORS[(i * 3 + seed) % 8]
        rows.append({"messages": [{"role": "user", "content": f"what color is the {thing}?"},
                                  {"role": "assistant", "content": f"the {thing} is {color}."}]})
    return rows


def test_chat_run_learns_the_answer_format(tmp_path, model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(300, 0)))
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model_dir), "--data", str(data), "--steps", "150",
                   "--lr", "2e-2", "--out", str(out), *FAST])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data_kind"] == "chat"
    assert results["test_loss_after"] < 0.5 * results["test_loss_before"]
    answer = re.compile(r"the (\w+) is (\w+)\.")
    for sample in results["samples"]:  # held-out prompts, rendered with the template
        assert sample["prompt"].endswith("<|im_start|>assistant\n")
        assert answer.fullmatch(sample["after"]), sample  # the format, then it stops (EOS)
        assert not answer.fullmatch(sample["before"]), sample


def test_resume_without_a_checkpoint_starts_at_step_0(tmp_path, model_dir, capsys):
    (tmp_path / "story.txt").write_text("\n".join(_story(100)))
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model_dir), "--data", str(tmp_path / "story.txt"),
                   "--steps", "2", "--out", str(out), "--resume", *FAST])
    assert rc == 0 and "starting from step 0" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "hi"}\n', "no 'text' field"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ("", "holds no rows"),
])
def test_bad_data_writes_nothing(tmp_path, model_dir, capsys, content, match):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "DataError" in err and match in err and not out.exists()
