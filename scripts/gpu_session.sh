#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one prepared call, most important first.
#
#   bash scripts/gpu_session.sh [SECONDS [STEP...]]    # results under $OUT (default ./gpu-results)
#
# That machine (see ../shared/notes/gpu-device.md) has Python 3.12 with torch, transformers, peft and
# accelerate, but no diffusers and no network: the wheels come along in .whl/ (gitignored; `carry` it):
# diffusers 0.42.1, gguf, torchao 0.18, bitsandbytes 0.50.2 (CUDA 13 libraries only)
# and, in .whl/serve/, what the server needs beyond that image (fastapi, starlette, uvicorn, pydantic...):
# `bash scripts/gpu_wheels.sh` makes them here. The device tool's call: carry [".whl"], timeout_s 600.
# Each step starts only if enough of SECONDS (default 540) is left, runs under a timeout that ends
# before them, and writes its output under $OUT; summary.txt has the setup's output and says what ran, how
# long, and its status. The device tool brings back at most 8 files: the .json results end up in json.tgz.
# STEPs (default: pytest bench_gpu:DEFAULT_SECTIONS, ~7 min; then, if the session has ~4 min of device
# time left, a second call `bash scripts/gpu_session.sh 240 bench_serve`):
#   pytest       pytest -m gpu: bf16 pipeline calls, CUDA merges, fuse/unfuse, training on CUDA,
#                bitsandbytes NF4/int8 and float8 bases (~2.5 min)
#   bench_gpu[:SECTIONS]  benchmarks/bench_gpu.py, the named sections (comma-separated; "all": every one,
#                ~6 min): the README's GPU table; the default sections are those still open on
#                2026-11-28 (the others were measured then): setup (merge on the CPU vs the GPU), step,
#                fuse, profile, quantized-int8, quantized-float8 (~4 min)
#   bench_serve  benchmarks/bench_serve.py on a FLUX.1-sized random model: the README's GPU serving row (~3 min)
#   bench_merge  benchmarks/bench_merge.py at full FLUX.1 size against load_lora_adapter (CPU work, ~2 min)
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "usage: bash scripts/gpu_session.sh [SECONDS [STEP...]] (got SECONDS=$budget)" >&2
    exit 2
fi
start=$SECONDS
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

left() { echo $((budget - (SECONDS - start))); }

# step NAME SECONDS_NEEDED SECONDS_AT_MOST COMMAND...: run COMMAND if SECONDS_NEEDED are left, for at most
# SECONDS_AT_MOST (and never past the budget), its output to $out/NAME.txt
step() {
    local name=$1 need=$2 most=$3
    shift 3
    if (($(left) < need)); then
        echo "$name: skipped, $(left) s left of $budget, needs $need" | tee -a "$out/summary.txt"
        return
    fi
    local limit=$(($(left) - 10)) began=$SECONDS
    ((limit > most)) && limit=$most
    ((limit < 1)) && limit=1
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "$name: exit $? after $((SECONDS - began)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    # The serving wheels only where the image lacks them or has an older version (nothing it has is shadowed).
    missing=$(python3 - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import Version

for wheel in sorted(Path(".whl/serve").glob("*.whl")):
    name, wanted = wheel.name.split("-")[:2]
    try:
        if Version(version(name)) >= Version(wanted):
            continue
    except PackageNotFoundError:
        pass
    print(wheel)
EOF
    )
    if [ -n "$missing" ]; then
        echo "serving wheels installed: $missing"
        # shellcheck disable=SC2086  # one path per word, on purpose
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $missing
    fi
} >"$out/summary.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'peft', peft.__version__, torch.cuda.get_device_name())" >>"$out/summary.txt" 2>&1; then
    echo "setup failed" >>"$out/summary.txt"
    cat "$out/summary.txt"
    exit 1
fi
cat "$out/summary.txt"

DEFAULT_SECTIONS=setup,step,fuse,profile,quantized-int8,quantized-float8
steps=("${@:2}")
[ ${#steps[@]} -eq 0 ] && steps=(pytest "bench_gpu:$DEFAULT_SECTIONS")
for name in "${steps[@]}"; do
    case $name in
    pytest)
        # -v: each test's result as it ends, so a step cut off by its limit still says which ran;
        # faulthandler: the stacks of a test stuck for 120 s.
        step pytest-gpu 150 240 python3 -m pytest -v -o faulthandler_timeout=120 -m gpu -p no:cacheprovider \
            tests/test_gpu.py tests/test_quantized_gpu.py tests/test_merge_device.py tests/test_train_share_flux.py \
            tests/test_benchmarks.py
        ;;
    bench_gpu | bench_gpu:*)
        sections=${name#bench_gpu}
        sections=${sections#:}
        # Up to 150 s kept for the steps after it, but never at its expense. --budget: no section starts
        # after it; the last one may take up to a minute and a half more.
        reserve=0
        [ "$name" != "${steps[-1]}" ] && reserve=$(($(left) - 240 < 150 ? $(left) - 240 : 150))
        ((reserve < 0)) && reserve=0
        step bench_gpu 200 420 python3 benchmarks/bench_gpu.py --budget $(($(left) - reserve - 90)) \
            --sections "${sections:-all}" --out "$out/bench_gpu"
        ;;
    bench_serve)
        step bench_serve 150 300 python3 benchmarks/bench_serve.py --model flux1-random --device cuda \
            --dtype bfloat16 --duration $(($(left) > 240 ? 30 : 10)) --rounds 1 --out "$out/bench_serve"
        ;;
    bench_merge)
        step bench_merge 100 200 python3 benchmarks/bench_merge.py --peft-blocks 19:38 --rounds 5
        ;;
    *) echo "unknown step $name (pytest, bench_gpu[:SECTIONS], bench_serve, bench_merge)" | tee -a "$out/summary.txt" ;;
    esac
done
shopt -s nullglob
results=("$out"/*.json)
if ((${#results[@]})); then
    tar czf "$out/json.tgz" -C "$out" "${results[@]##*/}" && rm -f "${results[@]}"
fi
echo "total $((SECONDS - start)) s" | tee -a "$out/summary.txt"
