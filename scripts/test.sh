#!/usr/bin/env bash
# Sets up .venv and runs the linter and the whole test suite (CPU, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q
