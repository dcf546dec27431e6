#!/usr/bin/env bash
# The engine on the GPU in one device call (about 8 minutes), logs under $1 (the device's $OUT):
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_engine.sh $OUT
# engine GPU tests, a kernel-level profile of a Llama-3-8B-shaped prefill and decode step, and
# quad-bench on the same shapes (all four systems, a short plan).
set -u
out=${1:?usage: scripts/gpu_engine.sh OUT_DIR}
mkdir -p "$out"
quiet() { grep -v "INFO\|WARNING\|AnnotateWarpGroup" ; }
timeout 200 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py 2>&1 | quiet > "$out/engine_gpu.log"
grep -E "logits vs|passed|failed" "$out/engine_gpu.log"
timeout 120 python3 scripts/gpu_profile_step.py "$out" 2>&1 | quiet | tail -n 3
timeout 250 python3 -m quad_engine.cli.bench --arch llama-3-8b --prefill 1x2048,16x2048 --decode 1x1024,32x1024 \
  --throughput 16 --repeats 3 --decode-steps 16 --out-dir "$out" --name "quad-bench_llama-3-8b_$(date +%F)" 2>&1 \
  | quiet | tail -n 20
