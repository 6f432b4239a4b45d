"""Host cost per call of our op, its effect on a short kernel's measured time, and each kernel's share
of a forward+backward (benchmarks/NOTES.md, "host cost"):

    python benchmarks/host_overhead.py [--fa4] [--kernels] [--profile-backward] [--graph]

1. Host microseconds per call on a tiny shape (the GPU waits on the host): forward and forward+backward,
   Hopper and general kernels, SDPA cuDNN beside them.
2. cProfile of the forward call: where those microseconds go.
3. B8 H16 S2048 D128 causal ALiBi by do_bench, Hopper and general kernels in alternation.
With ``--fa4``, 1 and 3 again after importing flash-attn-4 (``/tmp/fa4site``, see gpu_run.sh) and
compiling FlexAttention: the benchmark's process holds both.
4. With ``--kernels``: kernel durations inside one forward+backward of each path (torch.profiler), two shapes.
5. With ``--profile-backward``: cProfile of forward+backward calls (tiny shape, Hopper path).
6. With ``--graph``: B8 S2048 forward+backward eager against replayed from a CUDA graph, ours and cuDNN.
7. With ``--stubbed`` (alone, or with ``--profile``: cProfile of real steps): host microseconds per
   forward+backward step (tiny shape, Hopper path; causal ALiBi, MPT's bias row, and a dense bias with its
   gradient) with the Triton/Gluon launches real, with them replaced by no-ops (the launches' share of the
   host's time against everything else: our Python, torch's allocations and small kernels, autograd), and
   with the backward run on the calling thread (``torch.autograd.set_multithreading_enabled(False)``: the
   handoff to the device's autograd thread). cProfile runs the backward on the calling thread to see it.
8. With ``--launch`` (alone): one Gluon launch of the Hopper forward taken apart (descriptors, Triton's
   argument binder, its cache key, the compiled kernel's own ``run``), and cProfile of the launch. With Triton 3.6
   also a probe of a direct launch (``_raw_launcher``: the compiled launcher module called with the arguments
   expanded in one loop, tensors as addresses), its outputs checked bitwise against ``kernel.run``'s.
9. With ``--timers`` (alone): host microseconds per forward+backward step (tiny shape, Hopper path, launches real)
   spent inside each of our layers and Triton's launch, timed by wrappers (inclusive; cheaper than cProfile).
10. With ``--host-ab`` (alone): 1 and 6 only (what an A/B of package versions with benchmarks/ab.sh compares).
"""

from __future__ import annotations

import site
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper, hopper_dkdv, hopper_views
from mpt_attention.testing import capture_cuda_graph, profile_host, profile_kernels
from mpt_attention.testing import host_us as testing_host_us

DEV, DTYPE = "cuda", torch.bfloat16


def inputs(batch, heads, seq, dim):
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, device=DEV, dtype=DTYPE, generator=gen).requires_grad_()
               for _ in range(3))
    return q, k, v, M.gen_slopes(heads, return_1d=True, device=DEV)


def ours(q, k, v, slopes, use_hopper):
    def run():
        hopper.ENABLED = use_hopper
        return M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
    return run


def cudnn(q, k, v):
    return cudnn_on(*(x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)))


def cudnn_on(qh, kh, vh):
    def run():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return run


def with_backward(fn):
    dout = torch.randn_like(fn())
    return lambda: fn().backward(dout)


def host_us(fn, calls=300):
    """Microseconds per call until the GPU is idle (``testing.host_us``), after 20 warm-up calls."""
    return testing_host_us(fn, calls, warmup=20, until_idle=True)


