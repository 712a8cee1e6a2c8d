#!/usr/bin/env bash
# The main job: set up ./.venv if needed, then `peft-jax train` (LoRA on MiniLM-L6, fine-food reviews).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/peft-jax train "$@"
