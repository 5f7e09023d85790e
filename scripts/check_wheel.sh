#!/usr/bin/env bash
# The package as a user installs it: builds the wheel, installs it with the app extra into a fresh virtual
# environment (the local CPU torch first), and from a folder outside the repository runs
# `share-diffusers generate` on the embedded demo model (an image must be written, with no warnings of ours)
# and starts `share-diffusers app` until its page answers HTTP on a free port, then stops it.
# Needs .venv (scripts/setup.sh) to build the wheel. About 1-2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
work="$(mktemp -d "${TMPDIR:-/tmp}/share-wheel-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

# The wheel, built from a copy of the sources so the repository gets no build/ or egg-info folders.
mkdir -p "$work/src" "$work/outside"
cp -r pyproject.toml README.md share_diffusers "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
.venv/bin/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/share_diffusers-*.whl)"
echo "built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

# A fresh environment: the CPU torch wheel first (a plain torch would pull a multi-GB CUDA build).
python3 -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$bin/pip" install -q --disable-pip-version-check "$wheel[app]"
echo "installed into a fresh environment ($((SECONDS - started)) s)"

cd "$work/outside"
"$bin/python" - <<'PY'
import share_diffusers, sys
from pathlib import Path
assert Path(share_diffusers.__file__).is_relative_to(Path(sys.prefix)), share_diffusers.__file__
PY

# generate, on the embedded demo model and its shipped styles
"$bin/share-diffusers" -q generate --prompt "a photo of a bag" --style tint -o bag.png 2>generate.err \
  || { cat generate.err; exit 1; }
if grep -E "Traceback|FutureWarning|should be kept in float32|requires torchvision" generate.err; then
  echo "error: share-diffusers generate printed warnings (above)"
  exit 1
fi
"$bin/python" -c "from PIL import Image; image = Image.open('bag.png'); assert image.size == (32, 32), image.size"
echo "share-diffusers generate wrote bag.png ($((SECONDS - started)) s)"

# app: started like a user does, from here; the helper waits for HTTP 200 on a free port, then stops it
"$bin/python" -m share_diffusers.studio.testing --command "$bin/share-diffusers" app --log studio.log --timeout 150 \
  || { tail -n 40 studio.log; exit 1; }
echo "wheel check passed in $((SECONDS - started)) s"
