#!/usr/bin/env bash
# Create the isolated virtual environment that runs llm-compressor for the INT4 peer rows.
#
# llm-compressor 0.14.0.1 pins transformers <= 5.17, older than the project's, so it lives in its
# own venv outside the repository; benchmarks/peers/llmcompressor.py drives it as a subprocess.
#
# Usage: bash benchmarks/peers/llmcompressor_setup.sh [VENV_DIR]
#   default VENV_DIR: ${QCOMPILER_CACHE:-~/.cache/qcompiler}/venvs/llmcompressor
# Idempotent: a venv whose marker file exists is left as is (delete the folder to rebuild).
set -euo pipefail

LLMCOMPRESSOR_VERSION="0.14.0.1"
COMPRESSED_TENSORS_VERSION="0.19.0"
TORCH_VERSION="2.13.0"   # the local CPU wheel; any other torch spec pulls a multi-GB CUDA build

CACHE="${QCOMPILER_CACHE:-$HOME/.cache/qcompiler}"
VENV="${1:-$CACHE/venvs/llmcompressor}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MARKER="$VENV/.qcompiler-llmcompressor-ready"
PYTHON="${PYTHON:-python3}"

if [[ -f "$MARKER" ]]; then
    echo "llmcompressor venv ready: $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch first and alone, so pip resolves it to the local CPU wheel
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" -c <(echo "torch==$TORCH_VERSION") \
    "llmcompressor==$LLMCOMPRESSOR_VERSION" "compressed-tensors==$COMPRESSED_TENSORS_VERSION" \
    gguf sentencepiece safetensors tqdm networkx
# this repository, without dependencies: qcompiler.tools.models / qcompiler.tools.data for the same model
# loading and calibration sampling as the benchmark
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import qcompiler.tools.data, qcompiler.tools.models  # noqa: F401  (must import beside llm-compressor's transformers)
import llmcompressor  # noqa: F401
for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors", "gguf"):
    print(f"{pkg}=={md.version(pkg)}")
PY
"$VENV/bin/python" -m pip freeze > "$MARKER"
echo "llmcompressor venv ready: $VENV"
