#!/usr/bin/env bash
# Nsight Compute profile of the CUDA grouped masked-loss forward on the NYUv2-like batch of benchmarks/bandwidth.py
# (CUDA only; fastmtl built and installed). Clocks as found (--clock-control none: the device's settings are left
# alone). Writes under $OUT:
#   ncu.txt         every section of the full set (speed of light, memory, scheduler, warp states, pipes, ...)
#   ncu_source.csv  the counters per SASS instruction (stall reasons, executed instructions), with source lines
#
#   OUT=/some/dir bash benchmarks/ncu_loss.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/ncu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
NCU=${NCU:-ncu}
# The kernel's third launch: the first ones load the module and warm the caches.
$NCU --clock-control none --kernel-name regex:grouped_forward --launch-skip 2 --launch-count 1 --set full \
  --import-source yes -f -o "$OUT/grouped" \
  $PY -P -c "
import sys; sys.path.insert(0, 'benchmarks')
import torch, bandwidth
_, _, cases = bandwidth.loss_cases()
step = cases['cuda masked_multitask_loss_forward (fwd kernels), graph'][1]
for _ in range(4):
    step()
torch.cuda.synchronize()
" >"$OUT/ncu_run.log" 2>&1 || { echo "ncu failed:"; tail -20 "$OUT/ncu_run.log"; exit 1; }
$NCU -i "$OUT/grouped.ncu-rep" --page details --print-details all >"$OUT/ncu.txt" 2>&1
$NCU -i "$OUT/grouped.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu_source.csv" 2>&1
grep -E "Duration|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|Registers Per|Local Memory|No Eligible|Stall" \
  "$OUT/ncu.txt" | head -40
