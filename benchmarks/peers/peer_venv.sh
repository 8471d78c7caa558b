#!/usr/bin/env bash
# Create the isolated virtual environment that runs one peer tool for the benchmark tables.
#
# Each peer pins a transformers other than the project's (llm-compressor 0.14.0.1: <= 5.17; auto-round 0.16.0
# brings its own), so it lives in its own venv outside the repository; the benchmark drives it as a subprocess
# (llmcompressor_peer.py, autoround_peer.py).
#
# Usage: bash benchmarks/peers/peer_venv.sh {llmcompressor|autoround} [VENV_DIR]
#   default VENV_DIR: ${QCOMPILER_CACHE:-~/.cache/qcompiler}/venvs/<tool>
#   (llmcompressor_setup.sh and autoround_setup.sh call this with their tool's name)
# Idempotent: a venv whose marker file exists is left as is (delete the folder to rebuild).
set -euo pipefail

TOOL="${1:?usage: peer_venv.sh llmcompressor|autoround [VENV_DIR]}"
TORCH_VERSION="2.13.0"   # the local CPU wheel; any other torch spec pulls a multi-GB CUDA build
case "$TOOL" in
    llmcompressor)
        PACKAGES=("llmcompressor==0.14.0.1" "compressed-tensors==0.19.0")
        MODULE="llmcompressor"
        REPORT="torch transformers llmcompressor compressed-tensors gguf" ;;
    autoround)
        PACKAGES=("auto-round==0.16.0")
        MODULE="auto_round"
        REPORT="torch transformers auto-round gguf" ;;
    *)
        echo "peer_venv.sh: unknown tool '$TOOL' (llmcompressor, autoround)" >&2
        exit 2 ;;
esac

CACHE="${QCOMPILER_CACHE:-$HOME/.cache/qcompiler}"
VENV="${2:-$CACHE/venvs/$TOOL}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MARKER="$VENV/.qcompiler-$TOOL-ready"
PYTHON="${PYTHON:-python3}"

if [[ -f "$MARKER" ]]; then
    echo "$TOOL venv ready: $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch first and alone, so pip resolves it to the local CPU wheel
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" -c <(echo "torch==$TORCH_VERSION") "${PACKAGES[@]}" gguf sentencepiece safetensors tqdm networkx
# this repository, without dependencies: qcompiler.tools.models / qcompiler.tools.data for the same model
# loading and calibration sampling as the benchmark
"${PIP[@]}" --no-deps -e "$REPO"

MODULE="$MODULE" REPORT="$REPORT" "$VENV/bin/python" - <<'PY'
import importlib, importlib.metadata as md, os
import qcompiler.tools.data, qcompiler.tools.models  # noqa: F401  (must import beside the tool's transformers)
importlib.import_module(os.environ["MODULE"])
for pkg in os.environ["REPORT"].split():
    print(f"{pkg}=={md.version(pkg)}")
PY
"$VENV/bin/python" -m pip freeze > "$MARKER"
echo "$TOOL venv ready: $VENV"
