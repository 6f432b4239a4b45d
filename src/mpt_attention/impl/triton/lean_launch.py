"""Kernel launches with less of Triton's per-call host work than ``fn[grid](...)``.

A training step of the Hopper path launches three Triton/Gluon kernels, and ``JITFunction.run`` took
~115 us of host time per launch on the H200 machine's CPU inside a step (``benchmarks/host_overhead.py
--timers``; 64 us in a tight loop): the binder that specialises the arguments (15 us), the cache key, a
check that the kernel's globals are unchanged, launch metadata for profiler hooks, and the compiled
kernel's own ``run`` (16 us). Where the step's GPU work is short (B8 S2048: 1.15 ms) the host then sets
the pace (benchmarks/NOTES.md session 23).

``launch_kernel`` picks a compiled kernel by exactly the specialisation Triton computes. The first launch of
a specialisation goes through ``fn[grid](...)`` (compiling, checking, launching); later ones call the compiled
kernel directly. Two caches lead there:

* by the arguments themselves (``argument_key``): a key that only equal specialisations share, because it
  keeps what the binder reads of an argument, or more (an int's class: 1, divisible by 16, its range; a float's
  value; a tensor's dtype and address modulo 16; a descriptor's dtype, block shape, layout and options). Found
  there, a launch skips the binder, most of whose time is spent on the descriptors' layout reprs
  (benchmarks/NOTES.md session 32);
* by Triton's own specialisation (the binder run), for arguments the first cache does not key: an int subclass,
  a tensor subclass, anything but ints, floats, bools, None, tensors and Gluon descriptors.

It falls back to ``fn[grid](...)`` whenever a profiler hook is active, the kernel has pre-run hooks, in the
interpreter, or if this Triton's internals differ from the two versions it was written against (3.6, 3.7), so
its only effect is less host time. tests/test_lean_launch.py checks on the CPU that equal argument keys mean equal
specialisations by Triton's own binder for each of our kernels.
"""

from __future__ import annotations

import dataclasses
import os
from operator import attrgetter

import torch

from mpt_attention.impl.device import release

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_KERNELS: dict = {}  # (kernel function, device, specialisation, options) -> compiled kernel
# argument_key -> (compiled kernel, the kernel function and the descriptors' layouts, kept alive because the key
# holds their ids); cleared when it reaches _MAX_BY_ARGUMENTS (floats and constexprs are keyed by value)
_BY_ARGUMENTS: dict = {}
_MAX_BY_ARGUMENTS = 4096
# id(kernel function) -> (kernel function, _parameters(kernel function))
_PARAMETERS: dict = {}
try:
    from triton import knobs
    from triton.runtime import driver
    _AVAILABLE = not _INTERPRET and hasattr(knobs, "runtime") and hasattr(knobs, "compilation")
except ImportError:  # a Triton without knobs: every launch takes Triton's own path
    _AVAILABLE = False
try:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _Descriptor

    # what the binder may read of a descriptor besides its base's dtype, block shape and layout: every field but
    # the runtime ones (base address, shape, strides), so options a later Triton adds (3.7: round_f32_to_tf32)
    # are keyed too
    _DESCRIPTOR_OPTIONS = tuple(f.name for f in dataclasses.fields(_Descriptor)
                                if f.name not in ("base", "shape", "strides", "block_shape", "layout"))
    _descriptor_options = attrgetter(*_DESCRIPTOR_OPTIONS) if _DESCRIPTOR_OPTIONS else (lambda desc: None)
except Exception:  # no Gluon: no descriptor is keyed (they cannot occur)
    _Descriptor = None
_TENSOR = torch.Tensor


