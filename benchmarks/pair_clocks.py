"""Why ratios to FlexAttention read higher when the calls are interleaved than when each provider is timed alone
(benchmarks/NOTES.md session 63): each provider's ms per call and the card's SM clock and board power, timed alone
and interleaved with ours, as ``bench_attention.paired_ratio`` interleaves them.

    PYTHONPATH=src python3 benchmarks/pair_clocks.py [--shape 8,16,16,2048,128] [--mode fwd] [--peers flex-alibi,...]

Each phase runs for ``--seconds`` with the same L2 flush before every call as ``do_bench``, while ``nvidia-smi``
is sampled every 0.1 s (the first quarter of the samples dropped as ramp-up). A line per phase: the median ms per
call of each provider in it, the median clock (MHz) and power (W).
"""

import argparse
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_attention as B  # noqa: E402
from power_clocks import sample_clocks  # noqa: E402


def phase(steps: dict, seconds: float) -> tuple[dict, float, float]:
    """Run ``steps`` (name -> callable) in turn, A B B A as paired_ratio does, for ``seconds``."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    names = list(steps)
    order = [names[i] for i in B.interleaved(2)] if len(names) == 2 else names
    events = {n: [] for n in names}
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_clocks, args=(stop, samples))
    sampler.start()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for name in order:
            events[name].append(B.timed_call(steps[name], flush))
        if len(events[names[0]]) % 20 == 0:
            torch.cuda.synchronize()  # the host at most 20 calls ahead
    torch.cuda.synchronize()
    stop.set()
    sampler.join()
    ms = {n: statistics.median(a.elapsed_time(b) for a, b in pairs) for n, pairs in events.items()}
    kept = samples[len(samples) // 4:] or samples
    return ms, statistics.median(s[0] for s in kept), statistics.median(s[1] for s in kept)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8,16,16,2048,128", help="B,H_q,H_kv,S,D")
    parser.add_argument("--mode", default="fwd", choices=["fwd", "fwd_bwd"])
    parser.add_argument("--peers", default="flex-alibi,cudnn")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    batch, n_heads, n_kv, seq, head_dim = (int(x) for x in args.shape.split(","))
    providers = B.make_providers(batch, n_heads, n_kv, seq, head_dim, dense_bias=False)
    ours = "triton-alibi"
    peers = [p for p in args.peers.split(",") if not isinstance(providers[p], str)]
    steps = {n: B.paired_step(*providers[n], args.mode) for n in [ours, *peers]}
    B.warm_up(2)
    print(f"B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim} {args.mode}; ms per call, SM MHz, W", flush=True)
    for round_ in range(2):
        for peer in peers:
            for label, chosen in ((f"{ours} alone", [ours]), (f"{peer} alone", [peer]),
                                  (f"{ours} + {peer}", [ours, peer])):
                ms, clock, power = phase({n: steps[n] for n in chosen}, args.seconds)
                times = "  ".join(f"{n} {t:.3f}" for n, t in ms.items())
                ratio = f"  ratio {ms[peer] / ms[ours]:.3f}" if len(ms) == 2 else ""
                print(f"round {round_}  {label:28s} {times}{ratio}  {clock:.0f} MHz  {power:.0f} W", flush=True)


if __name__ == "__main__":
    main()