def host_table(label):
    q, k, v, slopes = inputs(1, 16, 128, 128)
    rows = {"hopper": ours(q, k, v, slopes, True), "general": ours(q, k, v, slopes, False), "cudnn": cudnn(q, k, v)}
    for name, fn in rows.items():
        print(f"[{label}] host us/call B1 H16 S128 D128  {name:8s} fwd {host_us(fn):7.1f}"
              f"  fwd_bwd {host_us(with_backward(fn)):7.1f}", flush=True)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def layer_table():
    """Host microseconds per call of each layer under ``mpt_attention.attention``, innermost first."""
    from mpt_attention.impl.triton import launch, launch_backward

    q, k, v, slopes = inputs(1, 16, 128, 128)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    out, lse = launch.forward(qd, kd, vd, None, slopes, None, None, None, None, 128**-0.5, True, 0.0)
    dout, flat = torch.randn_like(out), qd.flatten()
    scale = 128**-0.5
    layers = {
        "torch.empty_like": lambda: torch.empty_like(qd),
        "triton copy kernel": lambda: _copy_kernel[(1,)](flat, out.flatten(), 1024, BLOCK=1024),
        "hopper.forward": lambda: hopper.forward(qd, kd, vd, None, slopes, scale, True, 1),
        "launch.forward": lambda: launch.forward(qd, kd, vd, None, slopes, None, None, None, None, scale, True, 0.0),
        "op triton_fwd": lambda: torch.ops.mpt_attention.triton_fwd(qd, kd, vd, None, slopes, None, None, None, None,
                                                                    scale, True, 0.0, None, None, 0, 0, None, None,
                                                                    True),
        "attention, no grad": ours(qd, kd, vd, slopes, True),
        "attention, grad": ours(q, k, v, slopes, True),
        "launch_backward.backward": lambda: launch_backward.backward(dout, qd, kd, vd, out, lse, None, None, slopes,
                                                                     None, None, None, None, scale, True, 0.0, False),
    }
    for name, fn in layers.items():
        hopper.ENABLED = True
        print(f"host us/call  {name:22s} {host_us(fn):7.1f}", flush=True)


def profile_forward():
    q, k, v, slopes = inputs(1, 16, 128, 128)
    fn = ours(q.detach(), k.detach(), v.detach(), slopes, True)
    host_us(fn, 20)
    profile_host(fn, 200, ("cumulative", 30))


def profile_backward():
    """cProfile of forward+backward calls (tiny shape, Hopper path): where the host time of a training
    step goes beyond the forward's (autograd engine, launch_backward.backward, the Gluon launch, the side stream)."""
    q, k, v, slopes = inputs(1, 16, 128, 128)
    step = with_backward(ours(q, k, v, slopes, True))
    host_us(step, 20)

    def fresh_step():
        q.grad = k.grad = v.grad = None  # as the benchmark's grad_to_none: no accumulation kernels
        step()

    profile_host(fresh_step, 200, ("cumulative", 45), ("tottime", 25))


def graph_table():
    """B8 H16 S2048 D128 causal ALiBi forward+backward, eager against replayed from a CUDA graph (no host
    work): how much of the eager step's time is the host's. cuDNN through SDPA (no ALiBi) beside it."""
    q, k, v, slopes = inputs(8, 16, 2048, 128)
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    providers = (("ours (hopper)", ours(q, k, v, slopes, True), [q, k, v]),
                 ("cudnn", cudnn_on(qh, kh, vh), [qh, kh, vh]))
    for name, fwd, leaves in providers:
        dout = torch.randn_like(fwd())

        def step(fwd=fwd, leaves=leaves, dout=dout):
            return torch.autograd.grad(fwd(), leaves, dout)

        eager_ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        graph, _ = capture_cuda_graph(step)
        graph_ms = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
        print(f"[graph] B8 H16 S2048 D128 fwd_bwd {name:14s} eager {eager_ms:.3f} ms  graph replay {graph_ms:.3f} ms",
              flush=True)