def _hooks_active() -> bool:
    """Whether a launch hook (a profiler's) is installed: those get Triton's own path, metadata and all."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def ptxas_options(capability_major: int) -> str | None:
    """The ptxas options our launches add on a GPU of compute capability ``capability_major``.x (None: none):
    ``--regAllocOptLevel=4`` on Hopper where the installed Triton assembles sm_90 kernels with a ptxas of CUDA 13 or
    later (Triton 3.9's ``ptxas-blackwell``, or one named by TRITON_PTXAS_PATH). Triton (3.7 on) passes every ptxas
    ``--regAllocOptLevel=2``, naming a ptxas 13 bug. ptxas 12.8 and 12.9 assemble our kernels the same with or without
    it; ptxas 13.x with it spills the Hopper forward's registers (D64: 408 bytes stored and 640 loaded, 11-13 local
    loads per key loop, against 72 bytes without it; D128: 112 bytes against none), and under Triton 3.9 the forward
    took 5-16% longer than under 3.6 (benchmarks/NOTES.md session 55). Level 4 is ptxas 13's own default (the same
    cubin as without the option); ptxas takes an option's last value, and PTXAS_OPTIONS (Triton's
    ``knobs.nvidia.ptxas_options``) goes after ours."""
    if capability_major != 9:
        return None
    return "--regAllocOptLevel=4" if sm90_ptxas_is_cuda13() else None


def sm90_ptxas_is_cuda13() -> bool:
    """Whether the installed Triton assembles sm_90 kernels with a ptxas of CUDA 13 or later (Triton 3.9's
    ``ptxas-blackwell``): the register-allocation option above and ``hopper.forward_tail`` both turn on it."""
    return sm90_ptxas_release() >= (13,)


def sm90_ptxas_release() -> tuple[int, ...]:
    """``(major, minor)`` of the ptxas the installed Triton assembles sm_90 kernels with; ``()`` where that is not
    known (another Triton layout, no ptxas: then Triton's own choices stand)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return release(get_ptxas(90).version)
    except Exception:
        return ()


def with_user_ptxas_options(ours: str) -> str:
    """``ours`` followed by the options in the PTXAS_OPTIONS environment variable (Triton's name for it; ptxas takes
    an option's last value, so the user's win)."""
    return f"{ours} {knobs.nvidia.ptxas_options or ''}".rstrip()


_DEVICE_PTXAS_OPTIONS: dict = {}  # device index -> ptxas_options of its compute capability


def launch_kernel(fn, grid, *args, **kwargs):
    """``fn[grid](*args, **kwargs)``: the same kernel, arguments and stream, with less host work. Returns the
    compiled kernel it launched, or None where it left the launch to Triton without one (hooks, the interpreter,
    other internals). Floating-point fusion (``a * b + c`` as one FMA) is asked for unless the caller says otherwise:
    the kernels were written and measured with it, Triton's default up to 3.9, which 3.10 turns off. So are the
    ``ptxas_options`` of the device's compute capability, unless the caller passes ``ptx_options``."""
    if "enable_fp_fusion" not in kwargs:
        kwargs["enable_fp_fusion"] = True
    if not _AVAILABLE:
        fn[grid](*args, **kwargs)
        return None
    device = driver.active.get_current_device()
    if "ptx_options" not in kwargs:
        ours = _DEVICE_PTXAS_OPTIONS.get(device, False)
        if ours is False:
            ours = _DEVICE_PTXAS_OPTIONS[device] = ptxas_options(driver.active.get_device_capability(device)[0])
        if ours is not None:
            kwargs["ptx_options"] = with_user_ptxas_options(ours)
    if fn.pre_run_hooks or _hooks_active():
        fn[grid](*args, **kwargs)
        return None
    by_arguments = argument_key(fn, device, args, kwargs)
    if by_arguments is not None:
        try:
            entry = _BY_ARGUMENTS.get(by_arguments)
        except TypeError:  # an unhashable keyword argument
            entry = by_arguments = None
        if entry is not None:
            run_compiled(entry[0], grid, device, ordered_arguments(fn, args, kwargs))
            return entry[0]
    caches = fn.device_caches[device]
    if not (isinstance(caches, tuple) and len(caches) == 5):
        fn[grid](*args, **kwargs)
        return None
    bound, key = bind(fn, device, caches[4], args, kwargs)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **kwargs)
        if hasattr(kernel, "result"):  # compiled asynchronously
            kernel = kernel.result()
        if hasattr(kernel, "run") and hasattr(kernel, "packed_metadata"):
            _KERNELS[key] = kernel
            _remember(by_arguments, fn, kernel, args)
            return kernel
        return None
    _remember(by_arguments, fn, kernel, args)
    run_compiled(kernel, grid, device, bound.values())
    return kernel


