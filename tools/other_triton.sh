#!/usr/bin/env bash
# Run the GPU tests under another Triton than the one the GPU machine's torch brings (CI's 3.7.1 against the
# machine's 3.6): the wheel is trimmed to what compiling and launching a CUDA kernel needs and sent in one
# transfer of at most 64 MiB (the machine has no network).
#
#   bash tools/other_triton.sh prepare [VERSION]   here: writes .peers/triton/triton.tar.xz (git-ignored, ~52 MB for
#                                                  3.7.1: libtriton stripped of its symbols, no profiler, no cupti,
#                                                  no Blackwell ptxas) for the machine's Python (3.12)
#   bash tools/other_triton.sh install             there, with .peers/triton carried: unpacks into /tmp/triton-site
#   PYTHONPATH=/tmp/triton-site:$PWD/src python3 -m pytest -m gpu ...   then puts it ahead of torch's own
#
# torch's compiler keeps expecting its own Triton, so the torch.compile tests say nothing in such a run.
set -euo pipefail
site=/tmp/triton-site
if [[ ${1:-} == install ]]; then
  mkdir -p "$site" && tar -xJf .peers/triton/triton.tar.xz -C "$site"
  PYTHONPATH=$site python3 -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
  exit 0
fi
[[ ${1:-} == prepare ]] || { echo "usage: $0 prepare [VERSION] | install" >&2; exit 2; }
version=${2:-3.7.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/dl" "triton==$version"
mkdir -p "$work/site"
python3 -m zipfile -e "$work"/dl/triton-*.whl "$work/site"
nv="$work/site/triton/backends/nvidia"
strip "$work/site/triton/_C/libtriton.so"
rm -rf "$work/site/triton/_C/libproton.so" "$nv/lib/cupti" "$nv/bin/ptxas-blackwell" "$work/site/triton/backends/amd/lib"
chmod +x "$nv"/bin/*
mkdir -p .peers/triton
grep -qx '/.peers/' .git/info/exclude 2>/dev/null || echo '/.peers/' >> .git/info/exclude
tar -C "$work/site" -cf - triton | xz -9 -T0 > .peers/triton/triton.tar.xz
du -h .peers/triton/triton.tar.xz
