"""The lean launcher (impl/triton/lean_launch.py), checked without a GPU: it picks the kernel Triton compiled for the
same specialisation, keys arguments as Triton's binder classes them (also over every launch a training step makes),
encodes copy-engine descriptors once, passes the ptxas options Hopper needs, and leaves to Triton's own launch
what it does not model. Against real Triton kernels it runs in tests/test_gpu.py."""

import inspect
import types

import pytest
import torch

pytest.importorskip("triton")
from mpt_attention.impl.triton import hopper, hopper_views, launch, launch_backward, lean_launch  # noqa: E402

if hopper._IMPORT_ERROR is None:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


class _FakeKernel:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeJITFunction:
    """What lean_launch uses of a JITFunction: ``device_caches[device][4]`` the binder, ``fn[grid]``,
    ``pre_run_hooks``, ``debug``, ``signature``, ``params``. Its binder specialises ints on divisibility by 16,
    bools apart and tensors on 16-byte alignment, as Triton's does."""

    pre_run_hooks, debug = [], False
    signature = inspect.signature(lambda x, n, BLOCK=32: None)
    params = [types.SimpleNamespace(is_constexpr=False)] * 2 + [types.SimpleNamespace(is_constexpr=True)]

    def __init__(self):
        self.kernels, self.triton_launches, self.binds = {}, [], 0
        self.device_caches = {0: (None, None, None, None, self.binder)}

    def binder(self, x, n, BLOCK=32, **options):
        self.binds += 1
        bound = dict(x=x, n=n, BLOCK=BLOCK)
        aligned = "D" if getattr(x, "data_ptr", lambda: 0)() % 16 == 0 else ""
        spec_n = ("u1", None) if isinstance(n, bool) else ("i32", "D" if n % 16 == 0 else "")
        return bound, [("*fp32", aligned), spec_n, ("constexpr", BLOCK)], options

    def __getitem__(self, grid):
        def triton_launch(*args, **kwargs):
            self.triton_launches.append((grid, args, kwargs))
            _, spec, options = self.binder(*args, **kwargs)
            return self.kernels.setdefault((tuple(spec), str(options)), _FakeKernel())
        return triton_launch


@pytest.fixture
def lean(monkeypatch):
    """lean_launch as on a GPU with no hooks: a fake driver (device 0, stream 7) and knobs."""
    hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]),
                                  launch_exit_hook=types.SimpleNamespace(calls=[]), debug=False)
    knobs = types.SimpleNamespace(runtime=hooks, compilation=types.SimpleNamespace(instrumentation_mode=""),
                                  nvidia=types.SimpleNamespace(ptxas_options=None))
    driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_device=lambda: 0,
                                                                get_current_stream=lambda device: 7,
                                                                get_device_capability=lambda device: (8, 0)))
    monkeypatch.setattr(lean_launch, "_AVAILABLE", True)
    monkeypatch.setattr(lean_launch, "knobs", knobs, raising=False)
    monkeypatch.setattr(lean_launch, "driver", driver, raising=False)
    monkeypatch.setattr(lean_launch, "_KERNELS", {})
    monkeypatch.setattr(lean_launch, "_BY_ARGUMENTS", {})
    monkeypatch.setattr(lean_launch, "_DEVICE_PTXAS_OPTIONS", {})
    return knobs


def test_the_lean_launcher_runs_the_kernel_triton_compiled_for_the_same_specialisation(lean):
    fn, x = _FakeJITFunction(), object()
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=64, num_warps=4)  # first: Triton's own launch
    assert len(fn.triton_launches) == 1
    lean_launch.launch_kernel(fn, (5, 2), x, 48, BLOCK=64, num_warps=4)  # same specialisation: the cached kernel
    assert len(fn.triton_launches) == 1
    (kernel,) = fn.kernels.values()
    assert kernel.runs == [(5, 2, 1, 7, "function", "metadata", None, None, None, x, 48, 64)]
    lean_launch.launch_kernel(fn, (3,), x, 40, BLOCK=64, num_warps=4)  # 40 is not a multiple of 16: a new one
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=128, num_warps=4)  # another constexpr
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=64, num_warps=8)  # other options
    assert len(fn.triton_launches) == 4 and len(kernel.runs) == 1
    lean.runtime.debug = True  # Triton's debug mode compiles other kernels: its own launch first, again
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=64, num_warps=4)
    assert len(fn.triton_launches) == 5 and fn.triton_launches[-1][2]["debug"] is True


