#!/usr/bin/env bash
# Sets up .venv and runs the offline demos: PEFT LoRAs compressed, merged, inspected and exported by the
# command line; per-prompt styles and blends on the random tiny Flux pipeline, then on the trained demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir="${1:-samples/output}"
mkdir -p "$workdir"
.venv/bin/python samples/compress_loras.py --workdir "$workdir/compress"
.venv/bin/python samples/flux_styles.py --workdir "$workdir/flux"
.venv/bin/python samples/fashion_styles.py --workdir "$workdir/fashion"
