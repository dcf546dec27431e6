#!/usr/bin/env bash
# Every GPU test and kernel benchmark in one device call, logs under $1 (the device's $OUT):
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_all.sh $OUT
set -u
out=${1:?usage: scripts/gpu_all.sh OUT_DIR}
mkdir -p "$out"
quiet() { grep -v "INFO\|WARNING" ; }
python3 scripts/gpu_gemm_check.py -q 2>&1 | quiet > "$out/gemm_tests.log"
python3 -m pytest -q -m gpu tests/test_quantize_gpu.py tests/test_kv_attention_gpu.py tests/test_engine_gpu.py 2>&1 \
  | quiet > "$out/gpu_tests.log"
tail -n 3 "$out/gemm_tests.log" "$out/gpu_tests.log"
python3 bench/kernels.py --out "$out/kernels.json" 2>&1 | quiet > "$out/kernels.log"
python3 bench/attention.py --out "$out/attention.json" 2>&1 | quiet > "$out/attention.log"
grep -c . "$out/kernels.log" "$out/attention.log"