def test_the_lean_launcher_skips_the_binder_for_arguments_keyed_before(lean):
    """Arguments whose ``argument_key`` was seen launch the same compiled kernel without Triton's binder, with every
    parameter's value (a keyword's default too); another key goes through the binder, whose specialisation picks
    a compiled kernel or Triton's own launch."""
    fn, x = _FakeJITFunction(), torch.zeros(64)
    lean_launch.launch_kernel(fn, (3,), x, 32, num_warps=4)  # Triton's own launch, filed under both keys
    assert len(fn.triton_launches) == 1
    binds = fn.binds
    lean_launch.launch_kernel(fn, (2,), torch.ones(7), 32, num_warps=4)  # another tensor, same dtype and alignment
    (kernel,) = fn.kernels.values()
    assert fn.binds == binds and kernel.runs[-1][9:] == (kernel.runs[-1][9], 32, 32)
    lean_launch.launch_kernel(fn, (2,), x, 48, num_warps=4)  # an int of the same class (a multiple of 16)
    assert fn.binds == binds and len(kernel.runs) == 2 and kernel.runs[-1][10] == 48
    lean_launch.launch_kernel(fn, (2,), x, 40, num_warps=4)  # another class: the binder, another specialisation
    assert fn.binds > binds and len(fn.triton_launches) == 2
    binds = fn.binds
    lean_launch.launch_kernel(fn, (2,), x, 56, num_warps=4)  # 40's class
    assert fn.binds == binds and len(fn.triton_launches) == 2
    lean_launch.launch_kernel(fn, (2,), x[1:], 48, num_warps=4)  # not 16-byte aligned: another specialisation
    lean_launch.launch_kernel(fn, (2,), x, True, num_warps=4)  # a bool is not the int 1
    lean_launch.launch_kernel(fn, (2,), x, 32, BLOCK=32, num_warps=4)  # the default passed: another key, same kernel
    assert len(fn.triton_launches) == 4 and len(kernel.runs) == 3
    lean_launch.launch_kernel(fn, (2,), x, 32, 64, num_warps=4)  # a constexpr by position: keyed by its value
    lean_launch.launch_kernel(fn, (2,), x, 32, 128, num_warps=4)
    assert len(fn.triton_launches) == 6


def test_argument_keys_class_ints_as_tritons_binder_does():
    """An int's part of the key against Triton's own specialisation of it (``native_specialize_impl``, Triton 3.6
    and 3.7), over values around every boundary it draws: equal parts, equal specialisations; and the reverse."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = _FakeJITFunction()
    values = [0, 1, 2, -1, 8, 15, 16, 17, 31, 32, 48, 100, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31,
              -2**31 - 1, -2**31 - 16, 2**32, 2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 16, 2**64 - 1]
    classes = {}
    for v in values:
        part = lean_launch.argument_key(fn, 0, (v,), {})[-1]
        classes.setdefault(part, set()).add(native_specialize_impl(BaseBackend, v, False, True, True))
    assert all(len(specs) == 1 for specs in classes.values()), classes
    assert len({next(iter(specs)) for specs in classes.values()}) == len(classes) >= 7


@pytest.mark.parametrize("what", ["enter-hook", "exit-hook", "pre-run-hook", "not-available", "other-caches"])
def test_the_lean_launcher_leaves_to_triton_what_it_does_not_model(lean, monkeypatch, what):
    """A profiler's launch hooks (they need launch metadata), a kernel's pre-run hooks, the interpreter, and a
    Triton whose per-device caches are not the 5-tuple this was written against: every launch is Triton's."""
    fn, x = _FakeJITFunction(), object()
    lean_launch.launch_kernel(fn, (1,), x, 16, BLOCK=64)
    if what.endswith("-hook") and what != "pre-run-hook":
        getattr(lean.runtime, f"launch_{what.split('-')[0]}_hook").calls.append(print)
    elif what == "pre-run-hook":
        fn.pre_run_hooks = [print]
    elif what == "not-available":
        monkeypatch.setattr(lean_launch, "_AVAILABLE", False)
    else:
        fn.device_caches = {0: (None, fn.binder)}
    lean_launch.launch_kernel(fn, (1,), x, 16, BLOCK=64)
    assert len(fn.triton_launches) == 2
    assert not next(iter(fn.kernels.values())).runs


