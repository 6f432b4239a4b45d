"""Where a kernel launch's host time goes inside a training step, against the same launches in a loop of
forwards (tiny shape, Hopper path, causal ALiBi; benchmarks/NOTES.md session 31):

    python benchmarks/launch_in_step.py

``--timers`` (session 30) read 67-173 us per launch inside a step on the GPU machine's CPU, against 34.5 us for the
forward's launch in a tight loop. This times each launch's parts as ``lean_launch.launch_kernel`` runs them: Triton's
binder (the specialisation) and the compiled kernel's ``run`` (the launcher), per kernel, for forwards
alone, for forward+backward steps (the backward on the device's autograd thread, torch's default) and for steps
with the backward on the calling thread. ``--profile``: instead, cProfile of ``launch_backward.backward`` on the
thread it runs on (the device's autograd thread), 300 steps; ``--profile-step``: cProfile of whole steps, the
backward on the calling thread.
"""

import cProfile
import pstats
import sys
import time

import torch

import mpt_attention as M
from mpt_attention.impl.triton import launch, launch_backward, lean_launch

TOTALS: dict = {}
COUNTS: dict = {}
CURRENT = [""]  # the kernel whose launch is running


def _add(name, part, seconds):
    TOTALS[(name, part)] = TOTALS.get((name, part), 0.0) + seconds


def _timed(label, real):
    """``real`` with its time added to ``TOTALS`` under (the kernel being launched, ``label``)."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            _add(CURRENT[0], label, time.perf_counter() - start)
    return wrapper


def install_timers():
    """Clocks around the lean launcher's parts (``argument_key``: its key of the arguments; ``bind``: Triton's binder,
    where that key is new; ``run_compiled``: the compiled kernel's ``run``) and around each whole launch; counts
    launches per kernel."""
    real_launch = lean_launch.launch_kernel

    def counted_launch(fn, grid, *args, **kwargs):
        CURRENT[0] = fn.__name__
        COUNTS[fn.__name__] = COUNTS.get(fn.__name__, 0) + 1
        return real_launch(fn, grid, *args, **kwargs)

    launch.launch_kernel = launch_backward.launch_kernel = _timed("total", counted_launch)  # the general kernels'
    real_call = lean_launch.PlannedLaunch.__call__  # the Hopper route's (launch plans)

    def counted_call(self, *args):
        CURRENT[0] = self.fn.__name__
        COUNTS[self.fn.__name__] = COUNTS.get(self.fn.__name__, 0) + 1
        return real_call(self, *args)

    lean_launch.PlannedLaunch.__call__ = _timed("total", counted_call)
    lean_launch.argument_key = _timed("argument key", lean_launch.argument_key)
    lean_launch.bind = _timed("binder", lean_launch.bind)
    lean_launch.run_compiled = _timed("kernel.run", lean_launch.run_compiled)


def report(label, calls, seconds):
    print(f"[{label}] {seconds / calls * 1e6:7.1f} us per call")
    for name, count in COUNTS.items():
        parts = ", ".join(f"{part} {TOTALS.get((name, part), 0.0) / count * 1e6:5.1f}"
                          for part in ("argument key", "binder", "kernel.run", "total"))
        print(f"    {name:32s} x{count / calls:.0f} per call: {parts}")
    TOTALS.clear()
    COUNTS.clear()


def run(label, fn, calls=400):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    TOTALS.clear()
    COUNTS.clear()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    report(label, calls, time.perf_counter() - start)


def profile_backward(step):
    """cProfile enabled inside ``launch_backward.backward`` itself: a profiler only sees the thread that enables it."""
    prof = cProfile.Profile()
    real = launch_backward.backward
    on = []

    def profiled(*args, **kwargs):
        if not on:
            return real(*args, **kwargs)
        prof.enable()
        try:
            return real(*args, **kwargs)
        finally:
            prof.disable()

    launch_backward.backward = profiled
    run("warm-up steps", step, calls=50)  # compiles outside the profile
    on.append(True)
    run("profiled steps", step, calls=300)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)


def profile_step(step):
    """cProfile of whole steps with the backward on the calling thread (so one profiler sees all of it)."""
    torch.autograd.set_multithreading_enabled(False)
    run("warm-up steps, backward on the calling thread", step, calls=50)
    prof = cProfile.Profile()
    prof.enable()
    run("profiled steps, backward on the calling thread", step, calls=300)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)


def main():
    install_timers()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    slopes = M.gen_slopes(16, return_1d=True, device="cuda")
    dout = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)

    def step():
        q.grad = k.grad = v.grad = None
        M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes).backward(dout)

    if "--profile" in sys.argv:
        profile_backward(step)
        return
    if "--profile-step" in sys.argv:
        profile_step(step)
        return
    for rnd in range(2):
        run(f"round {rnd} forwards", forward)
        run(f"round {rnd} steps", step)
        torch.autograd.set_multithreading_enabled(False)
        run(f"round {rnd} steps, backward on the calling thread", step)
        torch.autograd.set_multithreading_enabled(True)


if __name__ == "__main__":
    main()
