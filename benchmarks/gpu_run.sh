#!/usr/bin/env bash
# One GPU-machine call: the gpu-marked tests, then the benchmark, with the table printed last.
#   GIT_COMMIT=<sha> [PROBES=1] [HEAD_DIMS=1] [PADDING=1] [GENERAL_REACH=1] [HOPPER_REACH=1] [PRECISION=1] \
#     [SKIP_TESTS=1] [SOAK=<seconds>] \
#     bash benchmarks/gpu_run.sh [args...]
# HEAD_DIMS=1 adds benchmarks/head_dims.py (D 80-112 and (B, H, S, D) views, peers included; about two minutes).
# PADDING=1 adds benchmarks/padding_kernels.py (the key_padding_mask route's kernels and host time per call; ~40 s).
# GENERAL_REACH=1 adds benchmarks/varlen.py --general-reach (the general kernels' reach in packed sequences);
# HOPPER_REACH=1 the same on the Hopper kernels (--hopper-reach).
# PRECISION=1 adds benchmarks/alibi_precision.py (float32 causal ALiBi's errors in the kernels' two forms; ~20 s).
# SOAK=<seconds> runs benchmarks/soak.py first, MPT's bias row then slopes back to back for that long each (the
# stops of session 42); a step that does not return within its watchdog prints the stacks and ends that run.
# FUZZ=1 adds tests/test_gpu_fuzz.py to the tests (hypothesis, derandomized; about three minutes on 8 workers).
# flash-attn-4 is used when ../shared/tools/fa4-wheels.sh has put its wheels under .peers/ (see there).
# OTHER_TRITON=1 runs everything under the Triton that tools/other_triton.sh prepared (CI's 3.7.1 instead of the
# machine's own; the versions go into the results' header): a call carrying .peers/triton/a runs
# `bash tools/other_triton.sh stage`, then this one carries .peers/triton/b.
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
if [[ "${OTHER_TRITON:-0}" == 1 ]]; then
  bash tools/other_triton.sh install || { echo "OTHER_TRITON=1: no Triton staged and carried (tools/other_triton.sh)" >&2; exit 3; }
  export PYTHONPATH="/tmp/triton-site:$PYTHONPATH"
fi
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
if [[ -f /tmp/fa4/part_aa && -d .peers/b ]]; then
  bash .peers/b/fa4-wheels.sh install || echo "flash-attn-4: install failed"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
if [[ -n "${SOAK:-}" ]]; then
  for variant in row slopes; do
    python3 benchmarks/soak.py --variant "$variant" --seconds "$SOAK" 2>&1 | tee -a "$OUT/soak.log" | tail -4
  done
fi
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  # six workers where pytest-xdist is installed: the tests are bound by compiling (the whole Hopper file
  # 83 s instead of ~8 min on the H200 machine's 16 cores, session 25)
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
  files="tests/test_gpu.py tests/test_gpu_hopper.py tests/test_gpu_hopper_bias.py tests/test_gpu_hopper_reach.py"
  [[ "${FUZZ:-0}" == 1 ]] && files="$files tests/test_gpu_fuzz.py"
  python3 -m pytest -m gpu $files -q -p no:cacheprovider $workers 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
python3 -c "
import runpy, site, sys
site.addsitedir('/tmp/fa4site')
sys.argv = ['bench_attention.py', '--out', '$OUT'] + sys.argv[1:]
runpy.run_path('benchmarks/bench_attention.py', run_name='__main__')
" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^[|]" | tail -60
if [[ "${PROBES:-0}" == 1 ]]; then  # the backward-kernel and bias-row probes (about a minute)
  python3 benchmarks/bwd_kernels.py 2>&1 | tee "$OUT/bwd_kernels.log"
  python3 benchmarks/bias_row.py 2>&1 | tee "$OUT/bias_row.log"
fi
if [[ "${PADDING:-0}" == 1 ]]; then
  python3 benchmarks/padding_kernels.py 2>&1 | grep -v "UserWarning\|_warn_once" | tee "$OUT/padding_kernels.log"
fi
if [[ "${GENERAL_REACH:-0}" == 1 ]]; then
  python3 benchmarks/varlen.py --general-reach 2>&1 | grep -v "UserWarning\|_warn_once" | tee "$OUT/general_reach.log"
fi
if [[ "${HOPPER_REACH:-0}" == 1 ]]; then
  python3 benchmarks/varlen.py --hopper-reach 2>&1 | grep -v "UserWarning\|_warn_once" | tee "$OUT/hopper_reach.log"
fi
if [[ "${PRECISION:-0}" == 1 ]]; then
  python3 benchmarks/alibi_precision.py 2>&1 | tee "$OUT/alibi_precision.log"
fi
if [[ "${HEAD_DIMS:-0}" == 1 ]]; then
  python3 -c "
import runpy, site, sys
site.addsitedir('/tmp/fa4site')
sys.argv = ['head_dims.py', '--out', '$OUT']
runpy.run_path('benchmarks/head_dims.py', run_name='__main__')
" 2>&1 | grep -v "UserWarning\|generate_mlir_function_types" | tee "$OUT/head_dims.log" | grep "^[|]"
fi
grep "^[|]" "$OUT/bench.log"
