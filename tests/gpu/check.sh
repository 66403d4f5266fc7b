#!/usr/bin/env bash
# One script for a GPU machine: the gpu-marked tests, the GPU-relevant benchmarks, and a
# short table at the end. Usage (from the repository root): bash tests/gpu/check.sh
# Writes logs to ${OUT:-/tmp/gpu-check}.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import torch, pynvml" 2>/dev/null; then
  $PY -m pip install -q -e ".[dev]" >"$OUT/pip.log" 2>&1 || { echo "install failed"; tail "$OUT/pip.log"; exit 1; }
fi
export PYTHONUNBUFFERED=1
$PY launch.py env | tee "$OUT/env.txt"
$PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
gpu_rc=${PIPESTATUS[0]}
$PY launch.py bench launch --repeats 5 --set run.out_dir="$OUT/runs" 2>&1 | tee "$OUT/bench_launch.txt"
# data pipeline on the GPU: MVTec-like 1024 px PNGs (BENCH_DATA=an ImageFolder to reuse one)
# ../shared does not travel to a device machine: a copy under .cache/bench (git-ignored) does
MAKE=${MAKE_IMAGEFOLDER:-../shared/bench/make_imagefolder.py}
[ -f "$MAKE" ] || MAKE=.cache/bench/make_imagefolder.py
if [ -z "${BENCH_DATA:-}" ] && [ -f "$MAKE" ]; then
  $PY "$MAKE" "$OUT/mvtec" --classes 8 --per-class 12 --size 1024 --imagefolder >/dev/null && BENCH_DATA="$OUT/mvtec/imagefolder"
fi
if [ -n "${BENCH_DATA:-}" ]; then
  $PY launch.py bench data --data "$BENCH_DATA" --repeats 3 --workers 2 --set run.out_dir="$OUT/runs" 2>&1 | tee "$OUT/bench_data.txt"
else
  echo "no make_imagefolder.py and no BENCH_DATA: data benchmark skipped" | tee "$OUT/bench_data.txt"
fi
# JPEG at half size: fast_jpeg on/off and decoding on the GPU (data.decode_on = 'cuda')
if [ -f "$MAKE" ] && $PY "$MAKE" "$OUT/mvtec-jpg" --classes 8 --per-class 12 --size 1024 --format jpg --imagefolder >/dev/null; then
  $PY launch.py bench data --data "$OUT/mvtec-jpg/imagefolder" --size 512 --repeats 3 --workers 2 \
    --set run.out_dir="$OUT/runs" 2>&1 | tee "$OUT/bench_data_jpg.txt"
else
  echo "no make_imagefolder.py: JPEG data benchmark skipped" | tee "$OUT/bench_data_jpg.txt"
fi
$PY launch.py bench overhead --set run.out_dir="$OUT/runs" 2>&1 | tee "$OUT/bench_overhead.txt"
# every parallel mode on the GPUs present: one process per GPU for ddp/fsdp; on one GPU each mode
# still runs its own code path (dp over one device, ddp/fsdp as a one-process group), without scaling
$PY launch.py bench parallel --modes single,dp,ddp,fsdp --steps 30 --set run.out_dir="$OUT/runs" \
  --set run.name=parallel 2>&1 | tee "$OUT/bench_parallel.txt"
echo
echo "== GPU check summary =="
printf '%-28s %s\n' "card" "$($PY -c 'import pynvml as n; n.nvmlInit(); h=n.nvmlDeviceGetHandleByIndex(0); print(n.nvmlDeviceGetName(h), "x", n.nvmlDeviceGetCount(), "driver", n.nvmlSystemGetDriverVersion())' 2>&1)"
printf '%-28s %s\n' "gpu tests" "$(tail -n 1 "$OUT/pytest.log")"
printf '%-28s %s\n' "bench launch (gloo start-up)" "$(grep 'median ratio' "$OUT/bench_launch.txt" | cut -c1-80)"
printf '%-28s %s\n' "bench overhead (gloo, CPU)" "$(grep 'overhead of the engine' "$OUT/bench_overhead.txt" | cut -c1-100)"
printf '%-28s %s\n' "memory monitor overhead" "$(grep 'overhead of the memory monitor' "$OUT/bench_overhead.txt" | cut -c1-100)"
printf '%-28s\n' "bench parallel (GPU):"; grep -E '^\| (single|dp|ddp|fsdp) ' "$OUT/bench_parallel.txt" | cut -c1-150
printf '%-28s %s\n' "bench data (ratios)" "$(grep -E 'ours_vs_recipe|skipped' "$OUT/bench_data.txt" | tail -n 1)"
printf '%-28s %s\n' "bench data jpg 512 (ratios)" "$(grep -E 'ours_vs_recipe|skipped' "$OUT/bench_data_jpg.txt" | tail -n 1)"
exit "$gpu_rc"
