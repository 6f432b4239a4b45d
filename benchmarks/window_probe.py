"""Do our kernels have slow measurement windows that the peers do not? (benchmarks/NOTES.md session 31)

    python benchmarks/window_probe.py [--windows 8] [--peer cudnn] [--mode fwd] [--seq 8192] [--clocks]
                                      [--heads 16] [--head-dim 128]

The main suite's rounds (``samples_ms`` in its JSON) showed our D128 forward up to 8% slower in some rounds than in
others while FA4+ALiBi held within 1%; one window of ~100 ms (``do_bench``'s median) read ~13% low in a quiet process
too, with no peer run before it. This times B2 H16 S8192 D128 causal (by default): ours with ALiBi, ours without
bias, and one peer, window after window, as the suite does (``bench_attention.time_provider``), and prints every
window.
"""

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402

from mpt_attention.testing import attention_flops  # noqa: E402


class ClockSampler:
    """``nvidia-smi``'s SM clock, board power and temperature, sampled back to back on a thread; ``mean(start, end)``
    averages the samples taken in a window (``--clocks``: is a slow window a slow clock?)."""

    def __init__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        query = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits"]
        while not self.stop.is_set():
            line = subprocess.run(query, capture_output=True, text=True).stdout.strip()
            self.samples.append((time.perf_counter(), *(float(x) for x in line.split(","))))

    def mean(self, start, end):
        inside = [s[1:] for s in self.samples if start <= s[0] <= end]
        if not inside:
            return "(no sample)"
        clock, power, temp = (sum(col) / len(inside) for col in zip(*inside))
        return f"{clock:4.0f} MHz {power:3.0f} W {temp:2.0f} C"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--peer", default="cudnn", help="a provider name of bench_attention.make_providers")
    parser.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd")
    parser.add_argument("--seq", type=int, default=8192, help="S (16k tokens per batch: B = 16384 // S)")
    parser.add_argument("--clocks", action="store_true", help="each window's mean SM clock, power, temperature")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    batch = max(1, 16384 // args.seq)
    bench.warm_up(2.0)
    providers = bench.make_providers(batch, args.heads, args.heads, args.seq, args.head_dim, dense_bias=False)
    flops = attention_flops(batch, args.heads, args.seq, args.seq, args.head_dim, causal=True, mode=args.mode)
    names = ["triton-alibi", "triton", args.peer]
    for name in names:  # compiles and first calls outside the windows
        bench.time_provider(*providers[name], args.mode)
    sampler = ClockSampler() if args.clocks else None
    for window in range(args.windows):
        cells = []
        for name in names:
            start = time.perf_counter()
            tflops = flops / bench.time_provider(*providers[name], args.mode) / 1e9
            clocks = f" ({sampler.mean(start, time.perf_counter())})" if sampler else ""
            cells.append(f"{name} {tflops:6.1f}{clocks}")
        print(f"window {window}: " + "  ".join(cells), flush=True)
    if sampler:
        sampler.stop.set()


if __name__ == "__main__":
    main()
