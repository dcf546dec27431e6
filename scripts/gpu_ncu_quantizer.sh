#!/usr/bin/env bash
# Nsight Compute on the gated down_proj quantizer a prefill of TOKENS runs (the dispatch's choice:
# QUAD_HADAMARD_MMA=0 profiles the scalar streaming kernel), with the source counters, cut into its
# barrier-delimited phases by scripts/ncu_regions.py (the profile itself: scripts/ncu_source_profile.sh):
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_ncu_quantizer.sh $OUT [TOKENS]
# One file comes back ($1/ncu_quantizer.tgz: the details page, the source page, the log), since a
# device call returns only a few files; the summary is printed.
set -u
out=${1:?usage: scripts/gpu_ncu_quantizer.sh OUT_DIR [TOKENS]}
tokens=${2:-2048}
mkdir -p "$out"
work=$(mktemp -d)
cat > "$work/launch.py" <<PY
import torch
from kernels_tl.hadamard_quant_dispatch import build_choice, kernel_choice
n, m = 14336, $tokens
choice = kernel_choice(m, n, (28, 512), None, True)
kernel = build_choice(choice, n, (28, 512), None, 8, 0.9, True)
x = torch.randn(m, 2 * n, device="cuda").half()
q, s = torch.empty(m, n, device="cuda", dtype=torch.int8), torch.empty(m, device="cuda")
for _ in range(2):  # the first launch is skipped by ncu (module load)
    kernel(x, q, s)
torch.cuda.synchronize()
print("profiled", choice, m, "tokens")
PY
bash scripts/ncu_source_profile.sh "$work" "$out/ncu_quantizer.tgz" 200 || exit 1
python3 scripts/ncu_regions.py "$work/source.csv" --elements $((tokens * 14336))
