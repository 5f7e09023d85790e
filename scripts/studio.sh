#!/usr/bin/env bash
# Sets up .venv and opens the style studio on the embedded demo model (a small Flux trained on Fashion-MNIST)
# with its four shipped styles.
# Extra arguments go to the app (e.g. --port 7861, --model black-forest-labs/FLUX.1-schnell --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/share-diffusers app "$@"
