"""One path of ours run back to back for a while, on the GPU, with a watchdog: does it ever stop returning?

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/soak.py --variant row [--seconds 60] [--shape B,H,H_KV,S,D] [--mode fwd]

Session 42 (benchmarks/NOTES.md) saw two processes stop making progress (the card idle at ~123 W, no error, until
the command's limit) while running MPT's (1, H, 1, S) float32 bias row forward+backward at B4 H32 S4096 D64 back to
back, after ALiBi slopes had run on the same q, k, v (once after ~1200 slopes steps, within ~2 s of the row's).
The main suite, which runs each provider a few hundred steps per shape, never stopped. A race in the forward past
the reach, found afterwards in the SASS and fixed the same session (NOTES.md), explains it. This script repeats that
pattern: ``--before N`` steps of slopes first (the default 800, as then), then ``--variant`` until ``--seconds``
have passed. Every step is armed with ``faulthandler``'s watchdog (``--watchdog`` seconds): a step that does not
return prints every thread's Python stack and exits with status 1. With ``CUDA_LAUNCH_BLOCKING=1`` each launch
waits for its kernel, so that stack names the launch that did not finish (a kernel that never ends) rather than
a later synchronisation; without it a stack inside our host code means the host itself stopped.
Prints the steps run and their rate every ``--every`` steps, then ``no stop in N steps``.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import torch

import mpt_attention as M


def make_step(variant, n_heads, seq, mode, inputs):
    """One call of ``variant`` (``slopes``, ``row``: MPT's float32 bias row, ``no-bias``) on the shared ``inputs``."""
    q, k, v, dout = inputs
    kwargs = {"slopes": {"alibi_slopes": M.gen_slopes(n_heads, return_1d=True, device="cuda")},
              "row": {"attn_bias": M.build_alibi_bias(n_heads, seq, device="cuda")}, "no-bias": {}}[variant]

    def step():
        for x in (q, k, v):
            x.grad = None
        out = M.attention(q, k, v, backend="triton", causal=True, **kwargs)
        if mode == "fwd_bwd":
            out.backward(dout)
    return step


def run(step, name, n_steps, deadline, watchdog, every):
    """``step`` up to ``n_steps`` times or until ``deadline``, each under the watchdog; the steps run."""
    start = time.perf_counter()
    done = 0
    while done < n_steps and time.perf_counter() <= deadline:
        faulthandler.dump_traceback_later(watchdog, exit=True)
        step()
        done += 1
        if done % every == 0:
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            print(f"{name}: {done} steps, {elapsed / done * 1e3:.3f} ms/step", flush=True)
    torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["slopes", "row", "no-bias"], default="row")
    parser.add_argument("--shape", default="4,32,32,4096,64", help="B,H,H_KV,S,D")
    parser.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd_bwd")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run --variant")
    parser.add_argument("--before", type=int, default=800, help="slopes steps first, on the same q, k, v")
    parser.add_argument("--watchdog", type=float, default=10.0, help="seconds one step may take (compiles aside)")
    parser.add_argument("--every", type=int, default=500, help="report every this many steps")
    args = parser.parse_args()
    batch, n_heads, n_kv, seq, head_dim = (int(x) for x in args.shape.split(","))
    grad = args.mode == "fwd_bwd"
    q = torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    k, v = (torch.randn(batch, seq, n_kv, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
            for _ in range(2))
    inputs = (q, k, v, torch.randn_like(q))
    steps = {name: make_step(name, n_heads, seq, args.mode, inputs) for name in {"slopes", args.variant}}
    for name, step in steps.items():  # compiles: outside the watchdog's short limit
        faulthandler.dump_traceback_later(600, exit=True)
        step()
        torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    print(f"compiled; B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim} {args.mode}", flush=True)
    if args.before:
        run(steps["slopes"], "slopes (before)", args.before, float("inf"), args.watchdog, args.every)
    done = run(steps[args.variant], args.variant, sys.maxsize, time.perf_counter() + args.seconds, args.watchdog,
               args.every)
    print(f"no stop in {done} steps of {args.variant}", flush=True)


if __name__ == "__main__":
    main()