class PlannedLaunch:
    """Launches of ``fn`` on ``grid`` with the constexpr and option keywords ``kwargs`` whose other arguments are
    fixed but for tensors and Gluon descriptors' bases, with the tensors' dtypes and 16-byte alignment and the
    descriptors' block shapes, layouts and options fixed too: what a launch plan holds (``hopper.forward_plan``).
    The compiled kernel ``launch_kernel`` finds on the first call serves the later ones directly, without an
    argument key per call; while Triton's global options, hooks or the kernel's pre-run hooks differ from the first
    call's, each call is ``launch_kernel``'s."""

    __slots__ = ("fn", "grid", "kwargs", "kernel", "device", "tail", "options")

    def __init__(self, fn, grid, kwargs: dict):
        self.fn, self.grid, self.kwargs = fn, grid, kwargs
        self.kernel = self.device = self.tail = self.options = None

    def __call__(self, *args) -> None:
        kernel, fn = self.kernel, self.fn
        if kernel is not None and _AVAILABLE and not fn.pre_run_hooks and not _hooks_active() and self.options == (
                knobs.runtime.debug, fn.debug, knobs.compilation.instrumentation_mode):
            if self.tail is None:  # made by the second call: a plan made per call (packed sequences) never needs it
                self.tail = ordered_arguments(fn, args, self.kwargs)[len(args):]
            run_compiled(kernel, self.grid, self.device, (*args, *self.tail))
            return
        self.kernel = kernel = launch_kernel(fn, self.grid, *args, **self.kwargs)
        if kernel is not None:
            self.device = driver.active.get_current_device()
            self.options = (knobs.runtime.debug, fn.debug, knobs.compilation.instrumentation_mode)


def argument_key(fn, device, args, kwargs: dict):
    """A key of ``fn``'s launch on ``device`` with these arguments that only launches Triton specialises alike share,
    or None where an argument is of a type it does not key. It holds ``fn`` by id (its hash is its source hash,
    behind a lock), Triton's global options and, per argument, what the binder reads (Triton 3.6 and 3.7): an int's
    class (equal to 1, divisible by 16, and its range: 32 or 64 bits signed, 64 unsigned; as a small negative int),
    so that sequence lengths that vary keep hitting; a float by value, bools and None tagged, tensors by dtype and
    address modulo 16 (the binder: its dtype, and 16-byte alignment), Gluon descriptors by their base's dtype,
    block shape, layout (by id: ``_remember`` keeps it alive) and options; constexpr parameters passed by position
    by value, as keyword arguments (constexprs, num_warps) are, with their types. Written for host time: one
    comprehension, no call per argument."""
    constexprs = _parameters(fn)[1]
    try:
        return (id(fn), device, knobs.runtime.debug, fn.debug, knobs.compilation.instrumentation_mode,
                tuple(kwargs.items()), tuple(map(type, kwargs.values())),
                tuple([args[i] for i in constexprs if i < len(args)]),
                *[~((arg == 1) | (arg & 15 == 0) << 1  # (literal bounds: 32, 64 bits signed, 64 unsigned)
                    | (0 if -0x80000000 <= arg <= 0x7FFFFFFF else 1 if -0x8000000000000000 <= arg <= 0x7FFFFFFFFFFFFFFF
                       else 2 if 0 <= arg <= 0xFFFFFFFFFFFFFFFF else 3) << 2)
                  if (kind := type(arg)) is int
                  else None if arg is None
                  else (arg.dtype, arg.data_ptr() & 15) if kind is _TENSOR
                  else (kind, arg.base.dtype, tuple(arg.block_shape), id(arg.layout), _descriptor_options(arg))
                  if kind is _Descriptor
                  else (kind, arg) if kind is float or kind is bool
                  else _unkeyed(arg) for arg in args])
    except _Unkeyed:
        return None