def short_kernel_table(label):
    q, k, v, slopes = inputs(8, 16, 2048, 128)
    for rep in range(2):
        for use_hopper in (True, False):
            fn = ours(q, k, v, slopes, use_hopper)
            fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
            both = do_bench(with_backward(fn), warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
            print(f"[{label}] B8 S2048 D128 {'hopper' if use_hopper else 'general':8s} pass {rep}: "
                  f"fwd {fwd:.3f} ms  fwd_bwd {both:.3f} ms", flush=True)


def kernel_shares():
    for batch, heads, seq, dim in ((2, 16, 8192, 128), (4, 32, 4096, 64)):
        q, k, v, slopes = inputs(batch, heads, seq, dim)
        for use_hopper in (True, False):
            step = with_backward(ours(q, k, v, slopes, use_hopper))
            print(f"\n== kernels, B{batch} H{heads} S{seq} D{dim}, {'hopper' if use_hopper else 'general'} (3 steps)")
            for ms, count, name in profile_kernels(step)[:8]:
                print(f"  {ms:8.3f} ms/step  {count:3d}x  {name[:90]}")


def stubbed_table():
    from mpt_attention.impl.triton import launch

    q, k, v, slopes = inputs(1, 16, 128, 128)
    bias = torch.randn(1, 16, 128, 128, device=DEV, dtype=DTYPE, requires_grad=True)
    row = M.build_alibi_bias(16, 128, device=DEV, dtype=torch.float32)  # MPT's (1, H, 1, S_k) row
    steps = {
        "causal ALiBi": (ours(q, k, v, slopes, True), [q, k, v]),
        "causal bias row": (lambda: M.attention(q, k, v, backend="triton", causal=True, attn_bias=row), [q, k, v]),
        "dense bias, dbias": (lambda: M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias),
                              [q, k, v, bias]),
    }
    # the general kernels launch through the launch modules' launch_kernel, the Hopper route's through its plans
    from mpt_attention.impl.triton import launch_backward, lean_launch

    real, real_call = launch.launch_kernel, lean_launch.PlannedLaunch.__call__

    def stub(on):
        launch.launch_kernel = launch_backward.launch_kernel = (lambda *a, **kw: None) if on else real
        lean_launch.PlannedLaunch.__call__ = (lambda self, *a: None) if on else real_call

    for name, (fn, leaves) in steps.items():
        dout = torch.randn_like(fn())

        def step(fn=fn, leaves=leaves, dout=dout):
            for t in leaves:
                t.grad = None
            fn().backward(dout)

        for _ in range(2):
            times = {}
            for stubbed in (False, True):
                stub(stubbed)
                times[stubbed] = host_us(step)
            stub(False)
            torch.autograd.set_multithreading_enabled(False)  # the backward on this thread, not the device's
            same_thread = host_us(step)
            torch.autograd.set_multithreading_enabled(True)
            print(f"[stubbed] host us/step B1 H16 S128 D128 {name:18s} real {times[False]:7.1f}  launches stubbed "
                  f"{times[True]:7.1f}  (launches {times[False] - times[True]:6.1f})  backward on the calling "
                  f"thread {same_thread:7.1f}", flush=True)
        if "--profile" in sys.argv:
            # where the time goes: cProfile of 300 real steps, the backward on this thread so that cProfile sees it
            torch.autograd.set_multithreading_enabled(False)
            try:
                profile_host(step, 300, ("tottime", 45), ("cumulative", 60))
            finally:
                torch.autograd.set_multithreading_enabled(True)


