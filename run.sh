#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (torch CPU wheel first, so pip never pulls a CUDA build),
# installs fastft with its dev extras at the default pins (.ci/pins/default.txt), then runs what you asked for.
#   ./run.sh demo            - the main job (offline, CPU)
#   ./run.sh test            - the test suite (Triton kernels under the interpreter) and the compile gate
#   ./run.sh doctor          - versions vs tested ranges, and which patches apply here
#   ./run.sh lint            - ruff check and ruff format --check
#   ./run.sh leg NAME [ARGS] - the patch / model / TRL tests on another version leg (.ci/pins/NAME.txt), in a cached
#                              venv under ${FASTFT_VENV_CACHE:-~/.cache/fastft/venvs}; offline after its first install
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PINS=.ci/pins
LEG_TESTS=(tests/patches tests/model tests/trl)

# The project's own requirements (base + dev extras) from pyproject.toml, for a venv that runs this checkout
# from PYTHONPATH instead of installing it (a cached venv outlives the clone it was made from).
project_requirements() {
    "$PY" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
EOF
}

# setup_venv DIR PINS MODE: MODE "editable" installs this checkout (-e .[dev]); "deps" installs its requirements only.
setup_venv() {
    local venv=$1 pins=$2 mode=$3 stamp want
    stamp="$venv/.fastft-installed"
    want=$(cat pyproject.toml run.sh "$pins" | sha256sum | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return; fi
    [[ -x $venv/bin/python ]] || "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first and alone, at its pin: nothing later can pull another build of it.
    "$venv/bin/python" -m pip install -q "$(grep -E '^torch==' "$pins")"
    if [[ $mode == editable ]]; then
        "$venv/bin/python" -m pip install -q -c "$pins" -e ".[dev]"
    else
        # This checkout runs from PYTHONPATH: no installed fastft (of another checkout, older metadata) beside it.
        "$venv/bin/python" -m pip uninstall -q -y fastft 2>/dev/null || true
        local reqs
        reqs=$(mktemp)
        project_requirements > "$reqs"
        "$venv/bin/python" -m pip install -q -c "$pins" -r "$reqs"
        rm -f "$reqs"
    fi
    echo "$want" > "$stamp"
}

setup() { setup_venv .venv "$PINS/default.txt" editable; }

leg_venv() { echo "${FASTFT_VENV_CACHE:-$HOME/.cache/fastft/venvs}/$1"; }

cmd=${1:-demo}
shift || true
case $cmd in
    setup) setup ;;
    demo) setup; exec .venv/bin/python -m fastft demo "$@" ;;
    doctor) setup; exec .venv/bin/python -m fastft doctor "$@" ;;
    lint)
        setup
        # Both must pass: the rules, and the formatter's style (one `ruff format fastft tests benchmarks` applies it).
        .venv/bin/ruff check fastft tests benchmarks "$@"
        exec .venv/bin/ruff format --check fastft tests benchmarks
        ;;
    test)
        setup
        # Two xdist workers on two cores; the compile gate runs as its own test inside the suite.
        exec .venv/bin/python -m pytest -n 2 --durations=15 "$@"
        ;;
    leg)
        name=${1:?usage: ./run.sh leg NAME [pytest args]}
        shift
        [[ -f $PINS/$name.txt ]] || { echo "no such leg: $PINS/$name.txt" >&2; exit 2; }
        venv=$(leg_venv "$name")
        mkdir -p "$(dirname "$venv")"
        setup_venv "$venv" "$PINS/$name.txt" deps
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
        "$venv/bin/python" -m fastft doctor
        exec "$venv/bin/python" -m pytest -n 2 -p no:cacheprovider --durations=5 "${LEG_TESTS[@]}" "$@"
        ;;
    *) echo "usage: ./run.sh [demo|test|doctor|lint|setup|leg NAME] [args...]" >&2; exit 2 ;;
esac
