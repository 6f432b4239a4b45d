"""Compile, for Hopper (sm_90) and without a GPU, every general Triton kernel launch that a grid of attention calls
makes, each specialised exactly as Triton's binder specialises it on the GPU (ints equal to 1 become constants,
multiples of 16 and aligned pointers are marked): finds the shapes that crash ptxas or exhaust its registers
before a GPU run does (benchmarks/NOTES.md session 59: one key crashed ptxas in the pipelined descriptor loads).

    python tools/compile_launches.py [--head-dims 64 160] [--seqs 1 2 37] [--kernel dkdv] [--jobs 2]
    PYTHONPATH=/path/to/triton-3.6 python tools/compile_launches.py ...      (another Triton's compiler)

Two steps: a child process under ``TRITON_INTERPRET=1`` calls ``attention`` forward and backward over the grid
with every launch recorded and none run (the Hopper route forced, as on an H100/H200, so the general kernels are
recorded only where a Hopper GPU takes them: the Gluon kernels are ``tools/compile_kernels.py``'s); this process
then binds each distinct launch as Triton's launcher would and compiles it. Prints ``ok``/``FAIL`` per
specialisation with the shapes that first reached it (``OVER``: more shared memory than an sm_90 block has, which
fails at launch); exits 1 on any failure; ``--quiet`` prints only the failures.
"""

import argparse
import concurrent.futures
import contextlib
import functools
import itertools
import os
import pickle
import subprocess
import sys
import tempfile

_TENSOR = "tensor"
# the shared memory one block may use on sm_90 (227 KB); above it the launch fails with OutOfResources
SM90_SHARED_BYTES = 232448


def _grid(args) -> list[dict]:
    cases = []
    for d, s_q, s_k, (h, h_kv), bias, bias_dtype, causal, padded, mask, det, dtype in itertools.product(
            args.head_dims, args.seqs, args.seqs, args.heads, args.biases, args.bias_dtypes, (False, True),
            (False, True), args.masks, args.deterministic, args.dtypes):
        if bias in ("none", "alibi") and bias_dtype != args.bias_dtypes[0]:
            continue
        cases.append(dict(d=d, s_q=s_q, s_k=s_k, h=h, h_kv=h_kv, bias=bias, bias_dtype=bias_dtype, causal=causal,
                          padded=padded, mask=mask, deterministic=det, dtype=dtype))
    return cases


def _case_name(c: dict) -> str:
    det = {True: "deterministic", False: "any-order", None: "default-order"}[c["deterministic"]]
    bias = c["bias"] if c["bias"] in ("none", "alibi") else f"{c['bias']}({c['bias_dtype']})"
    return (f"D{c['d']} s_q={c['s_q']} s_k={c['s_k']} H={c['h']}:{c['h_kv']} {bias}"
            f"{' causal' if c['causal'] else ''}{' padded' if c['padded'] else ''}"
            f"{'' if c['mask'] == 'none' else ' ' + c['mask']} {det} {c['dtype']}")


def _capture(args, out_path: str) -> None:
    """The child: every general-kernel launch of the grid's calls, as ``(kernel, args, kwargs, case)`` with tensors
    replaced by ``(TENSOR, dtype, 16-byte aligned)``."""
    import torch

    import mpt_attention as M
    from mpt_attention.impl.triton import hopper, hopper_views, launch, launch_backward, lean_launch

    # the choices a Hopper GPU makes: its block configs (not the interpreter's small ones) and copy-engine
    # descriptors wherever the tensors' alignment allows them
    for module in (launch, launch_backward):
        module._INTERPRET = False
        module._descriptors_ok = lambda *tensors: all(hopper_views.tma_aligned(t) for t in tensors)
    real = hopper.unsupported
    hopper.unsupported = lambda *a, **kw: None if (r := real(*a, **kw)) == "not an sm_90 GPU" else r
    hopper.sm_count = lambda device_index: 132
    seen, case = {}, {}

    def record(fn, grid, *a, **kw):
        name = getattr(fn, "__name__", "")
        if name not in _KERNELS:
            return None  # the Gluon kernels (their launches take descriptors built on the host) and helpers
        summary = tuple((_TENSOR, str(x.dtype), x.data_ptr() % 16 == 0) if isinstance(x, torch.Tensor) else x
                        for x in a)
        seen.setdefault((name, summary, tuple(sorted(kw.items()))), dict(case))
        return None

    launch.launch_kernel = launch_backward.launch_kernel = lean_launch.launch_kernel = record

    class NoStream:  # the backward's side stream, for CPU tensors
        def wait_stream(self, other):
            pass

    launch_backward._side_stream = torch.cuda.current_stream = lambda device=None: NoStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for c in _grid(args):
        case.clear()
        case.update(c)
        dtype, d = dtypes[c["dtype"]], c["d"]
        q = torch.randn(2, c["s_q"], c["h"], d, dtype=dtype)
        k, v = (torch.randn(2, c["s_k"], c["h_kv"], d, dtype=dtype) for _ in range(2))
        bias = slopes = None
        if c["bias"] == "alibi":
            slopes = torch.rand(c["h"])
        elif c["bias"] != "none":  # (B, H, 1, S_k), (B, H, S_q, S_k) or, "shared", (B, 1, S_q, S_k)
            bias_dtype = dtype if c["bias_dtype"] == "q" else dtypes[c["bias_dtype"]]
            heads = 1 if c["bias"].startswith("shared") else c["h"]
            bias = torch.randn(2, heads, 1 if c["bias"].startswith("row") else c["s_q"], c["s_k"], dtype=bias_dtype)
        kw = dict(causal=c["causal"], alibi_slopes=slopes, attn_bias=bias,
                  key_padding_mask=torch.rand(2, c["s_k"]) > 0.3 if c["padded"] else None)
        if c["mask"] == "sequence_id":  # packed sequences over the keys
            kw["sequence_id"] = torch.sort(torch.randint(0, 3, (2, c["s_k"])), dim=1).values
        elif c["mask"] == "prefix":
            kw["prefix_mask"] = torch.arange(c["s_k"]).expand(2, -1) < c["s_k"] // 2
        elif c["mask"] == "dropout":
            kw["dropout_p"] = 0.1
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        if bias is not None and c["bias"].endswith("-grad"):
            bias.requires_grad_()
        try:  # through the public op, as a user calls it: the forward's and the backward's launches are recorded
            out = M.attention(q, k, v, backend="triton", deterministic=c["deterministic"], **kw)
            out.backward(torch.randn_like(out))
        except (ValueError, NotImplementedError) as exc:  # outside what the op accepts
            print(f"skipped {_case_name(c)}: {exc}", file=sys.stderr)
    with open(out_path, "wb") as f:
        pickle.dump([(n, s, dict(kw), c) for (n, s, kw), c in seen.items()], f)


