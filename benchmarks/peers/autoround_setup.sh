#!/usr/bin/env bash
# Create the isolated virtual environment that runs Intel's AutoRound for the INT4 peer rows (issue 19).
#
# auto-round brings its own transformers / datasets requirements, so it lives in its own venv outside the
# repository (like the llm-compressor peer); benchmarks/peers/autoround_oneshot.py runs inside it.
#
# Usage: bash benchmarks/peers/autoround_setup.sh [VENV_DIR]
#   default VENV_DIR: ${QCOMPILER_CACHE:-~/.cache/qcompiler}/venvs/autoround
# Idempotent: a venv whose marker file exists is left as is (delete the folder to rebuild).
set -euo pipefail

AUTOROUND_VERSION="0.16.0"
TORCH_VERSION="2.13.0"   # the local CPU wheel; any other torch spec pulls a multi-GB CUDA build

CACHE="${QCOMPILER_CACHE:-$HOME/.cache/qcompiler}"
VENV="${1:-$CACHE/venvs/autoround}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MARKER="$VENV/.qcompiler-autoround-ready"
PYTHON="${PYTHON:-python3}"

if [[ -f "$MARKER" ]]; then
    echo "autoround venv ready: $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch first and alone, so pip resolves it to the local CPU wheel
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" -c <(echo "torch==$TORCH_VERSION") \
    "auto-round==$AUTOROUND_VERSION" gguf sentencepiece safetensors tqdm networkx
# this repository, without dependencies: qcompiler.tools.models / qcompiler.tools.data for the same model
# loading and calibration sampling as the benchmark
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import qcompiler.tools.data, qcompiler.tools.models  # noqa: F401  (must import beside auto-round's transformers)
import auto_round  # noqa: F401
for pkg in ("torch", "transformers", "auto-round", "gguf"):
    print(f"{pkg}=={md.version(pkg)}")
PY
"$VENV/bin/python" -m pip freeze > "$MARKER"
echo "autoround venv ready: $VENV"
