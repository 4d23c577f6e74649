#!/usr/bin/env bash
# Time an older commit's build of fastmtl beside the installed one (the working tree's), on the same GPU machine, so
# that a change is measured against its starting point side by side (these machines differ from lease to lease).
#
#   mkdir -p .wt/old && git archive C | tar -x -C .wt/old && echo C >.wt/old/.commit   # here, before the call
#   OUT=... bash benchmarks/compare_build.sh .wt/old [ROWS]           # on the device (.wt/ is git-ignored: carry it)
#
# OLD is built into a folder of its own (never over the installed package) and put first on PYTHONPATH for its runs.
# The working tree's benchmarks/bandwidth.py times both, ROWS (default "masked_multitask_loss") selecting its rows,
# in the order new, old, new, old, so that drift shows as a difference between the two runs of one build. Output:
# $OUT/compare_build.txt. Run after `pip install --no-build-isolation .` of the working tree (gpu_check.sh does it).
set -uo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: compare_build.sh OLD_SOURCE_TREE [ROWS]}
ROWS=${2:-masked_multitask_loss}
OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{
  echo "old build: $OLD ($(cat "$OLD/.commit" 2>/dev/null || echo 'commit unknown'))"
  timeout -k 10 "${OLD_BUILD_TIMEOUT:-300}" $PY -m pip install --no-build-isolation --no-deps -q --target "$target" "$OLD" \
    >"$OUT/compare_build_old.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "OLD BUILD FAILED: exit code $rc (124: its time limit, OLD_BUILD_TIMEOUT)"; tail -20 "$OUT/compare_build_old.log"
    exit 1
  fi
  for round in 1 2; do
    echo "== round $round: new (installed)"
    timeout -k 10 "${RUN_TIMEOUT:-60}" $PY -P benchmarks/bandwidth.py -k "$ROWS"
    echo "== round $round: old ($OLD)"
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "${RUN_TIMEOUT:-60}" $PY -P benchmarks/bandwidth.py -k "$ROWS"
  done
} 2>&1 | tee "$OUT/compare_build.txt"
