#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (torch 2.13.0 CPU wheel first, so pip never pulls a CUDA build),
# installs fastft with its dev extras, then runs the demo or the tests.
#   ./run.sh demo   - the main job (offline, CPU)
#   ./run.sh test   - the test suite (Triton kernels under the interpreter) and the compile gate
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.fastft-installed" want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return; fi
    [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q "triton==3.7.1" -e ".[dev]"
    echo "$want" > "$stamp"
}

cmd=${1:-demo}
shift || true
case $cmd in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/python" -m fastft demo "$@" ;;
    test)
        setup
        # Two xdist workers on two cores; the compile gate runs as its own test inside the suite.
        exec "$VENV/bin/python" -m pytest -n 2 --durations=15 "$@"
        ;;
    *) echo "usage: ./run.sh [demo|test|setup] [args...]" >&2; exit 2 ;;
esac
