#!/usr/bin/env bash
# A built wheel works: build fastft's wheel, install it (not editable) into a venv that holds only its dependencies
# (cached; fastft itself is removed and reinstalled from the new wheel every run), then run the demo and the planner
# from outside the checkout, so only the installed package (and its package data) can be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV="${FASTFT_VENV_CACHE:-$HOME/.cache/fastft/venvs}/wheel"
PINS=$ROOT/.ci/pins/default.txt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/fastft-*.whl)
"$PY" -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
sys.exit(0 if 'fastft/data/configs/Llama-3.2-1B.json' in names else 'wheel lacks package data')" "$WHEEL"

mkdir -p "$(dirname "$VENV")"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' "$PINS")"
"$VENV/bin/python" -m pip uninstall -q -y fastft 2>/dev/null || true
"$VENV/bin/python" -m pip install -q -c "$PINS" "$WHEEL"

cd "$WORK"  # not the checkout: `import fastft` must find the installed wheel
where=$("$VENV/bin/python" -c "import fastft, os; print(os.path.dirname(fastft.__file__))")
case $where in "$VENV"/*) ;; *) echo "fastft imported from $where, not from the wheel" >&2; exit 1 ;; esac
echo "wheel: $(basename "$WHEEL") installed at $where"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/fastft" demo --quick --output-dir "$WORK/demo"
"$VENV/bin/fastft" plan --model Llama-3.2-1B
echo "wheel check passed"
