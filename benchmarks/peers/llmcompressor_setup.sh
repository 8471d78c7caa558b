#!/usr/bin/env bash
# The llm-compressor peer's venv (llmcompressor 0.14.0.1, compressed-tensors 0.19.0): peer_venv.sh documents it.
# Usage: bash benchmarks/peers/llmcompressor_setup.sh [VENV_DIR]
exec bash "$(dirname "${BASH_SOURCE[0]}")/peer_venv.sh" llmcompressor "$@"
