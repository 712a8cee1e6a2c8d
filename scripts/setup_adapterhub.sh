#!/usr/bin/env bash
# Creates ./.venv-adapterhub for the AdapterHub parity tests (tests/interop/test_adapterhub.py).
# AdapterHub (`adapters` 1.3.0) pins transformers ~=4.57.6, which cannot live beside the main
# venv's transformers 5, so its reference runs in this second venv, in a subprocess
# (tests/interop/adapterhub_ref.py). torch is pinned to its CPU build (never an unpinned torch).
# Idempotent: a stamp file inside the venv marks a finished install.
# Usage: bash scripts/setup_adapterhub.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-adapterhub
STAMP="$VENV/.adapterhub_1"
[ -f "$STAMP" ] && exit 0
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install "torch==2.13.0" "transformers~=4.57.6" "adapters==1.3.0" numpy
touch "$STAMP"
