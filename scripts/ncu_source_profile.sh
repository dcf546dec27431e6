#!/usr/bin/env bash
# The Nsight Compute step shared by scripts/gpu_ncu_gemm.sh and scripts/gpu_ncu_quantizer.sh: build
# and run WORK/launch.py once (its kernels compiled outside the profiler), then profile the second
# launch of its TileLang kernel with the source counters, and leave in WORK the details page, the
# SASS source page as CSV (scripts/ncu_regions.py reads it) and the log, packed into OUT_TGZ; the
# summary lines are printed.
#   bash scripts/ncu_source_profile.sh WORK OUT_TGZ TIMEOUT_S
set -u
work=${1:?usage: scripts/ncu_source_profile.sh WORK OUT_TGZ TIMEOUT_S}
tgz=${2:?OUT_TGZ}
limit=${3:?TIMEOUT_S}
python3 "$work/launch.py" > "$work/build.log" 2>&1 || { tail -n 20 "$work/build.log"; exit 1; }
timeout "$limit" ncu --clock-control none --kernel-name regex:main_kernel --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section SchedulerStats --section InstructionStats --section SourceCounters \
  -o "$work/report" -f python3 "$work/launch.py" > "$work/ncu.log" 2>&1
ncu --import "$work/report.ncu-rep" --page details > "$work/details.txt" 2>&1
ncu --import "$work/report.ncu-rep" --page source --csv --print-source sass > "$work/source.csv" 2>&1
tar czf "$tgz" -C "$work" details.txt source.csv ncu.log
grep -E "profiled|Duration|Issue Slots Busy|Executed Instructions  |DRAM Throughput|Registers Per|Local Memory Spilling Requests  " \
  "$work/ncu.log" "$work/details.txt" | sed 's/^[^:]*://'
true  # the build step above is the only failure that stops the caller