class _Unkeyed(Exception):
    """An argument of a type ``argument_key`` does not key."""


def _unkeyed(arg):
    raise _Unkeyed(type(arg).__name__)


def _remember(by_arguments, fn, kernel, args) -> None:
    """Files ``kernel`` under its argument key, with the kernel function and the descriptors' layouts whose ids
    the key holds."""
    if by_arguments is None:
        return
    if len(_BY_ARGUMENTS) >= _MAX_BY_ARGUMENTS:
        _BY_ARGUMENTS.clear()
    _BY_ARGUMENTS[by_arguments] = (kernel, fn, tuple(arg.layout for arg in args if type(arg) is _Descriptor))


def _parameters(fn):
    """``(((name, default), ...) of fn's parameters in the binder's order, positions of its constexpr parameters)``."""
    known = _PARAMETERS.get(id(fn))
    if known is None or known[0] is not fn:
        params = tuple((p.name, p.default) for p in fn.signature.parameters.values())
        constexprs = tuple(i for i, p in enumerate(fn.params) if p.is_constexpr)
        known = _PARAMETERS[id(fn)] = (fn, (params, constexprs))
    return known[1]


def ordered_arguments(fn, args, kwargs: dict) -> tuple:
    """Every parameter's value in the signature's order, as the binder's bound arguments hold them: the positional
    ones, then the keyword ones or their defaults (keywords that are not parameters are options, not passed)."""
    params = _parameters(fn)[0]
    return (*args, *[kwargs.get(name, default) for name, default in params[len(args):]])


def bind(fn, device, binder, args, kwargs: dict):
    """Triton's ``binder`` (of ``fn`` on ``device``) on the arguments: ``(bound arguments, cache key)``. Adds to
    ``kwargs`` the options ``JITFunction.run`` adds before binding, so the specialisation and options are its own."""
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    return bound, (fn, device, tuple(specialization), tuple(options.items()))


def run_compiled(kernel, grid, device, values) -> None:
    """Launch a compiled kernel on the device's current stream with every parameter's value (``bind``'s bound
    arguments' values, or ``ordered_arguments``). Copy-engine descriptors are encoded once per address, shape and
    strides (``_EncodedLaunch``) where Triton's launcher is 3.6's or 3.7's; otherwise the compiled kernel's ``run``
    encodes each one per call."""
    entry = _ENCODED.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        entry = _ENCODED[id(kernel)] = (kernel, _EncodedLaunch.of(kernel))
    gx, gy, gz = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
    stream = driver.active.get_current_stream(device)
    if entry[1] is not None:
        entry[1](gx, gy, gz, stream, values)
        return
    kernel.run(gx, gy, gz, stream, kernel.function, kernel.packed_metadata, None, None, None, *values)


_ENCODED: dict = {}  # id(compiled kernel) -> (the kernel, its _EncodedLaunch or None where Triton's own run serves)
_MAX_ENCODED = 256  # encoded descriptors kept per kernel (cleared when reached)


