#!/usr/bin/env bash
# Process-level A/B of package versions, alternated in one run (benchmarks/NOTES.md: timings compare only
# within a run). Two steps, because the GPU machine gets the working tree without git history:
#
#   here:        bash benchmarks/ab.sh prepare REV [REV ...]
#                  puts REV's package in ab/REV/mpt_attention (untracked, so the device tool carries it;
#                  delete ab/ before committing; AB_DIR=dir puts it elsewhere)
#   GPU machine: bash benchmarks/ab.sh run ROUNDS "python3 benchmarks/bias_row.py" ab/REV src [...]
#                  runs the command ROUNDS times per package directory, alternating, each under its own
#                  PYTHONPATH, with a "== DIR round N" line before each run
#   then:        python3 benchmarks/ab_summary.py LOG [--metric NAME ...] [--pick RATIO]
#                  each measurement's mean and speed against the first DIR; --pick prints the winner
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    shift
    root=${AB_DIR:-ab}
    for rev in "$@"; do
      rm -rf "${root:?}/$rev" && mkdir -p "$root/$rev"
      git archive "$rev" src/mpt_attention | tar -x -C "$root/$rev" --strip-components=1
      echo "$root/$rev: $(git rev-parse --short "$rev")"
    done
    ;;
  run)
    rounds=$2 cmd=$3
    shift 3
    for round in $(seq 1 "$rounds"); do
      for dir in "$@"; do
        [ -d "$dir/mpt_attention" ] || { echo "no package in $dir/mpt_attention" >&2; exit 2; }
        echo "== $dir round $round"
        case "$dir" in /*) path=$dir ;; *) path=$PWD/$dir ;; esac
        # a run that fails or times out is reported and the others go on (under set -e one cold-cache
        # timeout once ended a whole A/B)
        PYTHONPATH="$path" bash -c "$cmd" || echo "!! $dir round $round exited with $?"
      done
    done
    ;;
  *)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
