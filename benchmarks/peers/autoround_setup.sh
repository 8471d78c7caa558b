#!/usr/bin/env bash
# The AutoRound peer's venv (auto-round 0.16.0; issue 19): peer_venv.sh documents it.
# Usage: bash benchmarks/peers/autoround_setup.sh [VENV_DIR]
exec bash "$(dirname "${BASH_SOURCE[0]}")/peer_venv.sh" autoround "$@"