def _raw_launcher(kernel):
    """``(C launch function, expand(grid, stream, values) -> its argument tuple)`` for a kernel compiled by Triton 3.6
    (a compiled launcher module per signature, wrapped by ``wrap_handle_tensordesc``'s ``inner``), or None: what
    ``kernel.run`` does minus its Python (scratch allocation, the wrapper's loop), tensors passed as addresses (the
    launcher then skips its ``cuPointerGetAttribute`` check). A probe of how much a direct launch would save."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import driver

    run = kernel.run
    if getattr(nvidia, "_BASE_ARGS_FORMAT", None) != "iiiKKppOOOOOO" or run.global_scratch_size \
            or run.profile_scratch_size:
        return None
    launch, indices, metas = run.launch, frozenset(), []
    if getattr(launch, "__code__", None) is not None:  # the descriptor wrapper: its closure holds the module's launch
        cells = dict(zip(launch.__code__.co_freevars, (c.cell_contents for c in launch.__closure__)))
        launch, indices, metas = cells["launcher"], cells["tensordesc_indices"], cells["tensordesc_meta"]
        if not metas or any(m is None or m.get("fp4_padded") for m in metas):  # not copy-engine descriptors
            return None
    fill = driver.active.utils.fill_tma_descriptor
    host_dtype = nvidia.TMA_DTYPE_DEVICE_TO_HOST
    base = (run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata, None, None, None)
    tensor = torch.Tensor

    def expand(grid, stream, values):
        final = [grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, kernel.function,
                 *base]
        at = 0
        for i, v in enumerate(values):
            if i in indices:
                meta = metas[at]
                at += 1
                final.append(fill(v.base.data_ptr(), meta["swizzle"], meta["elem_size"], host_dtype[meta["elem_type"]],
                                  meta["block_size"], v.shape, v.strides, int(v.padding == "nan")))
                final.extend(v.shape)
                final.extend(v.strides)
            elif type(v) is tensor:
                final.append(v.data_ptr())
            else:
                final.append(v)
        return final

    return launch, expand


def launch_breakdown():
    """Host microseconds of the parts of one Hopper forward launch (tiny shape): where a launch's time goes. The
    launch's arguments are the ones ``hopper.forward`` passes (recorded from a real call), so this follows the
    kernel's signature."""
    from triton.backends.nvidia.driver import make_tensordesc_arg
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key

    from mpt_attention.impl.triton import lean_launch

    q, k, v, slopes = (x.detach() for x in inputs(1, 16, 128, 128))
    recorded = []
    real_launch = lean_launch.launch_kernel  # a plan's first launch goes through it
    lean_launch.launch_kernel = lambda fn, grid, *a, **kw: recorded.append((fn, grid, a, kw)) or real_launch(
        fn, grid, *a, **kw)
    try:
        plan = hopper.forward_plan(q, k, v, None, slopes, 128**-0.5, True, 1)
        hopper.run_forward(plan, q, k, v, None, slopes)
    finally:
        lean_launch.launch_kernel = real_launch
    fn, grid, args, kw = recorded[0]
    descs = [a for a in args if type(a).__name__ == "TensorDescriptor"]
    kernel = fn[grid](*args, **kw)
    device = driver.active.get_current_device()
    _, key_cache, _, _, binder = fn.device_caches[device]
    bound, key = lean_launch.bind(fn, device, binder, args, dict(kw))
    spec, options = list(key[2]), dict(key[3])
    metas = getattr(kernel.metadata, "tensordesc_meta", None) or [None] * len(descs)
    parts = {
        "4 descriptors (a plan's, hopper_views.descriptor)": lambda: [hopper_views.descriptor(x, *static)
                                                                      for x, static in zip((q, k, v, q), plan.descs)],
        "hopper.forward_plan": lambda: hopper.forward_plan(q, k, v, None, slopes, 128**-0.5, True, 1),
        "hopper.run_forward (planned launch)": lambda: hopper.run_forward(plan, q, k, v, None, slopes),
        "fn[grid](...) (prebuilt descriptors)": lambda: fn[grid](*args, **kw),
        "lean_launch.launch_kernel": lambda: lean_launch.launch_kernel(fn, grid, *args, **kw),
        "lean_launch.bind (Triton's binder)": lambda: lean_launch.bind(fn, device, binder, args, dict(kw)),
        "lean_launch.argument_key": lambda: lean_launch.argument_key(fn, device, args, kw),
        "lean_launch.ordered_arguments": lambda: lean_launch.ordered_arguments(fn, args, kw),
        "compute_cache_key": lambda: compute_cache_key(key_cache, spec, options),
        "current device + stream": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        f"{len(descs)} x make_tensordesc_arg": lambda: [make_tensordesc_arg(d, m) for d, m in zip(descs, metas)],
        "lean_launch.run_compiled (kernel.run)": lambda: lean_launch.run_compiled(kernel, grid, device,
                                                                                             bound.values()),
        "hopper.forward": lambda: hopper.forward(q, k, v, None, slopes, 128**-0.5, True, 1),
    }
    raw = _raw_launcher(kernel)
    if raw is None:
        print("[launch] no raw-launch probe: this Triton's launcher is not 3.6's compiled module")
    else:
        stream = driver.active.get_current_stream(device)
        values = tuple(bound.values())
        prebuilt = raw[1](grid, stream, values)
        parts["raw: args expanded + C launch"] = lambda: raw[0](*raw[1](grid, stream, values))
        parts["raw: args expanded only"] = lambda: raw[1](grid, stream, values)
        parts["raw: C launch, prebuilt args"] = lambda: raw[0](*prebuilt)
        out, lse, tiles = args[8], args[5], args[7]  # hopper.forward's launch: the outputs and the tile counter
        results = []
        for launch in (lambda: lean_launch.run_compiled(kernel, grid, device, values),
                       lambda: raw[0](*raw[1](grid, stream, values))):
            out.fill_(float("nan")), lse.fill_(float("nan")), tiles.zero_()
            launch()
            torch.cuda.synchronize()
            results.append((out.clone(), lse.clone()))
        same = all(torch.equal(a, b) for a, b in zip(*results)) and not results[0][0].isnan().any()
        print(f"[launch] raw launch's out and lse bitwise equal to kernel.run's: {same}")
    for name, part in parts.items():
        print(f"[launch] host us  {name:38s} {host_us(part, 2000):7.1f}", flush=True)
    profile_host(lambda: lean_launch.launch_kernel(fn, grid, *args, **kw), 1000, ("tottime", 25))


