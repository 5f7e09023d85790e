#!/usr/bin/env bash
# Rebuild every shipped asset of the embedded demo model from Debian's Fashion-MNIST, on a CPU:
#   1. the pipeline (training/train_tiny_flux.py, ~27 min on 2 cores),
#   2. the judges (training/train_judges.py, ~10 min),
#   3. the four demo styles learned continually, the per-style LoRA baseline and the samples
#      (training/run_fashion_styles.sh, ~30 min).
#   bash training/run_fashion_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=share_diffusers/fashion/assets
accelerate launch --cpu --num_processes 1 training/train_tiny_flux.py --output_dir "$ASSETS/fashion-flux"
rm -rf "$ASSETS/fashion-flux-logs"
python training/train_judges.py --output_dir "$ASSETS/judges"
bash training/run_fashion_styles.sh
