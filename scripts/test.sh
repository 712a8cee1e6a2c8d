#!/usr/bin/env bash
# The whole test suite: set up ./.venv with the test extras, then pytest (doctests included).
# Slow real-checkpoint tests run too unless PEFT_JAX_SKIP_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Lint first (seconds): ruff's rules and import order as pyproject.toml sets them.
.venv/bin/ruff check peft_jax tests experiments
# Tests run in parallel worker processes, one module per worker at a time (module fixtures are
# built once): min(cores, 4) workers, or PEFT_JAX_TEST_WORKERS (0 runs everything in-process).
workers=${PEFT_JAX_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
# The 25 slowest tests are listed at the end, so a CI log shows where the time went.
args=(-q -p no:cacheprovider --durations=25 --doctest-modules peft_jax tests)
[ "$workers" -gt 0 ] && args+=(-n "$workers" --dist loadscope)
[ "${PEFT_JAX_SKIP_SLOW:-0}" = "1" ] && args+=(-m "not slow")
set +e
.venv/bin/python -m pytest "${args[@]}" "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: report it, but it is not a failure of the code.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi
exit "$rc"