def test_a_planned_launch_runs_its_first_launchs_kernel_without_keys_or_binder(lean, monkeypatch):
    """``PlannedLaunch``: the first call is ``launch_kernel``'s (Triton's own launch here); later calls run the kernel
    it found directly, on the plan's grid, with the keyword parameters' values appended, computing no argument key
    and binding nothing; Triton's debug mode switched on sends calls back to ``launch_kernel``."""
    fn, x = _FakeJITFunction(), torch.zeros(64)
    keys = []
    real_key = lean_launch.argument_key
    monkeypatch.setattr(lean_launch, "argument_key", lambda *a: keys.append(1) or real_key(*a))
    planned = lean_launch.PlannedLaunch(fn, (3, 2), dict(BLOCK=64, num_warps=4))
    planned(x, 32)
    assert len(fn.triton_launches) == 1 and len(keys) == 1
    binds = fn.binds
    other = torch.ones(7)  # another tensor of the same dtype and alignment: what a plan's later calls pass
    planned(other, 32)
    planned(x, 32)
    (kernel,) = fn.kernels.values()
    assert kernel.runs == [(3, 2, 1, 7, "function", "metadata", None, None, None, t, 32, 64) for t in (other, x)]
    assert fn.binds == binds and len(keys) == 1 and len(fn.triton_launches) == 1
    lean.runtime.debug = True
    planned(x, 32)
    assert len(fn.triton_launches) == 2 and len(kernel.runs) == 2


@pytest.mark.parametrize("what", ["enter-hook", "pre-run-hook", "not-available"])
def test_a_planned_launch_leaves_to_triton_what_the_lean_launcher_does(lean, monkeypatch, what):
    """Hooks and the interpreter: a plan's every call goes to Triton's own launch, as ``launch_kernel``'s do."""
    fn, x = _FakeJITFunction(), object()
    planned = lean_launch.PlannedLaunch(fn, (1,), dict(BLOCK=64))
    planned(x, 16)
    if what == "enter-hook":
        lean.runtime.launch_enter_hook.calls.append(print)
    elif what == "pre-run-hook":
        fn.pre_run_hooks = [print]
    else:
        monkeypatch.setattr(lean_launch, "_AVAILABLE", False)
    planned(x, 16)
    assert len(fn.triton_launches) == 2
    assert not next(iter(fn.kernels.values())).runs


def test_the_host_grid_arithmetic_is_tritons():
    """lean_launch's plain-Python ``cdiv`` and ``next_power_of_2`` (Triton's are ``ConstexprFunction``s, slower to
    call from the host) give Triton's values."""
    import triton

    for n in [*range(0, 300), 1023, 1024, 1025, 65535, 2**31 - 1, 2**31, 2**40 + 3]:
        assert lean_launch.next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (1, 3, 16, 64, 128, 1024):
            assert lean_launch.cdiv(n, block) == triton.cdiv(n, block)


