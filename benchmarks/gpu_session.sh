#!/usr/bin/env bash
# The device check of a session that is lent a GPU, as one prepared script (about 9 minutes on an H200):
#   gpt2-124m bf16 + torch.compile + flash attention, plain, then through DDP and FSDP2 in a one-process group
#   (benchmarks/gpu_check.py --parallel), and the GPU tests (tests/test_train_gpu.py, test_loop_overhead_is_small
#   included). Results go to $OUT (the device tool brings them back), or benchmarks/results/ without it.
# Run from the repository root on the GPU machine, after `make install` (or with torch already there):
#   bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu_session-nvidia-smi.csv" 2>&1
status=0
for parallel in none ddp fsdp; do
  suffix=$([ "$parallel" = none ] && echo "" || echo "-$parallel")
  timeout 200 "$PY" benchmarks/gpu_check.py --parallel "$parallel" --max-seconds 150 --vocab-size 50304 \
      --compile-scope loss --json-out "$OUT/gpu_check${suffix}-h200.json" || status=1
done
# the head fused with its loss (the default above) against the whole logits, for speed and peak memory
timeout 150 "$PY" benchmarks/gpu_check.py --max-seconds 100 --vocab-size 50304 --compile-scope loss --loss-chunk 0 \
    --json-out "$OUT/gpu_check-whole-logits-h200.json" || status=1
timeout 180 "$PY" -m pytest -q -m gpu tests/test_train_gpu.py -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1 || status=1
tail -3 "$OUT/gpu_tests.txt"
exit $status