_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def _kernel(name: str):
    from mpt_attention.impl.triton import backward, forward

    return getattr(forward if name == "_attn_fwd_kernel" else backward, name)


def _stand_in(arg, keep: list):
    """A CPU tensor of the recorded dtype and alignment (all Triton's binder reads of it), or the value itself."""
    import torch

    if not (isinstance(arg, tuple) and arg and arg[0] == _TENSOR):
        return arg
    dtype = getattr(torch, arg[1].removeprefix("torch."))
    base = torch.empty(64, dtype=dtype)
    keep.append(base)
    return base if arg[2] else base[1:]


@functools.cache
def _binder(name: str):
    """The kernel, an sm_90 backend and the binder Triton's launcher builds for them (once per kernel: building it
    generates and executes Python source)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(name)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def _bind(job):
    """One recorded launch bound as Triton's launcher binds it for sm_90: ``(fn, backend, options, signature,
    constexprs, attrs)``."""
    name, summary, kwargs = job
    from compile_kernels import LAUNCH_OPTIONS
    from triton import knobs

    fn, backend, binder = _binder(name)
    keep = []
    args = [_stand_in(a, keep) for a in summary]
    kwargs = dict(LAUNCH_OPTIONS, **kwargs, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    return (fn, backend, *fn._pack_args(backend, kwargs, bound, specialization, options))


def _specialisation(job) -> str:
    fn, _, options, signature, constexprs, attrs = _bind(job)
    return repr((fn.__name__, sorted(options.__dict__.items()), signature, sorted(constexprs.items()),
                 sorted(attrs.items())))


def _compile(job) -> tuple[str, str]:
    """Compile one recorded launch for sm_90 as Triton's launcher would: ``(status, detail)``."""
    import triton
    from compile_kernels import _spills
    from triton.compiler import ASTSource

    fn, backend, options, signature, constexprs, attrs = _bind(job)
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                                options=options.__dict__)
    except Exception as exc:
        return "FAIL", " ".join(str(exc).split())[-600:]
    status = "ok" if kernel.metadata.shared <= SM90_SHARED_BYTES else "OVER"
    return status, f"smem={kernel.metadata.shared} {_spills(kernel)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 160, 256])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 37])
    parser.add_argument("--heads", type=lambda s: tuple(map(int, s.split(":"))), nargs="+", default=[(1, 1), (4, 2)],
                        help="H:H_kv pairs")
    parser.add_argument("--biases", nargs="+", default=["none", "alibi", "row", "matrix", "matrix-grad", "shared-grad"],
                        help="none, alibi (slopes), row (B, H, 1, S_k), matrix (B, H, S_q, S_k), shared "
                        "(B, 1, S_q, S_k); -grad: with its gradient")
    parser.add_argument("--deterministic", type=lambda s: None if s == "none" else s == "true", nargs="+",
                        default=[True, False], help="true, false or none (the backward's dQ choice)")
    parser.add_argument("--masks", nargs="+", default=["none"], choices=["none", "sequence_id", "prefix", "dropout"],
                        help="besides key padding (always with and without)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"])
    parser.add_argument("--bias-dtypes", nargs="+", default=["q", "fp32"], help="q (the inputs' dtype) or a dtype")
    parser.add_argument("--kernel", help="compile only kernels whose name holds this (fwd, dkdv, dq)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--quiet", action="store_true", help="print only the failures")
    parser.add_argument("--capture", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture:
        _capture(args, args.capture)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("compiles for the GPU: run without TRITON_INTERPRET (the capture step sets it itself)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.pkl")
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--capture", path], check=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
        with open(path, "rb") as f:
            launches = pickle.load(f)
    launches = [x for x in launches if args.kernel is None or args.kernel in x[0]]
    import triton

    distinct = {}
    for launch in launches:
        distinct.setdefault(_specialisation(launch[:3]), launch)
    print(f"Triton {triton.__version__}: {len(launches)} launches, {len(distinct)} specialisations", flush=True)
    launches = list(distinct.values())
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        jobs = [(n, s, kw) for n, s, kw, _ in launches]
        for (name, _, kw, case), (status, detail) in zip(launches, pool.map(_compile, jobs)):
            failures += status != "ok"
            if args.quiet and status == "ok":
                continue
            flags = " ".join(f"{k}={v}" for k, v in kw.items() if k.isupper() and v not in (False, 0, None))
            print(f"{status:4} {name} {flags} num_warps={kw.get('num_warps')} num_stages={kw.get('num_stages')} "
                  f"first at {_case_name(case)}: {detail}", flush=True)
    print(f"{failures} of {len(launches)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
