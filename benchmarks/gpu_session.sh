#!/usr/bin/env bash
# One prepared GPU session for issue 17: profile the R50 step at batch 8,
# then time it (throughput, MFU, memory, compile), each under a time limit
# that leaves room for a rerun in a 15-minute device budget.
#
#   bash benchmarks/gpu_session.sh                 # on the GPU host, repo root
#   OUT=/tmp/out EXTRA=1 bash benchmarks/gpu_session.sh
#
# Environment (defaults in brackets):
#   OUT      where JSON, logs and the trace go [${OUT:-/tmp/gpu_session}]
#   CONFIG   recipe [configs/mimicdet_r50_fpn_1x.py]
#   BATCH    per-device batch [8]; SIZE canvas [896x1408]; DTYPE [bf16]
#   LIMIT    seconds per command [240]
#   EXTRA=1  also time t_head.roi_align_impl=einsum and the float32
#            scatter-add FTZ-atomics XLA flag (issue 17's suspects)
#   PY       python [.venv/bin/python if present, else python]
#   More overrides go after the script name: they reach both Python scripts,
#   e.g. --config.train.parallelism=shard_map.
# The persistent compilation cache (OUT/jax_cache) lets the timing run reuse
# the profiling run's compiled step instead of compiling it again (~60 s).
# CPU smoke test: CONFIG=configs/demo.py BATCH=1 SIZE=128x128 DTYPE=f32 \
#   JAX_PLATFORMS=cpu bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
CONFIG=${CONFIG:-configs/mimicdet_r50_fpn_1x.py}
BATCH=${BATCH:-8}
SIZE=${SIZE:-896x1408}
DTYPE=${DTYPE:-bf16}
LIMIT=${LIMIT:-240}
EXTRA=${EXTRA:-0}
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
COMMON=(--config "$CONFIG" --batch "$BATCH" --size "$SIZE" --dtype "$DTYPE" "$@")
status=0

run() {  # run NAME CMD...: time-limited, log kept, failure noted not fatal
  local name=$1; shift
  echo "=== $name ($(date -u +%H:%M:%S), limit ${LIMIT}s)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "--- $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 40 "$OUT/$name.log"
  [[ $rc -eq 0 ]] || status=$rc
}

{ nvidia-smi -L 2>/dev/null || true; "$PY" -c \
  'import jax; print(jax.__version__, jax.devices())'; } | tee "$OUT/devices.txt"

# 1. Where the time goes: per-op table of a traced window (top ops by time).
run profile_b${BATCH} "$PY" benchmarks/profile_step.py "${COMMON[@]}" \
  --warmup 2 --steps 3 --top 40 --json "$OUT/profile_b${BATCH}.json" \
  --trace_dir "$OUT/trace_b${BATCH}"

# 2. Throughput, MFU, peak memory, compile time of the same step.
run train_b${BATCH} "$PY" benchmarks/train_step.py "${COMMON[@]}" \
  --warmup 2 --steps 10 --json "$OUT/train_b${BATCH}.json"

if [[ "$EXTRA" == 1 ]]; then
  # 3. The gather-free RoIAlign (no scatter-add in its backward).
  run train_b${BATCH}_einsum "$PY" benchmarks/train_step.py "${COMMON[@]}" \
    --warmup 2 --steps 10 --json "$OUT/train_b${BATCH}_einsum.json" \
    --config.t_head.roi_align_impl=einsum
  # 4. jax-ml/jax#38806 workaround: fast float32 atomics for the scatter-adds.
  run train_b${BATCH}_ftz env \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_extra_options=-nvptx-allow-ftz-atomics" \
    "$PY" benchmarks/train_step.py "${COMMON[@]}" \
    --warmup 2 --steps 10 --json "$OUT/train_b${BATCH}_ftz.json"
fi

echo "=== done ($(date -u +%H:%M:%S)), exit $status; results in $OUT"
ls -la "$OUT"
exit $status