def _tritons_binder(fn):
    """``fn`` as a JITFunction and the binder Triton builds for it on an sm_90 target (no GPU needed): the
    specialisation a launch compiles for. Skips where this Triton's internals differ."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as exc:
        pytest.skip(f"Triton's binder is not where lean_launch expects it: {exc}")
    if not hasattr(fn, "params"):  # the interpreter's wrapper of a Triton kernel
        fn = JITFunction(fn.fn)
    return fn, create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))


def _like(t: torch.Tensor, salt: int, shift: int = 0) -> torch.Tensor:
    """Another tensor of ``t``'s dtype with its address modulo 16 moved by ``shift`` elements, and another size,
    shape and strides."""
    elem = t.element_size()
    base = torch.zeros(t.numel() + 64 + salt * 16, dtype=t.dtype)
    start = next(i for i in range(16) if (base.data_ptr() + i * elem) % 16 == (t.data_ptr() + shift * elem) % 16)
    return base[start:start + t.numel() + salt].reshape(-1, 1)


def _variant(arg, salt: int, what: str):
    """What the argument key leaves out changed (tensors and descriptors' bases, shapes and strides), and with
    ``what`` one thing it keeps: tensors' alignment ("misaligned"), ints' classes ("ints": plus 1; "ints-x16":
    multiples of 16; "ints-1": all 1; "ints-i64": past 32 bits) or descriptors' block shapes ("blocks")."""
    if type(arg) is torch.Tensor:
        return _like(arg, salt, what == "misaligned")
    if type(arg) is int and what.startswith("ints"):
        return {"ints": arg + 1, "ints-x16": 16 * arg + 16, "ints-1": 1, "ints-i64": arg + 2**32}[what]
    if hopper._IMPORT_ERROR is None and type(arg) is TensorDescriptor:
        block = [max(1, n // 2) for n in arg.block_shape] if what == "blocks" else arg.block_shape
        return hopper_views.descriptor(_like(arg.base, salt), [n + salt for n in arg.shape],
                                 [st * (salt + 1) for st in arg.strides[:-1]] + [1], block, arg.layout)
    return arg


@pytest.fixture
def all_launches(monkeypatch, hopper_route_on_cpu):
    """Every kernel launch of the general and the Hopper paths as ``(fn, args, kwargs)``, not run (outputs keep
    their poison); the Hopper route forced for CPU tensors."""
    calls = []
    for module in (lean_launch, launch, launch_backward):  # the Hopper launches' plans launch through lean_launch's
        monkeypatch.setattr(module, "launch_kernel", lambda fn, grid, *args, **kw: calls.append((fn, args, kw)))
    return calls


@pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")
def test_launches_with_equal_argument_keys_are_specialised_alike_by_tritons_binder(all_launches):
    """lean_launch's first cache: every launch a forward and a backward make (Hopper and general kernels, biases,
    masks, grouped heads, fp16/bf16/fp32) keyed by ``argument_key``; again with every tensor and descriptor
    replaced by one of another shape, strides and size (what the key leaves out: these find their original's
    key); and again with the tensors' alignment, the ints' values or the descriptors' block shapes moved too. No
    key is shared by two specialisations or options of Triton's binder, and ``ordered_arguments`` gives the
    binder's bound values."""
    from triton import knobs

    cases = [  # (D, H, H_kv, dtype, bias, key padding)
        (128, 4, 4, torch.bfloat16, None, False), (64, 4, 2, torch.bfloat16, None, False),
        (80, 4, 1, torch.float16, "row", False), (128, 2, 2, torch.bfloat16, "matrix", False),
        (32, 2, 1, torch.float32, None, True), (64, 2, 2, torch.float16, "row", True),
    ]
    for d, h, h_kv, dtype, bias, padded in cases:
        q = torch.randn(2, 128, h, d, dtype=dtype)
        k, v = (torch.randn(2, 128, h_kv, d, dtype=dtype) for _ in range(2))
        bias_t = None if bias is None else torch.randn(2, h, 1 if bias == "row" else 128, 128, dtype=dtype)
        if bias == "matrix":
            bias_t.requires_grad_()
        kpm = torch.rand(2, 128) > 0.2 if padded else None
        slopes = torch.rand(h) if bias is None else None
        out, lse = launch.forward(q, k, v, bias_t, slopes, kpm, None, None, None, d**-0.5, True, 0.0)
        out, lse = torch.randn_like(out), torch.randn_like(lse)
        launch_backward.backward(torch.randn_like(out), q, k, v, out, lse, None, bias_t, slopes, kpm, None, None, None,
                                 d**-0.5, True, 0.0, bias == "matrix", deterministic=None)
    names = {fn.__name__ for fn, _, _ in all_launches}
    assert {"_hopper_fwd_kernel", "_hopper_bwd_dkdv_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"} <= names
    specialised, binders, keys = {}, {}, []
    variants = ("original", "same", "misaligned", "ints", "ints-x16", "ints-1", "ints-i64", "blocks")
    for salt, (fn, args, kwargs) in enumerate(all_launches * len(variants)):
        if id(fn) not in binders:  # by id: a Gluon kernel's hash is its source hash, which fails in the interpreter
            binders[id(fn)] = _tritons_binder(fn)
        jit_fn, binder = binders[id(fn)]
        if salt >= len(all_launches):
            args = tuple(_variant(a, salt, variants[salt // len(all_launches)]) for a in args)
        key = lean_launch.argument_key(jit_fn, 0, args, kwargs)
        assert key is not None, fn.__name__
        keys.append(key)
        options = dict(kwargs, debug=jit_fn.debug or knobs.runtime.debug,
                       instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, specialization, options = binder(*args, **options)
        assert all(a is b for a, b in zip(lean_launch.ordered_arguments(jit_fn, args, kwargs), bound.values(),
                                          strict=True))
        seen = specialised.setdefault(key, (specialization, options))
        assert seen == (specialization, options), fn.__name__
    n = len(all_launches)
    assert keys[n:2 * n] == keys[:n]  # the same specialisation found by another step's tensors
    assert len(specialised) >= 10


def _fake_launcher(module_name, encodes, launched, annotated=False):
    """A compiled kernel whose ``run`` has Triton 3.6's launcher layout (nvidia ``driver.py``) or, ``annotated``,
    3.7's: a ``CudaLauncher`` whose ``launch`` wraps the native launcher in a closure over ``launcher``,
    ``tensordesc_indices`` and ``tensordesc_meta`` that expands each descriptor: 3.6's after the 13 base arguments,
    3.7's in its last argument, the kernel's arguments as one tuple, which its ``__call__`` passes after the packed
    metadata, launch metadata and hooks, the scratch buffers (3.6: before those), the arguments' annotations and
    signature. ``encodes`` counts ``make_tensordesc_arg`` calls, ``launched`` receives the native launcher's
    arguments."""
    module = types.ModuleType(module_name)
    if not annotated:
        module._BASE_ARGS_FORMAT_LEN = 13

    def make_tensordesc_arg(arg, meta):
        encodes.append(arg.base.data_ptr())
        return [("map", arg.base.data_ptr(), tuple(arg.shape), tuple(arg.strides), meta), *arg.shape, *arg.strides]

    def expand(kernel_args, indices, metas):
        final, j = [], 0
        for i, arg in enumerate(kernel_args):
            if i in indices:
                final.extend(make_tensordesc_arg(arg, metas[j]))
                j += 1
            else:
                final.append(arg)
        return final

    def wrap(launcher, tensordesc_indices, tensordesc_meta):
        def inner(*args):
            if annotated:
                return launcher(*args[:-1], expand(args[-1], tensordesc_indices, tensordesc_meta))
            return launcher(*args[:13], *expand(args[13:], tensordesc_indices, tensordesc_meta))
        return inner

    class CudaLauncher:
        def __init__(self):
            self.launch = wrap(lambda *args: launched.append(args), {1, 3}, [{"swizzle": 128}, {"swizzle": 64}])
            self.launch_cooperative_grid, self.launch_pdl = False, True
            self.global_scratch_size = self.profile_scratch_size = 0
            if annotated:
                self.arg_annotations, self.kernel_signature = "annotations", "signature"

        def __call__(self, gx, gy, gz, stream, function, kernel_metadata, launch_metadata, enter, exit, *args):
            if annotated:
                self.launch(gx, gy, gz, stream, function, False, True, kernel_metadata, launch_metadata, enter, exit,
                            None, None, self.arg_annotations, self.kernel_signature, args)
            else:
                self.launch(gx, gy, gz, stream, function, False, True, None, None, kernel_metadata, launch_metadata,
                            enter, exit, *args)

    CudaLauncher.__module__ = module_name
    module.CudaLauncher, module.make_tensordesc_arg = CudaLauncher, make_tensordesc_arg
    return module, types.SimpleNamespace(run=CudaLauncher(), function="function", packed_metadata="metadata")


def test_run_compiled_encodes_each_descriptor_once_and_launches_as_tritons_run(lean, monkeypatch):
    import sys

    encodes, launched = [], []
    module, kernel = _fake_launcher("fake_triton36_driver", encodes, launched)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(lean_launch, "_ENCODED", {})

    def desc(address, rows):
        return types.SimpleNamespace(base=types.SimpleNamespace(data_ptr=lambda: address), shape=[rows, 64],
                                     strides=[64, 1], padding="zero")

    def values(q_address, k_address, rows=128):
        return (0.5, desc(q_address, rows), 7, desc(k_address, rows), None, 64)

    kernel.run(3, 2, 1, 7, "function", "metadata", None, None, None, *values(4096, 8192))  # Triton's own run
    expected = launched.pop()
    assert len(encodes) == 2
    encodes.clear()
    for _ in range(3):
        lean_launch.run_compiled(kernel, (3, 2), 0, values(4096, 8192))
        assert launched.pop() == expected
    assert encodes == [4096, 8192]  # once per descriptor, on the first call
    lean_launch.run_compiled(kernel, (3, 2), 0, values(4096, 12288))  # k moved: k's alone encoded again
    lean_launch.run_compiled(kernel, (3, 2), 0, values(4096, 8192, rows=256))  # another shape: both again
    assert encodes == [4096, 8192, 12288, 4096, 8192]
    kernel.run(3, 2, 1, 7, "function", "metadata", None, None, None, *values(4096, 8192, rows=256))
    assert launched[-1] == launched[-2]


def test_run_compiled_leaves_other_launcher_layouts_to_the_kernels_run(lean, monkeypatch):
    import sys

    encodes, launched = [], []
    module, kernel = _fake_launcher("fake_other_triton_driver", encodes, launched)
    module._BASE_ARGS_FORMAT_LEN = None  # 3.6's closure but another count of base arguments, without 3.7's annotations
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(lean_launch, "_ENCODED", {})
    desc = types.SimpleNamespace(base=types.SimpleNamespace(data_ptr=lambda: 4096), shape=[128, 64], strides=[64, 1],
                                 padding="zero")
    for _ in range(2):
        lean_launch.run_compiled(kernel, (3,), 0, (0.5, desc, 7, desc, None, 64))
    assert len(launched) == 2 and len(encodes) == 4  # Triton's wrapper: every descriptor, every call


def test_run_compiled_encodes_once_under_tritons_37_launcher_too(lean, monkeypatch):
    import sys

    encodes, launched = [], []
    module, kernel = _fake_launcher("fake_triton37_driver", encodes, launched, annotated=True)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(lean_launch, "_ENCODED", {})

    def values(k_address, tf32=False):
        desc = [types.SimpleNamespace(base=types.SimpleNamespace(data_ptr=lambda a=a: a), shape=[128, 64],
                                      strides=[64, 1], padding="zero", round_f32_to_tf32=tf32)
                for a in (4096, k_address)]
        return (0.5, desc[0], 7, desc[1], None, 64)

    kernel.run(3, 2, 1, 7, "function", "metadata", None, None, None, *values(8192))  # Triton's own run
    expected = launched.pop()
    encodes.clear()
    for _ in range(3):
        lean_launch.run_compiled(kernel, (3, 2), 0, values(8192))
        assert launched.pop() == expected
    assert encodes == [4096, 8192]
    lean_launch.run_compiled(kernel, (3, 2), 0, values(8192, tf32=True))  # an option the encoding reads: again
    assert encodes == [4096, 8192, 4096, 8192]


def test_encoded_launch_passes_what_this_tritons_launcher_takes():
    """``lean_launch._EncodedLaunch`` calls Triton's native launcher itself, as ``CudaLauncher.__call__`` does but
    with its descriptors encoded once: what it passes between the kernel's function and its arguments follows Triton
    3.6's order or 3.7's. Wherever it would take the launch over (the wrapper's closure it reads), this Triton's
    ``__call__`` must make exactly that call; other versions keep ``kernel.run``."""
    import re

    driver = pytest.importorskip("triton.backends.nvidia.driver")
    wrapped = driver.wrap_handle_tensordesc(lambda *args: None, {0: "tensordesc<bf16[64, 64]>"}, [{}])
    if "tensordesc_indices" not in getattr(getattr(wrapped, "__code__", None), "co_freevars", ()):
        pytest.skip("this Triton's launcher is not one _EncodedLaunch takes over")
    source = inspect.getsource(driver.CudaLauncher.__call__)
    call = re.sub(r"\s+", "", source[source.index("self.launch("):])
    common = "self.launch(gridX,gridY,gridZ,stream,function,self.launch_cooperative_grid,self.launch_pdl,"
    if "arg_annotations" in inspect.getsource(driver.CudaLauncher):
        # 3.7: packed metadata, launch metadata, two hooks, two scratch buffers, annotations, signature, arguments
        assert call.startswith(common + "kernel_metadata,launch_metadata,launch_enter_hook,launch_exit_hook,"
                               "global_scratch,profile_scratch,self.arg_annotations,self.kernel_signature,args)"), call
    else:  # 3.6: two scratch buffers, then (packed metadata, launch metadata, two hooks, arguments...)
        assert call.startswith(common + "global_scratch,profile_scratch,*args)"), call
        assert "def__call__(self,gridX,gridY,gridZ,stream,function,*args)" in re.sub(r"\s+", "", source)


def test_launches_ask_for_floating_point_fusion_unless_told_otherwise(monkeypatch):
    """Every launch asks Triton for FMA contraction, its default up to 3.9 (3.10 turns it off), unless the caller
    passes ``enable_fp_fusion`` itself."""
    seen = []

    class Kernel:
        pre_run_hooks = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs)

    monkeypatch.setattr(lean_launch, "_AVAILABLE", False)  # Triton's own launch path
    lean_launch.launch_kernel(Kernel(), (1,), 0, BLOCK=16)
    lean_launch.launch_kernel(Kernel(), (1,), 0, BLOCK=16, enable_fp_fusion=False)
    assert seen == [dict(BLOCK=16, enable_fp_fusion=True), dict(BLOCK=16, enable_fp_fusion=False)]


@pytest.mark.parametrize("capability, ptxas, expected", [
    pytest.param(9, "13.4", "--regAllocOptLevel=4", id="hopper-ptxas13"),
    pytest.param(9, "12.8", None, id="hopper-ptxas12"),
    pytest.param(10, "13.4", None, id="blackwell"),
    pytest.param(8, "12.8", None, id="ampere"),
])
def test_ptxas_options_restore_ptxas13s_register_allocation_on_hopper(monkeypatch, capability, ptxas, expected):
    """Only where Triton assembles sm_90 kernels with a ptxas of CUDA 13 (Triton 3.9) do our launches undo the
    ``--regAllocOptLevel=2`` Triton passes (with it ptxas 13 spilled the Hopper forward: benchmarks/NOTES.md
    session 55); elsewhere its choice stands."""
    compiler = pytest.importorskip("triton.backends.nvidia.compiler")
    monkeypatch.setattr(compiler, "get_ptxas", lambda arch: types.SimpleNamespace(path="ptxas", version=ptxas))
    assert lean_launch.ptxas_options(capability) == expected


def test_launches_on_hopper_under_ptxas13_pass_the_option_before_the_users(lean, monkeypatch):
    """The option goes with the launch's compile options (so into Triton's cache key), ahead of
    PTXAS_OPTIONS (ptxas takes an option's last value); a caller's own ``ptx_options`` stand."""
    compiler = pytest.importorskip("triton.backends.nvidia.compiler")
    monkeypatch.setattr(compiler, "get_ptxas", lambda arch: types.SimpleNamespace(path="ptxas", version="13.4"))
    monkeypatch.setattr(lean_launch.driver.active, "get_device_capability", lambda device: (9, 0))
    fn, x = _FakeJITFunction(), object()
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=64)
    lean.nvidia.ptxas_options = "--maxrregcount=128"
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=64)
    lean_launch.launch_kernel(fn, (3,), x, 32, BLOCK=64, ptx_options="-O2")
    assert [kwargs["ptx_options"] for _, _, kwargs in fn.triton_launches] == [
        "--regAllocOptLevel=4", "--regAllocOptLevel=4 --maxrregcount=128", "-O2"]
    monkeypatch.setattr(lean_launch, "_DEVICE_PTXAS_OPTIONS", {})
    monkeypatch.setattr(lean_launch.driver.active, "get_device_capability", lambda device: (8, 0))
    lean_launch.launch_kernel(fn, (3,), x, 48, BLOCK=64)
    assert "ptx_options" not in fn.triton_launches[-1][2]
