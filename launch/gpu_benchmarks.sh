#!/bin/bash
# The device benchmarks for one lent GPU, in one call, most wanted first:
#   bash launch/gpu_benchmarks.sh [PART ...]   (default: every part below)
# Parts: resident (the scan of a store held in device memory; resident8g in
#   steps of 2^22 rows, 8 GiB of bf16; tiles: the fused kernel's tile
#   settings against XLA's scores on 4M resident rows),
#   1b, precision, scanned, small65k, tiny, small4k (encode vs. a training
#   step, both kernels; scanned: the 27M model with its layers under nn.scan
#   and nn.remat, whose memory XLA:CPU's plans do not show; precision: its
#   factored kernel with the projections in fp32 and in bf16_6x, and the
#   encodings' difference), serve (tracer serve's pass over resident bf16 and
#   f32 stores of 1M rows, with a request's R), querysteps (20,000 queries
#   in steps capped by Q against steps that ignore Q: the latter's
#   524,288 f32 rows a step hold ~63 GB of scores at the CPU's 6 bytes a
#   pair, so the scan's memory check, whose device branch no GPU has run
#   yet, either passes or refuses them by XLA's count on the device),
#   staged (copied rows through a 768 MiB pool: the steps it bounds, as
#   before stop 75, against steps staged through it a piece at a time),
#   sets (4 query sets of 64, each under its own scan-time R, from a bf16
#   store in one pass against a scan per set: stop 79, never on a GPU),
#   uneven (sets of 240, 16, 16 and 16: none padded to the largest since
#   stop 80).
#   Measured so far: tiny
#   2026-11-29; 1b, precision and tiles 2026-11-30; resident (int8 rows
#   too), serve and small65k 2026-12-04 (WORKSPACE, "The fourth lease").
#   Not measured since the projections left the encoder's program
#   (2026-12-02): scanned, small4k, 1b, precision, tiny.
# Each part writes $OUT/PART.log (the rows as JSON lines and a table) and is
# cut off at the time left before DEADLINE_S (default 560 s from the start),
# so one slow part cannot take the others' results with it. The GPU image
# lacks gin-config: carry its wheel in .whl/ (WORKSPACE "One GPU").
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Plans recompile programs the timed calls compiled already: cache them.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-560}))

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/install.log 2>&1 \
  || { cat /tmp/install.log; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"; } 2>&1

part() {  # part NAME COMMAND...: run COMMAND into $OUT/NAME.log within the deadline
  local name=$1; shift
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped, ${left}s left"; return; fi
  echo "== $name ($(($(date +%s) - start)) s in, ${left} s left)"
  local t0=$(date +%s)
  timeout "$left" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E "^[IW][0-9]{4} " "$OUT/$name.log" | tail -n 14
  echo "== $name: rc $rc, $(($(date +%s) - t0)) s"
}

# encode vs. a training step, both kernels (timeout runs programs, not functions)
encode=(python3 -m tracer.launch.benchmark --suite=encode --memory_budget_mb=0 --repeats=3)

scan=(python3 -m tracer.launch.benchmark_scan --resident --rows=16000000 --repeats=3)

parts=${*:-scanned 1b precision small4k tiny resident serve small65k resident8g tiles querysteps staged sets uneven}
for p in $parts; do
  case $p in
    resident) part resident "${scan[@]}" ;;
    # steps of 8 GiB (the default since 2026-11-30 is 2 GiB: scan.ACCELERATOR_CHUNK_BYTES)
    resident8g) part resident8g "${scan[@]}" --chunk_rows=4194304 ;;
    tiles) part tiles python3 -m tracer.launch.benchmark_scan --rows=4194304 --repeats=3 \
             --fused_tiles=128:64:4:3,128:128:4:3,128:64:4:5,64:128:4:4,256:64:8:3,128:128:8:4,64:64:4:4,256:128:8:3 ;;
    small65k) part small65k "${encode[@]}" --models=small --dims=65536 --batch_size=16 ;;
    tiny)     part tiny "${encode[@]}" --models=tiny --dims=4096,65536 --batch_size=64 ;;
    # 1B: ten compiles of minutes each with every plan and check; time both
    # kernels (the headline one first) and compile only what the row needs.
    1b)       part 1b "${encode[@]}" --models=1b --dims=65536 --batch_size=2 \
                --kernels=factored,exact --noper_example --noverify ;;
    scanned)  part scanned "${encode[@]}" --models=small_scan --dims=65536 \
                --batch_size=16 --noverify ;;
    precision) part precision "${encode[@]}" --models=small_scan --dims=65536 \
                --batch_size=16 --kernels=factored --precisions=highest,bf16_6x \
                --noverify --noper_example ;;
    small4k)  part small4k "${encode[@]}" --models=small --dims=4096 --batch_size=16 ;;
    serve)    part serve python3 -m tracer.launch.benchmark_scan --serve_pass \
                --rows=1048576 --repeats=3 ;;
    querysteps) part querysteps python3 -m tracer.launch.benchmark_scan --query_steps \
                --rows=4000000 --dim=1024 --queries=20000 --k=100 --repeats=3 ;;
    # rows copied through a 768 MiB pool: pooled steps vs. staged (stop 75)
    staged)   part staged python3 -m tracer.launch.benchmark_scan --staged_pool_mb=768 \
                --rows=4000000 --repeats=3 ;;
    sets)     part sets python3 -m tracer.launch.benchmark_scan --query_sets=4 \
                --rows=2000000 --dim=1024 --queries=64 --repeats=3 ;;
    # sets of unequal sizes, none padded to the largest (stop 80)
    uneven)   part uneven python3 -m tracer.launch.benchmark_scan --query_sets=4 \
                --query_set_sizes=240,16,16,16 --rows=2000000 --dim=1024 --repeats=3 ;;
    *) echo "unknown part $p"; exit 2 ;;
  esac
done
echo "== done in $(($(date +%s) - start)) s"
