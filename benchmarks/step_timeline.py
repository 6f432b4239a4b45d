"""Where a training step's host time goes, on both threads: a timeline of one forward+backward through the public
op, as host timestamps taken at fixed points (benchmarks/NOTES.md session 33):

    python benchmarks/step_timeline.py [--shape B,H,S,D] [--steps N]

Points: the step's start, ``mpt_attention.attention`` entered, ``launch.forward`` entered, each kernel launch
entered and done, ``launch.forward`` done, ``attention`` returned, ``Tensor.backward`` called,
``launch_backward.backward`` entered (on the device's autograd thread: the gap before it is the handoff), its launches,
``launch_backward.backward`` done, ``Tensor.backward`` returned (the gap before it is the handoff back). Each gap
is the median over the steps, in microseconds, with the thread it ran on. The steps run as ``do_bench`` runs them
(an L2-clearing memset and CUDA events around each, no synchronisation between steps), so the GPU's time per step is
printed beside the host's: where the host's is longer the step is host-bound. Runs torch's default autograd threads,
then the backward on the calling thread.

``--peers NAME,...``: instead, for providers of ``bench_attention.make_providers`` (e.g.
``triton-alibi,cudnn,fa4-alibi``; no timeline points, torch's default threads), each step's host time beside its GPU
time in the same loop: how much host time a peer's training step takes on the same machine.
"""

import argparse
import statistics
import threading
import time

import torch

import mpt_attention as M
from mpt_attention import api, ops
from mpt_attention.impl.triton import hopper, hopper_dkdv, launch, launch_backward, lean_launch, plans

STAMPS: list = []  # (label, perf_counter_ns, thread ident) of the running step


def stamp(label: str) -> None:
    STAMPS.append((label, time.perf_counter_ns(), threading.get_ident()))


def around(label: str, real):
    """``real`` with a stamp as it is entered and as it returns."""
    def wrapper(*args, **kwargs):
        stamp(f"{label} entered")
        try:
            return real(*args, **kwargs)
        finally:
            stamp(f"{label} done")
    return wrapper


def install() -> None:
    launch.forward = around("launch.forward", launch.forward)
    launch_backward.backward = around("launch_backward.backward", launch_backward.backward)
    api._validate = around("api._validate", api._validate)
    ops._EagerTritonAttention.forward = staticmethod(around("Function.forward", ops._EagerTritonAttention.forward))
    hopper.unsupported = around("hopper.unsupported", hopper.unsupported)  # (a planned call makes none)
    hopper.run_forward = around("hopper.run_forward", hopper.run_forward)
    plans.run_fused = around("plans.run_fused", plans.run_fused)
    hopper_dkdv.run_dkdv = around("hopper_dkdv.run_dkdv", hopper_dkdv.run_dkdv)
    plans.row_terms = around("plans.row_terms", plans.row_terms)
    real_launch, real_call = launch.launch_kernel, lean_launch.PlannedLaunch.__call__

    def stamped_launch(fn, grid, *args, **kwargs):  # the general kernels' launches
        stamp(f"launch {fn.__name__}")
        real_launch(fn, grid, *args, **kwargs)
        stamp(f"launched {fn.__name__}")

    def stamped_call(self, *args):  # the Hopper route's planned launches
        stamp(f"launch {self.fn.__name__}")
        real_call(self, *args)
        stamp(f"launched {self.fn.__name__}")

    launch.launch_kernel = launch_backward.launch_kernel = stamped_launch
    lean_launch.PlannedLaunch.__call__ = stamped_call


WARM_UP = 20  # steps run before the timed ones (compiles, allocator warm-up)


def time_steps(step, grads, steps: int):
    """``step()`` run ``WARM_UP + steps`` times as ``do_bench`` runs it: the gradients of ``grads`` set to None, L2
    cleared by a memset, CUDA events around the call, no synchronisation between steps. Returns what the timed
    steps returned and each one's GPU time in us."""
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # as triton.testing.do_bench clears L2
    results, events = [], []
    for i in range(WARM_UP + steps):
        for g in grads:
            g.grad = None
        cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = step()
        end.record()
        if i >= WARM_UP:
            results.append(result)
            events.append((start, end))
        elif i == WARM_UP - 1:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return results, [s.elapsed_time(e) * 1e3 for s, e in events]


def run(label: str, shape, steps: int, main_thread: int) -> None:
    batch, n_heads, seq, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    dout = torch.randn_like(q)
    attend = around("attention", M.attention)

    def step():
        STAMPS.clear()
        stamp("step")
        out = attend(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
        stamp("backward called")
        out.backward(dout)
        stamp("backward returned")
        return list(STAMPS)

    timelines, gpu_us = time_steps(step, (q, k, v), steps)
    labels = [s[0] for s in timelines[0]]
    if any([s[0] for s in t] != labels for t in timelines):
        print(f"[{label}] the steps' points differ; first step's: {labels}")
        return
    print(f"\n[{label}] B{batch} H{n_heads} S{seq} D{head_dim}, {steps} steps: medians, us since the previous point")
    for j, name in enumerate(labels):
        gaps = [(t[j][1] - t[j - 1][1]) / 1e3 for t in timelines] if j else [0.0]
        since = [(t[j][1] - t[0][1]) / 1e3 for t in timelines]
        thread = "main" if timelines[0][j][2] == main_thread else "other"
        print(f"    {name:42s} {thread:5s} +{statistics.median(gaps):8.1f}   at {statistics.median(since):8.1f}")
    host = [(t[-1][1] - t[0][1]) / 1e3 for t in timelines]
    print(f"    host per step {statistics.median(host):.1f} us (min {min(host):.1f}); GPU per step (events) "
          f"{statistics.median(gpu_us):.1f} us (min {min(gpu_us):.1f})")


def peers(names, shape, steps: int) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_attention import make_providers

    batch, n_heads, seq, head_dim = shape
    providers = make_providers(batch, n_heads, n_heads, seq, head_dim, dense_bias=False)
    print(f"\n[peers] B{batch} H{n_heads} S{seq} D{head_dim}, {steps} steps, torch's default autograd threads")
    for _ in range(2):  # two alternated rounds
        for name in names:
            entry = providers.get(name, f"no provider {name!r}")
            if isinstance(entry, str):
                print(f"    {name:20s} {entry}")
                continue
            fn, grads = entry
            dout = torch.randn_like(fn())

            def step(fn=fn, dout=dout):
                began = time.perf_counter_ns()
                fn().backward(dout)
                return (time.perf_counter_ns() - began) / 1e3

            host, gpu = time_steps(step, grads, steps)
            print(f"    {name:20s} host per step {statistics.median(host):7.1f} us (min {min(host):7.1f}); "
                  f"GPU per step {statistics.median(gpu):7.1f} us (min {min(gpu):7.1f})", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", default=None, help="B,H,S,D (repeatable)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--peers", help="comma-separated bench_attention providers: host and GPU time per step only")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or ["1,16,128,128", "8,16,2048,128"])]
    if args.peers:
        for shape in shapes:
            peers(args.peers.split(","), shape, args.steps)
        return
    install()
    main_thread = threading.get_ident()
    for shape in shapes:
        run("default autograd threads", shape, args.steps, main_thread)
        with torch.autograd.set_multithreading_enabled(False):
            run("backward on the calling thread", shape, args.steps, main_thread)


if __name__ == "__main__":
    main()
