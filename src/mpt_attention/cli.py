"""``mpt-attention check``: environment, backend availability, a numerical check and a timing table.

    mpt-attention check                 # CPU (default): Triton runs in its interpreter
    mpt-attention check --device cuda   # the GPU, half precision, MPT-7B-shaped timing
    mpt-attention check --json          # the same report as JSON, for bug reports

Exit status 1 if any available backend fails its numerical check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for name in ("triton", "transformers", "numpy"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError as exc:
            found[name] = "not installed" if exc.name == name else f"import failed: {exc}"
    if "." in found["triton"]:  # the ptxas Hopper kernels are assembled with, and what our launches add to it
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            from mpt_attention.impl.triton.lean_launch import ptxas_options

            extra = ptxas_options(9)
            found["ptxas (sm_90)"] = get_ptxas(90).version + (f", launches add {extra}" if extra else "")
        except Exception as exc:  # not a CUDA build of Triton, or no ptxas
            found["ptxas (sm_90)"] = f"unknown ({type(exc).__name__})"
    from mpt_attention import __version__

    found["mpt_attention"] = __version__
    return found


def _case_check(backend: str, device: str, dtype, case) -> dict:
    """``case`` through ``backend`` against float64 (and the same math in ``dtype`` for the budget)."""
    import torch

    import mpt_attention as M
    from mpt_attention.testing import make_inputs, reference_attention

    (q, k, v), kw = make_inputs(case, dtype=dtype, device=device)
    out = M.attention(q, k, v, backend=backend, **kw)
    cpu_kw = {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    qc, kc, vc = (x.cpu() for x in (q, k, v))
    ref, _ = reference_attention(qc, kc, vc, **cpu_kw)
    low, _ = reference_attention(qc, kc, vc, compute_dtype=dtype, **cpu_kw)
    verdict = _verdict(out, ref, low, dtype)
    if backend == "triton":
        from mpt_attention.impl.triton import hopper, key_padding

        bias, kpm = kw.get("attn_bias"), kw.get("key_padding_mask")
        why = hopper.unsupported(q, k, v, bias, kpm, None, None, 0.0, case.causal, False)
        if why is None:
            verdict["kernel"] = "hopper (Gluon, sm_90)"
        elif key_padding.takes_hopper(q, k, v, bias, kw.get("alibi_slopes"), kpm, None, None, 0.0, case.causal, None):
            verdict["kernel"] = "hopper (Gluon, sm_90; key padding as a bias row)"
        else:
            verdict["kernel"] = f"general ({why})"
    return verdict


def _numerical_check(backend: str, device: str, dtype) -> dict:
    """One MPT-like problem (causal, ALiBi, GQA, left padding, odd length) against float64."""
    from mpt_attention.testing import AttnCase

    case = AttnCase(batch=2, s_q=37, s_k=37, n_heads=4, n_kv=2, head_dim=32, causal=True, alibi=True, padding=True)
    return _case_check(backend, device, dtype, case)


def _dense_check(backend: str, device: str, dtype) -> dict:
    """An unpadded causal ALiBi GQA problem (S=197, D=64): on an sm_90 GPU the triton backend runs it
    through the Hopper kernel, so the report says which forward kernel served it."""
    from mpt_attention.testing import AttnCase

    case = AttnCase(batch=2, s_q=197, s_k=197, n_heads=4, n_kv=2, head_dim=64, causal=True, alibi=True)
    return _case_check(backend, device, dtype, case)


def _varlen_check(backend: str, device: str, dtype) -> dict:
    """attention_varlen on three packed sequences (one empty, chunked-prefill lengths) against float64."""
    import mpt_attention as M
    from mpt_attention.testing import make_varlen_inputs, reference_attention_varlen

    q, k, v, cu_q, cu_k = make_varlen_inputs([29, 0, 13], [41, 5, 13], 4, 2, 32, dtype=dtype, device=device)
    slopes = M.gen_slopes(4, return_1d=True, device=device)
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend, causal=True, alibi_slopes=slopes)
    cpu = [t.cpu() for t in (q, k, v, cu_q, cu_k, slopes)]
    ref, _ = reference_attention_varlen(*cpu[:5], causal=True, alibi_slopes=cpu[5])
    low, _ = reference_attention_varlen(*cpu[:5], causal=True, alibi_slopes=cpu[5], compute_dtype=dtype)
    return _verdict(out, ref, low, dtype)


def _verdict(out, ref, low, dtype) -> dict:
    """The flash-attn rule: at most twice the error of the same math done in the tested precision."""
    import torch

    err = (out.cpu().double() - ref).abs().max().item()
    budget = 2 * (low.double() - ref).abs().max().item() + (1e-5 if dtype == torch.float32 else 1e-4)
    ok = err <= budget and not torch.isnan(out).any().item()
    return {"max_abs_error": err, "budget": budget, "ok": ok}


def _timing(backends: list[str], device: str, dtype) -> list[dict]:
    """Forward time of an MPT-7B attention layer's shape (32 heads of 128), scaled to the device."""
    import torch

    import mpt_attention as M
    from mpt_attention.testing import attention_flops

    if device == "cuda":
        batch, seq, heads, reps = 4, 2048, 32, 20
    else:
        batch, seq, heads, reps = 1, 512, 8, 3
    head_dim = 128
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    slopes = M.gen_slopes(heads, return_1d=True, device=device)
    flops = attention_flops(batch, heads, seq, seq, head_dim, causal=True)
    rows = []
    for backend in backends:
        if backend == "triton" and device == "cpu":
            rows.append({"backend": backend, "shape": f"B{batch} S{seq} H{heads} D{head_dim}", "ms": None,
                         "note": "skipped: the interpreter is for correctness, not speed"})
            continue

        def run():
            M.attention(q, k, v, backend=backend, causal=True, alibi_slopes=slopes)

        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        ms = sorted(times)[len(times) // 2] * 1e3
        rows.append({"backend": backend, "shape": f"B{batch} S{seq} H{heads} D{head_dim}", "ms": ms,
                     "tflops": flops / ms / 1e9})
    return rows


def check(device: str, as_json: bool) -> int:
    if device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    import mpt_attention as M

    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    report = {"versions": _versions(), "device": device, "dtype": str(dtype),
              "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        report["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    backends = {}
    for backend in M.BACKENDS:
        reason = M.backend_status(backend, device)
        entry = {"available": reason is None, "reason": reason}
        if reason is None:
            checks = (("check", _numerical_check), ("dense_check", _dense_check), ("varlen_check", _varlen_check))
            for key, fn in checks:
                try:
                    entry[key] = fn(backend, device, dtype)
                except Exception as exc:  # the report must show every backend's state, then fail
                    entry[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        backends[backend] = entry
    report["backends"] = backends
    passed = {b: all(e[key]["ok"] for key in ("check", "dense_check", "varlen_check"))
              for b, e in backends.items() if e["available"]}
    usable = [b for b, ok in passed.items() if ok]
    report["timing"] = _timing(usable, device, dtype)
    failed = [b for b, ok in passed.items() if not ok]
    report["ok"] = not failed
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 1 if failed else 0


def _print_report(report: dict) -> None:
    print("mpt-attention check")
    for name, version in report["versions"].items():
        print(f"  {name:14s} {version}")
    extra = f" ({report['gpu']}, sm_{report['capability'].replace('.', '')})" if "gpu" in report else ""
    print(f"  device         {report['device']}{extra}, {report['dtype']}, "
          f"TRITON_INTERPRET={report['triton_interpret']}")
    print("\nbackends (numerical checks against float64: causal ALiBi GQA padded S=37; dense S=197 D=64; varlen,"
          " 3 packed sequences)")
    for backend, entry in report["backends"].items():
        if not entry["available"]:
            print(f"  {backend:7s} unavailable: {entry['reason']}")
            continue
        for label, key in (("padded", "check"), ("dense", "dense_check"), ("varlen", "varlen_check")):
            chk = entry[key]
            if "error" in chk:
                print(f"  {backend:7s} {label:6s} FAIL  {chk['error']}")
            else:
                verdict = "PASS" if chk["ok"] else "FAIL"
                kernel = f"  [{chk['kernel']}]" if "kernel" in chk else ""
                print(f"  {backend:7s} {label:6s} {verdict}  max |error| {chk['max_abs_error']:.2e} "
                      f"(budget {chk['budget']:.1e}){kernel}")
    print("\ntiming (causal + ALiBi forward, median)")
    print(f"  {'backend':8s} {'shape':22s} {'ms':>9s} {'TFLOP/s':>8s}")
    for row in report["timing"]:
        if row["ms"] is None:
            print(f"  {row['backend']:8s} {row['shape']:22s} {'-':>9s} {'-':>8s}  {row['note']}")
        else:
            print(f"  {row['backend']:8s} {row['shape']:22s} {row['ms']:9.3f} {row['tflops']:8.3f}")
    print("\nresult:", "OK" if report["ok"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpt-attention", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="environment, backends, numerical check, timing")
    chk.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    chk.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    return check(args.device, args.json)


if __name__ == "__main__":
    sys.exit(main())
