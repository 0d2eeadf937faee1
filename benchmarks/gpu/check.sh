#!/usr/bin/env bash
# fastft's prepared GPU check (docs/GPU.md). Usage: benchmarks/gpu/check.sh OUTDIR [--dry-run]
#   OUTDIR     where report.md, results.json and the logs go (created)
#   --dry-run  the same code on CPU: Triton interpreter, tiny shapes (a CI test: tests/gpu/test_check_dry_run.py)
# Wheels in benchmarks/gpu/wheels/ (carried to the GPU machine, see docs/GPU.md) are installed --no-deps into a
# private directory put first on PYTHONPATH, so they never touch the machine's own torch/triton.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: benchmarks/gpu/check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
OUTDIR=$1
shift
for arg in "$@"; do
    if [[ $arg != --dry-run ]]; then
        echo "benchmarks/gpu/check.sh: unknown option '$arg' (accepted: --dry-run)" >&2
        exit 2
    fi
done
mkdir -p "$OUTDIR"
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
CARRIED=""
SITE=""
shopt -s nullglob
wheels=(benchmarks/gpu/wheels/*.whl)
if (( ${#wheels[@]} )); then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/fastft-gpu-site.XXXXXX")
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
    CARRIED=$(printf '%s,' "${wheels[@]##*/}")
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu.check "$OUTDIR" --carried "${CARRIED%,}" "$@"
