"""A dense (B, H, S_q, S_k) bias with its gradient: where the time goes, and the dQ routes compared.

    python benchmarks/dense_bias.py [--sweep] [--head-dim D] [--causal] [--no-kernels] [--forward-routes]

Issue 3 asks for >= 3x SDPA memory-efficient with the same bias, forward+backward. For each shape:
1. forward alone and forward+backward by do_bench, ours by default (on an H200: one Hopper kernel for dQ,
   dK, dV and dbias, its dQ warpgroup storing dS), ours with ``deterministic=True`` (dQ from the stored dS
   by one GEMM, or the dQ kernel: ``launch_backward.DQ_FROM_STORED_DS``), and SDPA memory-efficient, alternated
   twice so drift shows;
2. kernel durations inside one forward+backward of ours (torch.profiler), their sum, and the host's time per
   step (20 steps queued without a sync): a step whose host time exceeds its kernels' is host-bound.
``--sweep``: block configurations of the general forward and dK/dV kernels with the dense bias instead.
``--head-dim D``: only the shapes of that head dim; ``--causal``: only the causal ones; ``--no-kernels``: without
step 2.
``--wide-ds``: instead, a float32 bias matrix with its gradient (bf16 inputs), whose dS the dQ kernel stores: that
kernel's block configurations at D 96/128 (three stages of the default do not fit,
``launch_backward._bwd_config``), against ours with the bias in bf16 and SDPA memory-efficient with the bias in
bf16, forward+backward, best of two rounds.
``--forward-routes``: instead, the forward alone with ALiBi slopes and a bias matrix (no gradients) at D128, on
the Gluon forward and on the general one (``hopper.ENABLED``), best of two alternated rounds.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper, launch, launch_backward
from mpt_attention.testing import profile_kernels

DEV, DTYPE = "cuda", torch.bfloat16
SHAPES = [  # batch, query heads, kv heads, seq, head dim, causal
    (4, 16, 16, 2048, 128, False),  # bench_attention.py's dense-bias row
    (4, 16, 16, 2048, 128, True),
    (2, 32, 4, 2048, 128, False),
    (4, 32, 32, 2048, 64, False),
]


def flops(batch, heads, seq, dim, causal, mode):
    fwd = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def providers(batch, heads, kv_heads, seq, dim, causal):
    gen = torch.Generator(device=DEV).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=DEV, dtype=DTYPE, generator=gen).requires_grad_()
    q, k, v = rand(batch, seq, heads, dim), rand(batch, seq, kv_heads, dim), rand(batch, seq, kv_heads, dim)
    bias = rand(batch, heads, seq, seq)
    group = heads // kv_heads
    qh = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kh, vh = (x.detach().transpose(1, 2).repeat_interleave(group, 1).contiguous().requires_grad_() for x in (k, v))

    def ours(dq_from_ds, deterministic):
        def run():
            launch_backward.DQ_FROM_STORED_DS = dq_from_ds
            return M.attention(q, k, v, backend="triton", causal=causal, attn_bias=bias, deterministic=deterministic)
        return run, [q, k, v, bias]

    def memeff():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, is_causal=False) if not causal else \
                F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias + causal_mask)

    causal_mask = torch.full((seq, seq), float("-inf"), device=DEV, dtype=DTYPE).triu(1)
    return {"default": ours(True, None), "dq-gemm": ours(True, True), "dq-kernel": ours(False, True),
            "memeff": (memeff, [qh, kh, vh, bias])}


def time_it(fn, grads, mode):
    out = fn()
    if mode == "fwd":
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    dout = torch.randn_like(out)
    return do_bench(lambda: fn().backward(dout), warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def kernel_table(fn, grads, label):
    dout = torch.randn_like(fn())

    def step():  # as do_bench's grad_to_none: no gradient accumulation kernels in the table
        for t in grads:
            t.grad = None
        fn().backward(dout)

    kernels = profile_kernels(step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    host_ms = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    print(f"  kernels in one forward+backward, {label}: sum {sum(k[0] for k in kernels):.3f} ms, "
          f"host {host_ms:.3f} ms per step")
    for ms, count, name in kernels[:10]:
        print(f"    {ms:8.3f} ms  {count:3d}x  {name[:100]}")


FWD_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
               for bm, bn, w, st in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 128, 4, 2),
                                     (128, 128, 8, 2))]
DKDV_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                for bm, bn, w, st in ((128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 128, 8, 1),
                                      (64, 64, 4, 2))]


def sweep():
    """Block configurations of the general forward and dK/dV kernels with a dense bias (D=128, the dQ GEMM)."""
    fwd_config, bwd_config = launch._fwd_config, launch_backward._bwd_config
    for batch, heads, kv_heads, seq, dim, causal in SHAPES[:2]:
        fn, grads = providers(batch, heads, kv_heads, seq, dim, causal)["dq-gemm"]  # the general kernels
        print(f"\n== sweep, B{batch} H{heads}/{kv_heads} S{seq} D{dim} {'causal' if causal else 'full'}")
        for cfg in FWD_CONFIGS:
            launch._fwd_config = lambda head_dim, full_bias=False, cfg=cfg: dict(cfg)
            try:
                print(f"  fwd  {cfg}: {time_it(fn, grads, 'fwd'):.3f} ms")
            except Exception as exc:
                print(f"  fwd  {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
        launch._fwd_config = fwd_config
        fwd_ms = time_it(fn, grads, "fwd")
        for cfg in DKDV_CONFIGS:
            launch_backward._bwd_config = lambda head_dim, atomic_dq=False, wide_ds=False, cfg=cfg: (
                dict(cfg), bwd_config(head_dim, wide_ds=wide_ds)[1])
            try:
                ms = time_it(fn, grads, "fwd_bwd")
                print(f"  dkdv {cfg}: fwd+bwd {ms:.3f} ms (backward ~{ms - fwd_ms:.3f})")
            except Exception as exc:
                print(f"  dkdv {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
        launch_backward._bwd_config = bwd_config


DQ_WIDE_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                   for bm, bn, w, st in ((128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2))]


def wide_ds():
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bwd_config = launch_backward._bwd_config
    for batch, heads, seq, dim, causal in ((4, 16, 2048, 128, False), (4, 16, 2048, 128, True),
                                           (4, 16, 2048, 96, True)):
        provs = providers(batch, heads, heads, seq, dim, causal)
        fn16, grads16 = provs["default"]
        q, k, v, bias16 = grads16
        bias32 = bias16.detach().float().requires_grad_()
        fn32 = lambda: M.attention(q, k, v, backend="triton", causal=causal, attn_bias=bias32)
        runs = {f"fp32 bias dq {tuple(c.values())}": c for c in DQ_WIDE_CONFIGS}
        times = {name: [] for name in [*runs, "bf16 bias (ours)", "bf16 bias memeff"]}
        for _ in range(2):
            for name, cfg in runs.items():
                launch_backward._bwd_config = lambda d, atomic_dq=False, wide_ds=False, cfg=cfg: (
                    bwd_config(d, atomic_dq)[0], dict(cfg))
                try:
                    times[name].append(time_it(fn32, [q, k, v, bias32], "fwd_bwd"))
                except Exception as exc:
                    print(f"  {name}: {type(exc).__name__}: {str(exc)[:100]}")
                launch_backward._bwd_config = bwd_config
            times["bf16 bias (ours)"].append(time_it(fn16, grads16, "fwd_bwd"))
            times["bf16 bias memeff"].append(time_it(*provs["memeff"], "fwd_bwd"))
        print(f"\n== fp32 bias matrix with grad, B{batch} H{heads} S{seq} D{dim} {'causal' if causal else 'full'}, "
              f"fwd+bwd")
        for name, ts in times.items():
            if ts:
                print(f"  {name:34s} {' '.join(f'{t:.3f}' for t in ts)} ms")


def forward_routes():
    for batch, heads, kv_heads, seq, dim, causal in [(4, 16, 16, 2048, 128, True), (2, 32, 4, 2048, 128, False),
                                                     (4, 16, 16, 2048, 128, False)]:
        q = torch.randn(batch, seq, heads, dim, device=DEV, dtype=DTYPE)
        k, v = (torch.randn(batch, seq, kv_heads, dim, device=DEV, dtype=DTYPE) for _ in range(2))
        bias = torch.randn(batch, heads, seq, seq, device=DEV, dtype=DTYPE)
        slopes = M.gen_slopes(heads, return_1d=True, device=DEV)
        times = {True: [], False: []}
        for _ in range(2):
            for gluon in (True, False):
                hopper.ENABLED = gluon
                fn = lambda: M.attention(q, k, v, backend="triton", causal=causal, alibi_slopes=slopes, attn_bias=bias)
                times[gluon].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        hopper.ENABLED = True
        gluon_ms, general_ms = min(times[True]), min(times[False])
        print(f"fwd slopes + bias B{batch} H{heads}/{kv_heads} S{seq} D{dim} causal={causal}: Gluon {gluon_ms:.3f} ms, "
              f"general {general_ms:.3f} ms, {general_ms / gluon_ms:.2f}x")


def main():
    if "--sweep" in sys.argv:
        return sweep()
    if "--forward-routes" in sys.argv:
        return forward_routes()
    if "--wide-ds" in sys.argv:
        return wide_ds()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    only = int(sys.argv[sys.argv.index("--head-dim") + 1]) if "--head-dim" in sys.argv else None
    for batch, heads, kv_heads, seq, dim, causal in SHAPES:
        if (only is not None and dim != only) or ("--causal" in sys.argv and not causal):
            continue
        label = f"B{batch} H{heads}/{kv_heads} S{seq} D{dim} {'causal' if causal else 'full'}"
        print(f"\n== dense bias with grad, {label}")
        provs = providers(batch, heads, kv_heads, seq, dim, causal)
        for mode in ("fwd", "fwd_bwd"):
            results = {name: [] for name in provs}
            for _ in range(2):
                for name, (fn, grads) in provs.items():
                    if mode == "fwd" and name in ("dq-gemm", "dq-kernel"):  # the same forward as the default
                        continue
                    try:
                        results[name].append(time_it(fn, grads, mode))
                    except Exception as exc:  # a peer that refuses a shape is reported, not fatal
                        print(f"  {name} {mode}: {type(exc).__name__}: {str(exc)[:120]}")
                        break
            base = min(results["memeff"]) if results["memeff"] else float("nan")
            for name, times in results.items():
                if times:
                    ms = min(times)
                    tf = flops(batch, heads, seq, dim, causal, mode) / ms / 1e9
                    print(f"  {mode:8s} {name:10s} {' '.join(f'{t:.3f}' for t in times)} ms  {tf:6.1f} TFLOP/s"
                          f"  memeff/this {base / ms:.2f}x")
        if "--no-kernels" not in sys.argv:
            for name in ("default", "dq-gemm"):
                kernel_table(*provs[name], name)
    launch_backward.DQ_FROM_STORED_DS = True


if __name__ == "__main__":
    main()
