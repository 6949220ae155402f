#!/usr/bin/env bash
# Sets up a clean virtual environment and runs every check: lint, format, types, tests.
# This is the test command of the README; CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TINY_KNN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The CPU build of torch first (pip takes it from the local wheel cache where there is one); a range in
# pyproject.toml would otherwise pull a multi-GB CUDA build. Real users install their own torch first.
"$PY" -m pip install -q --disable-pip-version-check 'torch==2.13.0' 2>&1 | grep -v '^WARNING: Location' || true
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
"$PY" -c "import tiny_knn.topk as t; assert t.kernel_available(), 'C selection kernel not built'"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
"$VENV/bin/mypy"
"$PY" -m pytest -q "$@"
