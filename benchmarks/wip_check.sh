#!/usr/bin/env bash
# The GPU check of a wip branch's backward change (benchmarks/NOTES.md): here first `bash benchmarks/ab.sh prepare
# main` (main's package into ab/main). Then on the GPU machine: `bash benchmarks/wip_check.sh` (~8 min): the Hopper
# backward tests under a timeout (a protocol error hangs the kernel), then two alternated rounds of the backward alone
# against main at D 80, 96, 112 (fused_dq.py --padded), summarised last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src
timeout 380 python3 -m pytest tests/test_gpu_hopper.py -m gpu -q -x -p no:cacheprovider \
  -k "backward or dq_warpgroup or dkdv or grouped or padded or bias_row" 2>&1 | tail -3
log=${OUT:-/tmp}/wip-ab.log
bash benchmarks/ab.sh run 2 "timeout 120 python3 benchmarks/fused_dq.py --padded" ab/main src > "$log" 2>&1
python3 benchmarks/ab_summary.py "$log"
