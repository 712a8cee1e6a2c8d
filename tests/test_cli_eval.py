"""`peft-jax eval` and `peft-jax predict` on finished runs (a tiny BERT classifier and a tiny
decoder): the scores equal those the run recorded, predictions agree with them, bad input is a
typed error that writes nothing."""

import json

import pytest
from train import tiny, tiny_decoder

from peft_jax import cli

FAST = ["--max-length", "16", "--bucket", "16", "--batch-size", "8", "--eval-batch-size", "24",
        "--rank", "2", "--alpha", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    model, data = tiny.write_model(root / "model"), tiny.write_data(root / "data")
    out = root / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--steps", "12",
                     "--targets", "query,value", "--out", str(out), *FAST]) == 0
    return out, data


def _eval(capsys, *argv):
    code = cli.main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_eval_reproduces_the_recorded_test_scores(classifier_run, capsys):
    out, _ = classifier_run
    results = json.loads((out / "results.json").read_text())
    code, scores = _eval(capsys, "--run", out)
    assert code == 0
    assert scores["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-4)
    assert scores["macro_f1"] == pytest.approx(results["test_macro_f1"], abs=1e-4)
    assert scores["confusion_matrix"] == results["test_confusion_matrix"]
    assert scores["num_examples"] == results["num_test"]


def test_predict_agrees_with_eval(classifier_run, capsys, tmp_path):
    out, data = classifier_run
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    assert cli.main(["predict", "--run", str(out), "--input", str(inputs), "--out", str(tmp_path / "p.jsonl")]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predictions] == [r["text"] for r in rows]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    assert all(p["label"] == max(p["probabilities"], key=p["probabilities"].get) for p in predictions)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, rows)) / len(rows)
    capsys.readouterr()
    assert accuracy == pytest.approx(_eval(capsys, "--run", out)[1]["accuracy"], abs=1e-4)


def test_eval_on_another_table_and_its_labels(classifier_run, capsys, tmp_path):
    out, _ = classifier_run
    table = tmp_path / "more.csv"
    table.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in tiny.sentences(30, 5)))
    code, scores = _eval(capsys, "--run", out, "--data", table)
    assert code == 0 and scores["num_examples"] == 30 and sum(map(sum, scores["confusion_matrix"])) == 30
    table.write_text("text,label\nnice,good\nbad,awful\n")
    code, err = _eval(capsys, "--run", out, "--data", table)
    assert code == 2 and "DataError" in err and "not the run's" in err


def test_bad_run_and_inputs_write_nothing(classifier_run, capsys, tmp_path):
    code, err = _eval(capsys, "--run", tmp_path)
    assert code == 2 and "CheckpointError" in err and "results.json" in err
    out, _ = classifier_run
    inputs = tmp_path / "bad.jsonl"
    inputs.write_text('{"body": "x"}\n')
    assert cli.main(["predict", "--run", str(out), "--input", str(inputs), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "no 'text' field" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()


def test_language_model_eval_and_predict(tmp_path, capsys):
    model = tiny_decoder.write_decoder(tmp_path / "model")
    (tmp_path / "story.txt").write_text("\n".join(tiny_decoder.LINES * 40))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(tmp_path / "story.txt"), "--steps", "6",
                     "--max-length", "16", "--bucket", "16", "--eval-rows", "1000", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    code, scores = _eval(capsys, "--run", out)
    assert code == 0 and scores["perplexity"] == pytest.approx(results["test_perplexity_after"], rel=1e-5)
    (tmp_path / "prompts.txt").write_text("once upon a time\nthe capital of France\n")
    assert cli.main(["predict", "--run", str(out), "--input", str(tmp_path / "prompts.txt"),
                     "--out", str(tmp_path / "g.jsonl"), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["once upon a time", "the capital of France"]
    assert all(isinstance(r["generation"], str) for r in rows)
