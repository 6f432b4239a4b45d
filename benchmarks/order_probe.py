"""The suite's host-bound cell in isolation: B16 H16 S1024 D128 causal forward+backward, our providers as
bench_attention.py makes and times them (``make_providers``, ``time_provider``), in several orders, with Python's
collector on and off.

    PYTHONPATH=src python3 benchmarks/order_probe.py [--peers]

``--peers`` first runs the suite's peers once (FlexAttention compiled, flash-attn-4 where ``/tmp/fa4site`` holds it,
cuDNN), so the process holds what the suite's does. In sessions 51 and 62 the suite read ``triton-alibi`` there at
0.89-1.09 ms in every round against 0.76-0.82 for ``triton-alibi-all-blocks``, the same kernels and host path below
a training step's reach length (``hopper.REACH_MIN_KEYS // 2``; benchmarks/NOTES.md session 62). Each line: the
providers in the order timed, ms each; ``gc off``: the collector disabled meanwhile."""

import argparse
import gc
import site
import sys

sys.path.insert(0, "benchmarks")
import bench_attention as B  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--peers", action="store_true", help="run the suite's peers once before timing ours")
args = parser.parse_args()
if args.peers:
    site.addsitedir("/tmp/fa4site")  # where benchmarks/gpu_run.sh installs flash-attn-4

providers = B.make_providers(16, 16, 16, 1024, 128, dense_bias=False)
ours = {"alibi": "triton-alibi", "allb": "triton-alibi-all-blocks", "nobias": "triton", "eager": "eager"}
P = {short: providers[name] for short, name in ours.items()}
P["alibi2"] = (lambda: P["alibi"][0](), P["alibi"][1])  # the same call through another function object
if args.peers:
    for name in ("flex-alibi", "fa4", "fa4-alibi", "cudnn"):
        if isinstance(providers[name], str):
            print(f"{name}: {providers[name]}")
        else:
            B.time_provider(*providers[name], "fwd_bwd")
for name in P:  # compiles
    B.time_provider(*P[name], "fwd_bwd")
B.warm_up(2)
orders = [["alibi", "allb", "alibi", "allb", "alibi2", "nobias"], ["eager", "alibi", "allb"],
          ["eager", "allb", "alibi"], ["allb", "alibi", "alibi2"], ["nobias", "alibi", "nobias"]]
for gc_off in (False, True):
    for order in orders:
        if gc_off:
            gc.collect()
            gc.disable()
        ms = [B.time_provider(*P[n], "fwd_bwd") for n in order]
        gc.enable()
        print(("gc off " if gc_off else "") + "  ".join(f"{n} {t:.3f}" for n, t in zip(order, ms)), flush=True)
print("gc counts", gc.get_count(), gc.get_threshold())
