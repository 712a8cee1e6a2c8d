"""The Colab quickstart runs top to bottom (shortened by its own environment knobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "colab", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    cells = json.load(open(NOTEBOOK))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = "\n".join(line for line in code.splitlines() if not line.startswith("!"))  # pip lines
    path = tmp_path / "quickstart.py"
    path.write_text(script)
    env = os.environ | {"PEFT_JAX_NOTEBOOK_STEPS": "3", "PEFT_JAX_NOTEBOOK_TRAIN": "200"}
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LoRA test accuracy:" in out.stdout and "plain modules again: Linear" in out.stdout