class _EncodedLaunch:
    """A compiled kernel's launch through Triton's native launcher, with its copy-engine descriptors encoded once
    per (position, base address, shape, strides, padding, tf32 rounding) instead of per call: Triton's wrapper
    re-encodes every descriptor at every launch (``make_tensordesc_arg``). On the H200 machine's CPU this took a
    training step's two descriptor launches from 19.1 and 34.3 us of host to 16.5 and 23.6 under Triton 3.6 (NOTES.md
    session 51). The encoding is a function of those fields and of the kernel's own descriptor metadata alone, so a
    cached one is the one Triton would make. Built only where the launcher has the layout of Triton 3.6 (the
    wrapper's closure, the base arguments' count, no scratch buffers) or of 3.7 (the same closure, argument
    annotations and a kernel signature, the arguments as one list); other versions keep ``kernel.run``."""

    __slots__ = ("kernel", "launcher", "metas", "head", "tail", "cache", "_encode")

    @classmethod
    def of(cls, kernel):
        import sys

        run = kernel.run
        wrapper = getattr(run, "launch", None)
        names = getattr(getattr(wrapper, "__code__", None), "co_freevars", ())
        module = sys.modules.get(type(run).__module__)
        if (type(run).__name__ != "CudaLauncher"
                or not {"launcher", "tensordesc_indices", "tensordesc_meta"} <= set(names)
                or not hasattr(module, "make_tensordesc_arg") or getattr(run, "global_scratch_size", 1)
                or getattr(run, "profile_scratch_size", 1)):
            return None
        annotated = hasattr(run, "arg_annotations") and hasattr(run, "kernel_signature")  # Triton 3.7's layout
        if not annotated and getattr(module, "_BASE_ARGS_FORMAT_LEN", None) != 13:  # nor 3.6's
            return None
        cells = dict(zip(names, (cell.cell_contents for cell in wrapper.__closure__)))
        indices, metas = sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]
        if not metas or len(metas) != len(indices) or any(meta is None for meta in metas):
            return None
        self = cls()
        self.kernel, self.launcher = kernel, cells["launcher"]
        self.metas = dict(zip(indices, metas))
        # what the launcher takes between the kernel's function and its arguments (``CudaLauncher.__call__``): 3.6
        # the scratch buffers, packed metadata, launch metadata and its two hooks, then the arguments; 3.7 the packed
        # metadata, launch metadata, hooks and scratch buffers, the arguments' annotations and signature, then the
        # arguments as one list (tests/test_lean_launch.py checks the installed Triton's order)
        coop, pdl, packed = run.launch_cooperative_grid, run.launch_pdl, kernel.packed_metadata
        if annotated:
            self.head = (coop, pdl, packed, None, None, None, None, None)
            self.tail = (run.arg_annotations, run.kernel_signature)
        else:
            self.head = (coop, pdl, None, None, packed, None, None, None)
            self.tail = None
        self.cache = {}
        self._encode = module.make_tensordesc_arg
        return self

    def __call__(self, gx, gy, gz, stream, values) -> None:
        if self.tail is None:
            self.launcher(gx, gy, gz, stream, self.kernel.function, *self.head, *self.arguments(values))
        else:
            self.launcher(gx, gy, gz, stream, self.kernel.function, *self.head, *self.tail, self.arguments(values))

    def arguments(self, values) -> list:
        """The kernel's arguments as the native launcher takes them: each descriptor as its encoding and the
        shape and strides after it (Triton's ``make_tensordesc_arg``), cached."""
        flat, metas, cache = [], self.metas, self.cache
        for i, arg in enumerate(values):
            if i in metas:
                key = (i, arg.base.data_ptr(), tuple(arg.shape), tuple(arg.strides), arg.padding,
                       getattr(arg, "round_f32_to_tf32", False))  # (3.7's option, which its encoding reads)
                parts = cache.get(key)
                if parts is None:
                    if len(cache) >= _MAX_ENCODED:
                        cache.clear()
                    parts = cache[key] = self._encode(arg, metas[i])
                flat.extend(parts)
            else:
                flat.append(arg)
        return flat


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: that one is a ``ConstexprFunction``, a few microseconds per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (n >= 0), as ``cdiv``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