def timers_table():
    import functools

    from triton.runtime import jit

    from mpt_attention import api, ops
    from mpt_attention.impl.triton import launch, launch_backward, lean_launch, plans

    totals = {}

    def timed(owner, name, label):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapper)

    targets = (
        (api, "_validate", "api._validate"), (ops, "triton_attention", "ops.triton_attention"),
        (ops._EagerTritonAttention, "forward", "autograd forward (ours)"), (launch, "forward", "launch.forward"),
        (launch_backward, "backward", "launch_backward.backward"), (hopper, "run_forward", "hopper.run_forward"),
        (plans, "run_fused", "plans.run_fused"), (hopper_dkdv, "run_dkdv", "hopper_dkdv.run_dkdv"),
        (hopper, "unsupported", "hopper.unsupported"), (plans, "row_terms", "plans.row_terms"),
        (hopper, "descriptor", "hopper.descriptor"), (lean_launch.PlannedLaunch, "__call__", "planned launches"),
        (launch, "launch_kernel", "launches (launch.py)"),
        (launch_backward, "launch_kernel", "launches (launch_backward.py)"),
        (jit.JITFunction, "run", "JITFunction.run"),
    )
    for owner, name, label in targets:
        timed(owner, name, label)
    q, k, v, slopes = inputs(1, 16, 128, 128)
    dout = torch.randn_like(q)

    def step():
        q.grad = k.grad = v.grad = None
        M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes).backward(dout)

    for rep in range(3):
        host_us(step, 50)
        totals.clear()
        per_step = host_us(step, 500)
        print(f"[timers] round {rep}: {per_step:7.1f} us per step; inside: " + ", ".join(
            f"{name} {sec / 520 * 1e6:.1f}" for name, sec in totals.items()), flush=True)


def main():
    if sys.argv[1:] == ["--host-ab"]:  # for benchmarks/ab.sh: tables that every package version can run
        host_table("plain")
        graph_table()
        return
    if sys.argv[1:] == ["--timers"]:
        timers_table()
        return
    if sys.argv[1:] == ["--launch"]:
        launch_breakdown()
        return
    if sys.argv[1:] == ["--graph"]:  # alone: skip the host tables
        graph_table()
        return
    if "--stubbed" in sys.argv:
        stubbed_table()
        return
    layer_table()
    host_table("plain")
    profile_forward()
    short_kernel_table("plain")
    if "--fa4" in sys.argv:
        site.addsitedir("/tmp/fa4site")
        try:
            from flash_attn.cute import flash_attn_func  # noqa: F401
            print("flash-attn-4 imported")
        except Exception as exc:  # noqa: BLE001 (its DSL fails in many ways; the report says which)
            print(f"flash-attn-4 not imported: {type(exc).__name__}: {exc}"[:200])
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v, _ = inputs(1, 16, 256, 128)
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))
        torch.compile(flex_attention, dynamic=False)(qh, kh, vh)
        host_table("fa4+flex")
        short_kernel_table("fa4+flex")
    if "--kernels" in sys.argv:
        kernel_shares()
    if "--profile-backward" in sys.argv:
        profile_backward()
    if "--graph" in sys.argv:
        graph_table()


if __name__ == "__main__":
    main()
