#!/usr/bin/env bash
# Run the GPU tests under another Triton than the one the GPU machine's torch brings (CI's 3.7.1 against the
# machine's 3.6): the wheel is trimmed to what compiling and launching a CUDA kernel needs (libtriton stripped of its
# symbols, no profiler, no cupti, one ptxas, no disassemblers: ~50-60 MB as xz) and sent in two halves, since a
# transfer to the machine (which has no network) takes at most 64 MiB with the working tree.
#
#   bash tools/other_triton.sh prepare [VERSION]   here (default 3.7.1, for the machine's Python 3.12): writes
#                                                  .peers/triton/a/part0 and .peers/triton/b/part1 (git-ignored);
#                                                  BOTH_PTXAS=1 keeps both of the wheel's ptxas (not only sm_90's)
#   bash tools/other_triton.sh stage               there, with .peers/triton/a carried: keeps the first half in /tmp
#   bash tools/other_triton.sh install             there, right after (the machine stays up ~30 s between calls), with
#                                                  .peers/triton/b carried: unpacks both halves into /tmp/triton-site
#   PYTHONPATH=/tmp/triton-site:$PWD/src python3 -m pytest -m gpu ...   then puts it ahead of torch's own
#
# torch was built against its own Triton: where a torch.compile test fails in such a run, look at torch first
# (under 3.7.1 with torch 2.11 they passed).
set -euo pipefail
site=/tmp/triton-site
parts=/tmp/triton-parts
if [[ ${1:-} == stage ]]; then
  mkdir -p "$parts" && cp .peers/triton/a/part0 "$parts/" && exit 0
fi
if [[ ${1:-} == install ]]; then
  [[ -f $parts/part0 ]] || { echo "no $parts/part0: run 'stage' with .peers/triton/a first (the machine restarted?)" >&2; exit 3; }
  mkdir -p "$site" && cat "$parts/part0" .peers/triton/b/part1 | tar -xJ -C "$site"
  PYTHONPATH=$site python3 -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
  exit 0
fi
[[ ${1:-} == prepare ]] || { echo "usage: $0 prepare [VERSION] | stage | install" >&2; exit 2; }
version=${2:-3.7.1}
work=$(mktemp -d)
mkdir -p "$work/dl"  # (pip copying a cached wheel does not create it)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/dl" "triton==$version"
mkdir -p "$work/site"
python3 -m zipfile -e "$work"/dl/triton-*.whl "$work/site"
nv="$work/site/triton/backends/nvidia"
strip "$work/site/triton/_C/libtriton.so"
rm -rf "$work/site/triton/_C/libproton.so" "$nv/lib/cupti" "$work/site/triton/backends/amd/lib" "$nv/bin/nvdisasm" \
  "$nv/bin/cuobjdump" "$work/site/triton/FileCheck"
# one ptxas: the one Triton assembles sm_90 kernels with (`ptxas` up to 3.8, `ptxas-blackwell` for every arch from 3.9);
# with BOTH_PTXAS=1 both (3.9's CUDA 12.9 `ptxas` can stand in through TRITON_PTXAS_BLACKWELL_PATH: NOTES session 55)
if [[ ${BOTH_PTXAS:-0} != 1 ]]; then
  if grep -q "arch >= 100 else knobs.nvidia.ptxas" "$nv/compiler.py"; then rm "$nv/bin/ptxas-blackwell"; else rm "$nv/bin/ptxas"; fi
fi
chmod +x "$nv"/bin/*
rm -rf .peers/triton && mkdir -p .peers/triton/a .peers/triton/b
grep -qx '/.peers/' .git/info/exclude 2>/dev/null || echo '/.peers/' >> .git/info/exclude
tar -C "$work/site" -cf - triton | xz -9 -T0 > "$work/triton.tar.xz"
split -n 2 -d -a 1 "$work/triton.tar.xz" "$work/part"
mv "$work/part0" .peers/triton/a/ && mv "$work/part1" .peers/triton/b/
du -h .peers/triton/a/part0 .peers/triton/b/part1
