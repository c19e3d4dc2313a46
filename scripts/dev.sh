#!/usr/bin/env bash
# One entry point for the README's quick start and for CI.
#   bash scripts/dev.sh run -- CMD [ARGS...]   observe CMD with the CLI
#   bash scripts/dev.sh test                   the whole test suite
#   bash scripts/dev.sh check                  mypy --strict and ruff
#   bash scripts/dev.sh bench                  the benchmark (docs/performance.md)
# Needs only python3: the first call makes .venv and installs the project
# with its test, lint and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
if [ ! -x "$venv/bin/python" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e '.[test,lint,bench]'
    # An editable install is not byte-compiled (pip compiles only wheels it
    # unpacks): compile now so that no launch pays for it (docs/performance.md).
    "$venv/bin/python" -m compileall -q trio_observer
    touch "$venv/.installed"
fi
cmd=${1:-test}
shift || true
case "$cmd" in
    run) exec "$venv/bin/trio-observer" run "$@" ;;
    test) exec "$venv/bin/python" -m pytest "$@" ;;
    check)
        "$venv/bin/mypy" --strict
        "$venv/bin/ruff" check .
        exec "$venv/bin/ruff" format --check .
        ;;
    bench) exec "$venv/bin/python" benchmarks/run.py "$@" ;;
    *) echo "usage: bash scripts/dev.sh {run -- CMD...|test|check|bench}" >&2; exit 2 ;;
esac
