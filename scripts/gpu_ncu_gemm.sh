#!/usr/bin/env bash
# Nsight Compute on one prefill GEMM as the dispatch builds it (the register-unpack kernel, its
# tiles and panel), with the source counters, so that the time outside the K loop (the ramp, the
# epilogue, the stores) can be read instruction by instruction:
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_ncu_gemm.sh $OUT [N K TOKENS]
# Default: Llama-3-8B's gate_up (28672 x 4096, outlier rank 64) at 2048 tokens. One file comes back
# ($1/ncu_gemm.tgz: the details page, the SASS source page as CSV, the log); the summary and
# scripts/ncu_regions.py's barrier-delimited regions are printed.
set -u
out=${1:?usage: scripts/gpu_ncu_gemm.sh OUT_DIR [N K TOKENS]}
n=${2:-28672}; k=${3:-4096}; tokens=${4:-2048}
mkdir -p "$out"
work=$(mktemp -d)
cat > "$work/launch.py" <<PY
import torch
from kernels_tl import gemm_plans
from kernels_tl import reference as ref
from kernels_tl.gemm_rs import w4ax_gemm_rs
n, k, m, rank = $n, $k, $tokens, 64
tiles = gemm_plans.rs_tiles(m, n, k)
kernel = w4ax_gemm_rs(n, k, rank, False, "float16", **tiles)
xq = torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8)
wp = ref.pack_int4(torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8))
xs, ws = torch.rand(m, device="cuda") * 0.01, torch.rand(n, device="cuda").half() * 0.01
xo, wo = torch.randn(m, rank, device="cuda").half(), torch.randn(n, rank, device="cuda").half()
y, bias = torch.empty(m, n, device="cuda", dtype=torch.float16), torch.zeros(n, device="cuda").half()
for _ in range(2):  # the first launch is skipped by ncu (module load)
    kernel(xq, xs, wp, ws, xo, wo, bias, y)
torch.cuda.synchronize()
print("profiled", n, k, m, "tokens", tiles)
PY
bash scripts/ncu_source_profile.sh "$work" "$out/ncu_gemm.tgz" 240 || exit 1
python3 scripts/ncu_regions.py "$work/source.csv"
