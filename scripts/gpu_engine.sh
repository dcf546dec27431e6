#!/usr/bin/env bash
# The engine on the GPU, logs under $1 (the device's $OUT), in two parts that each fit one device
# call (10 minutes):
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_engine.sh $OUT check
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_engine.sh $OUT bench
# (graphs: the prefill graphs' GPU tests alone, up to 9 minutes;
# bench-short: the same systems at prefill 1 x 2048 and decode b1 / b32 only; ab: QUAD W4A4A8
# alone once per set of QUAD_* switches, e.g. AB_VARIANTS="QUAD_PDL=1 QUAD_PDL=0"; quad-reference:
# the QUAD reference speed script's Llama-2-13B prefill configuration)
# check: the engine GPU tests and a kernel-level profile of a Llama-3-8B-shaped prefill and decode
# step (about 4 minutes); bench: quad-bench on Llama-3-8B shapes, QUAD W4A4A8 (int8 embedding /
# lm_head, the default, and float16) against the engine's fp16 path and transformers, a short plan with a time
# breakdown at every shape (3.5 minutes on an H200 for three systems before the per-shape
# breakdowns; a system that fails is reported and the others still measured).
set -u
out=${1:?usage: scripts/gpu_engine.sh OUT_DIR [check|bench]}
part=${2:-check}
mkdir -p "$out"
quiet() { grep -v "INFO\|WARNING\|AnnotateWarpGroup" ; }
if [ "$part" = check ]; then
  timeout 260 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py 2>&1 | quiet > "$out/engine_gpu.log"
  grep -E "logits vs|passed|failed" "$out/engine_gpu.log"
  timeout 200 python3 scripts/gpu_profile_step.py "$out" 2>&1 | quiet | tail -n 3
elif [ "$part" = graphs ]; then
  # The prefill graphs against the eager prefill (logits, int4 cache, slots written) and graphs on /
  # off; most of its time on a fresh machine is kernel compilation (over 200 s).
  PYTHONUNBUFFERED=1 timeout 540 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py \
    -k "prefill_graphs or graphs_on_and_off" 2>&1 | quiet > "$out/graphs_gpu.log"
  grep -E "prefill graphs|passed|failed|Error" "$out/graphs_gpu.log"
elif [ "$part" = ab ]; then
  # QUAD W4A4A8 alone, decode b1 / b32 x 1024, once per AB_VARIANTS entry: "base" (the defaults) or
  # comma-separated VAR=VALUE switches, e.g. AB_VARIANTS="base QUAD_DECODE_PREFETCH=1,QUAD_DECODE_MIN_BLOCKS=5";
  # one process each (about 80 s a variant, 30 s once the kernels are in TileLang's cache).
  # AB_PREFILL=1x2048,16x2048 adds prefill rows; AB_DECODE overrides the decode shapes ("" for none).
  # AB_ROUNDS=N runs the list N times over (base, X, base, X, ...): a step's wall time has moved by
  # up to ~5% between processes running the same kernels, so one process a variant can mislead.
  for round in $(seq "${AB_ROUNDS:-1}"); do
    for variant in ${AB_VARIANTS:-base}; do
      env=(); [ "$variant" != base ] && IFS=, read -r -a env <<< "$variant"
      echo "== $variant (round $round)"
      env "${env[@]}" timeout 200 python3 -m quad_engine.cli.bench --arch llama-3-8b --prefill "${AB_PREFILL:-}" \
        --decode "${AB_DECODE-1x1024,32x1024}" --systems quad-w4a4a8 --throughput 0 --repeats 3 --decode-steps 16 \
        --out-dir "$out" --name "ab_${variant//[=,]/_}_r$round" 2>&1 | quiet | grep -A4 "^| batch" | head -n 12
    done
  done
elif [ "$part" = quad-reference ]; then
  # The QUAD reference speed script's configuration: Llama-2-13B shapes, prefill 1-16 x 2048, QUAD
  # W4A4 and W4A4A8 against the engine's fp16 path and transformers (no decode, no throughput run).
  timeout 560 python3 -m quad_engine.cli.bench --preset quad-reference --decode "" \
    --systems quad-w4a4,quad-w4a4a8,fp16,hf --throughput 0 --repeats 3 \
    --out-dir "$out" --name "quad-bench_llama-2-13b_$(date +%F)" 2>&1 | quiet | tail -n 30
elif [ "$part" = bench-short ]; then
  # Prefill 1 x 2048 and decode b1 / b32 only (about 3 minutes); QUAD_* switches pass through.
  timeout 400 python3 -m quad_engine.cli.bench --arch llama-3-8b --prefill 1x2048 --decode 1x1024,32x1024 \
    --systems quad-w4a4a8,quad-w4a4a8-head16,fp16,hf --throughput 16 --repeats 3 --decode-steps 16 \
    --out-dir "$out" --name "quad-bench_llama-3-8b_$(date +%F)" 2>&1 | quiet | tail -n 30
else
  timeout 560 python3 -m quad_engine.cli.bench --arch llama-3-8b --prefill 1x2048,16x2048 --decode 1x1024,32x1024 \
    --systems quad-w4a4a8,quad-w4a4a8-head16,fp16,hf --throughput 16 --repeats 3 --decode-steps 16 \
    --out-dir "$out" --name "quad-bench_llama-3-8b_$(date +%F)" 2>&1 | quiet | tail -n 30
fi
