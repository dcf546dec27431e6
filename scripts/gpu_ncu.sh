#!/usr/bin/env bash
# Nsight Compute on the kernels behind the missed targets (scripts/gpu_ncu_targets.py), report under
# $1 (the device's $OUT):
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash scripts/gpu_ncu.sh $OUT
# QUAD_* switches pass through: e.g. QUAD_PREFILL_GEMM=pipelined QUAD_DECODE_GEMM=pipelined profiles
# the pipelined GEMMs instead of the producer-unpack ones. Clocks are left alone (--clock-control none). ncu
# reads the counters only on some machine runtimes: where it cannot, the log says so and nothing
# else is lost.
# NCU_ARGS="--attention-only 64x4096" profiles decode attention alone at that batch x context.
set -u
out=${1:?usage: scripts/gpu_ncu.sh OUT_DIR}
mkdir -p "$out"
# The report itself stays on the machine (/tmp): a device call returns only a few files, and the
# details page below holds what is read from it.
python3 scripts/gpu_ncu_targets.py ${NCU_ARGS:-} > /tmp/ncu_build.log 2>&1 || { tail -n 20 /tmp/ncu_build.log; exit 1; }
timeout 500 ncu --clock-control none --kernel-name regex:main_kernel \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
  -o /tmp/ncu_targets -f python3 scripts/gpu_ncu_targets.py ${NCU_ARGS:-} > "$out/ncu.log" 2>&1
tail -n 5 "$out/ncu.log"
if [ -f /tmp/ncu_targets.ncu-rep ]; then
  ncu --import /tmp/ncu_targets.ncu-rep --page details > "$out/ncu_details.txt" 2>&1
  grep -E "main_kernel|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Stall|Issue Slot|No Eligible" \
    "$out/ncu_details.txt" | head -n 120
fi
