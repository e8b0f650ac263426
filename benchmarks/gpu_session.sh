#!/usr/bin/env bash
# The device check of a session that is lent a GPU, as one prepared script (about 9 minutes on an H200):
#   gpt2-124m bf16 + torch.compile + flash attention with the head fused with its loss as the Trainer trains (1024
#   tokens a chunk), the same compiled into CUDA graphs (reduce-overhead: the step's launch gaps were about 7% of it
#   on an H200), then with 8192-token chunks and with the whole logits (train.loss_chunk 0), then the same step
#   through DDP and FSDP2 in a one-process group (benchmarks/gpu_check.py --parallel), then the GPU tests
#   (tests/test_train_gpu.py, test_loop_overhead_is_small included). Each gpu_check run records where one step's
#   device time goes (matmul, attention, fused elementwise kernels). Results go to $OUT (the device tool brings back
#   at most 8 files: this writes 8 with the log), or benchmarks/results/ without it.
# Run from the repository root on the GPU machine, after `make install` (or with torch already there):
#   bash benchmarks/gpu_session.sh [PART...]   (PART: chunk1024 cudagraphs chunk8192 whole-logits ddp fsdp tests;
#   default all, about 9 minutes: on a 15-minute lease run it as two calls, e.g. `tests chunk1024 cudagraphs` first)
# A dry run of the script on a CPU: GPU_CHECK_EXTRA="--device cpu --preset char-small --compile off" bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
status=0
check() {  # check NAME ARGS...: one gpu_check run of 200 steps at most, its JSON as $OUT/gpu_check-NAME-h200.json
  local name=$1; shift
  timeout 150 "$PY" benchmarks/gpu_check.py --steps 200 --max-seconds 110 --vocab-size 50304 --compile-scope loss \
      "$@" ${GPU_CHECK_EXTRA:-} --json-out "$OUT/gpu_check-$name-h200.json" || status=1
}
# the parts to run, in this order (default: all; a rerun names the ones that failed, e.g. `... tests ddp`)
parts=${*:-chunk1024 cudagraphs chunk8192 whole-logits ddp fsdp tests}
for part in $parts; do
  case $part in
    chunk1024) check chunk1024 --loss-chunk 1024 ;;
    chunk8192) check chunk8192 --loss-chunk 8192 ;;
    cudagraphs) check cudagraphs --loss-chunk 1024 --compile-mode reduce-overhead ;;
    whole-logits) check whole-logits --loss-chunk 0 ;;
    ddp|fsdp) check "$part" --parallel "$part" --loss-chunk 1024 ;;
    tests) timeout 200 "$PY" -m pytest -q -s -m gpu tests/test_train_gpu.py -p no:cacheprovider > "$OUT/gpu_tests.txt" \
             2>&1 || status=1
           tail -4 "$OUT/gpu_tests.txt" ;;
    *) echo "unknown part $part (chunk1024 cudagraphs chunk8192 whole-logits ddp fsdp tests)"; exit 2 ;;
  esac
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("gpu_check-*-h200.json")):
    s = json.loads(f.read_text())
    print(f"{f.name:34} {s['tokens_per_s']:>9,} tok/s  MFU {s['mfu']}  {s['peak_memory_allocated_gib']} GiB  "
          f"kinds {(s.get('kernels') or {}).get('ms_by_kind')}")
PY
exit $status
