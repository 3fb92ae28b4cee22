#!/usr/bin/env bash
# Two code trees timed on one GPU in one run (machines differ by up to 15% between leases):
# this checkout ("after") against BEFORE, a tree of an older commit with this checkout's
# benchmarks/latency.py copied in (it uses the public API only). Each part writes
# OUT/{after,before}_PART.json and .log as it ends, so a run cut short keeps what finished.
#
#   git archive 80d920d --prefix=.ab_before/ | tar -x && cp benchmarks/latency.py .ab_before/benchmarks/
#   benchmarks/ab_trees.sh .ab_before $OUT 1b lat1b 8b lat8b warmstart
#
# Parts: 1b (1B preset, 1024x128/128 fixed and mixed workloads), 8b (8B preset, fixed),
# lat1b / lat8b (batch-1 TPOT), all with --num-scheduler-steps 4; warmstart (this tree only:
# two `jaxengine generate` starts on an empty compilation cache, the second warm).
set -u
BEFORE=$1 OUT=$2; shift 2
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jcache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" >> "$OUT/gpu.txt"
both() {  # NAME SECONDS COMMAND...: the command in this tree, then in BEFORE
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" --out "$OUT/after_$name.json" > "$OUT/after_$name.log" 2>&1; echo "after $name rc=$?"
  (cd "$BEFORE" && timeout "$limit" "$@" --out "$OUT/before_$name.json" > "$OUT/before_$name.log" 2>&1); echo "before $name rc=$?"
}
T="python3 benchmarks/throughput.py --num-scheduler-steps 4"
L="python3 benchmarks/latency.py --num-scheduler-steps 4"
for part in "$@"; do
  date
  case $part in
    1b) both 1b 200 $T --preset llama-3.2-1b --workload fixed mixed ;;
    8b) both 8b 300 $T --preset llama-3.1-8b --workload fixed --gpu-memory-utilization 0.8 --compile-threads 4 ;;
    lat1b) both lat1b 120 $L --preset llama-3.2-1b ;;
    lat8b) both lat8b 240 $L --preset llama-3.1-8b --gpu-memory-utilization 0.8 --compile-threads 4 ;;
    warmstart)
      cache=$(mktemp -d)
      for i in 1 2; do
        s=$(date +%s.%N)
        JAX_COMPILATION_CACHE_DIR=$cache timeout 120 python3 -m serving.cli generate "def fibonacci(n):" \
          > "$OUT/warmstart_$i.log" 2>&1
        rc=$? e=$(date +%s.%N)
        echo "warmstart run $i rc=$rc seconds $(python3 -c "print(round($e - $s, 1))")" | tee -a "$OUT/warmstart.txt"
      done ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
date
