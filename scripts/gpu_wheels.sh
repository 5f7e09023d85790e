#!/usr/bin/env bash
# Fills .whl/ (gitignored) with the wheels scripts/gpu_session.sh installs on a lent GPU machine, whose image
# (Python 3.12, torch 2.11 CUDA 13, transformers, peft, accelerate) has no diffusers and no network:
#
#   bash scripts/gpu_wheels.sh [FOLDER]          # default .whl; about 23 MB
#
# bitsandbytes ships libraries for every CUDA and ROCm version (42 MB): only CUDA 13's and the CPU's are kept,
# so that the working tree that travels stays under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$folder/serve"
download() {
    local into=$1
    shift
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$into" "$@"
}
# (No importlib_metadata: diffusers imports it only before Python 3.8, and 10.x would need lazy-importer.)
download "$folder" diffusers==0.42.1 gguf==0.19.0 torchao==0.18.0 bitsandbytes==0.50.2
# The server's packages the GPU image lacks (it has anyio, click, h11, httpx, prometheus-client).
# (fastapi 0.165 imports annotated_doc and opentelemetry unconditionally.)
download "$folder/serve" fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types annotated-doc typing-inspection python-multipart opentelemetry-api==1.45.2 "typing_extensions>=4.16"
"$python" - "$folder" <<'EOF'
import os
import re
import sys
import zipfile
from pathlib import Path

(wheel,) = Path(sys.argv[1]).glob("bitsandbytes-*.whl")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+)\.so$")
stripped = wheel.with_suffix(".tmp")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
    for info in source.infolist():
        if drop.search(info.filename):
            continue
        data = source.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = [line for line in data.decode().splitlines() if not drop.search(line.split(",")[0])]
            data = ("\n".join(lines) + "\n").encode()
        target.writestr(info, data)
os.replace(stripped, wheel)
EOF
du -sh "$folder"
