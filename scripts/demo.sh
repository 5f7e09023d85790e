#!/usr/bin/env bash
# Sets up .venv and runs the offline demo: LoRAs written by PEFT, compressed, merged, inspected, exported.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python samples/compress_loras.py "$@"
