"""Kernel launches with less of Triton's per-call host work than ``fn[grid](...)``.

A training step of the Hopper path launches three Triton/Gluon kernels, and ``JITFunction.run`` took
~115 us of host time per launch on the H200 machine's CPU inside a step (``benchmarks/host_overhead.py
--timers``; 64 us in a tight loop): the binder that specialises the arguments (15 us), the cache key, a
check that the kernel's globals are unchanged, launch metadata for profiler hooks, and the compiled
kernel's own ``run`` (16 us). Where the step's GPU work is short (B8 S2048: 1.15 ms) the host then sets
the pace (benchmarks/NOTES.md session 23).

``launch_kernel`` keeps the binder, so a kernel is chosen by exactly the specialisation Triton computes,
and caches the compiled kernel under it: the first launch of a specialisation goes through
``fn[grid](...)`` (compiling, checking, launching), later ones call the compiled kernel directly. It
falls back to ``fn[grid](...)`` whenever a profiler hook is active, the kernel has pre-run hooks, in the
interpreter, or if this Triton's internals differ from the two versions it was written against (3.6,
3.7), so its only effect is less host time.
"""

from __future__ import annotations

import os

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_KERNELS: dict = {}  # (kernel function, device, specialisation, options) -> compiled kernel
try:
    from triton import knobs
    from triton.runtime import driver
    _AVAILABLE = not _INTERPRET and hasattr(knobs, "runtime") and hasattr(knobs, "compilation")
except ImportError:  # a Triton without knobs: every launch takes Triton's own path
    _AVAILABLE = False


def _hooks_active() -> bool:
    """Whether a launch hook (a profiler's) is installed: those get Triton's own path, metadata and all."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def launch_kernel(fn, grid, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``: the same kernel, arguments and stream, with less host work."""
    if not _AVAILABLE or fn.pre_run_hooks or _hooks_active():
        fn[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    caches = fn.device_caches[device]
    if not (isinstance(caches, tuple) and len(caches) == 5):
        fn[grid](*args, **kwargs)
        return
    bound, key = bind(fn, device, caches[4], args, kwargs)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **kwargs)
        if hasattr(kernel, "result"):  # compiled asynchronously
            kernel = kernel.result()
        if hasattr(kernel, "run") and hasattr(kernel, "packed_metadata"):
            _KERNELS[key] = kernel
        return
    run_compiled(kernel, grid, device, bound)


def bind(fn, device, binder, args, kwargs: dict):
    """Triton's ``binder`` (of ``fn`` on ``device``) on the arguments: ``(bound arguments, cache key)``. Adds to
    ``kwargs`` the options ``JITFunction.run`` adds before binding, so the specialisation and options are its own."""
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    return bound, (fn, device, tuple(specialization), tuple(options.items()))


def run_compiled(kernel, grid, device, bound) -> None:
    """Launch a compiled kernel on the device's current stream with ``bind``'s bound arguments."""
    kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
               driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
               *bound.values())


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: that one is a ``ConstexprFunction``, a few microseconds per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (n >= 0), as ``cdiv``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
