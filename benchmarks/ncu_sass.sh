#!/usr/bin/env bash
# Per-instruction profile of one kernel launch: ncu's source counters (executed instructions, shared-memory
# wavefronts against the ideal count, warp-stall samples) for every SASS instruction, exported as CSV
# for benchmarks/sass_hotspots.py (benchmarks/NOTES.md, session 21).
#
#   OUT=DIR bash benchmarks/ncu_sass.sh NAME KERNEL_REGEX LAUNCH_SKIP python3 SCRIPT [ARGS...]
#
# writes DIR/NAME.ncu-rep, DIR/NAME-sass.csv (one row per SASS instruction) and DIR/NAME-details.txt.
# Example, the fused backward (the second of two backward calls):
#   OUT=/tmp bash benchmarks/ncu_sass.sh bwd hopper_bwd 1 python3 benchmarks/profile_bwd.py 2 16 8192 128
set -euo pipefail
name=$1 regex=$2 skip=$3
shift 3
out=${OUT:-/tmp}/$name
ncu --clock-control none -k "regex:$regex" --launch-skip "$skip" --launch-count 1 \
    --section SourceCounters --section WarpStateStats --section SpeedOfLight --section LaunchStats \
    --import-source yes -f -o "$out" "$@"
ncu -i "$out.ncu-rep" --page details > "$out-details.txt"
ncu -i "$out.ncu-rep" --page source --csv --print-source sass > "$out-sass.csv"
echo "$name: $(wc -l < "$out-sass.csv") rows in $out-sass.csv"
