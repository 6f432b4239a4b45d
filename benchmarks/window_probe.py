"""Do our kernels have slow measurement windows that the peers do not? (benchmarks/NOTES.md session 31)

    python benchmarks/window_probe.py [--windows 8] [--peer cudnn] [--mode fwd]

The main suite's rounds (``samples_ms`` in its JSON) showed our D128 forward up to 8% slower in some rounds than in
others while FA4+ALiBi held within 1%; one window of ~100 ms (``do_bench``'s median) read ~13% low in a quiet process
too, with no peer run before it. This times B2 H16 S8192 D128 causal: ours with ALiBi, ours without bias, and one
peer, window after window, as the suite does (``bench_attention.time_provider``), and prints every window.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402

from mpt_attention.testing import attention_flops  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--peer", default="cudnn", help="a provider name of bench_attention.make_providers")
    parser.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd")
    args = parser.parse_args()
    bench.warm_up(2.0)
    providers = bench.make_providers(2, 16, 16, 8192, 128, dense_bias=False)
    flops = attention_flops(2, 16, 8192, 8192, 128, causal=True, mode=args.mode)
    names = ["triton-alibi", "triton", args.peer]
    for name in names:  # compiles and first calls outside the windows
        bench.time_provider(*providers[name], args.mode)
    for window in range(args.windows):
        cells = (f"{name} {flops / bench.time_provider(*providers[name], args.mode) / 1e9:6.1f}" for name in names)
        print(f"window {window}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
