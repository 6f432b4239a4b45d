"""Sweep block sizes / warps / stages of the Triton kernels on the GPU (causal ALiBi, bf16).

    python benchmarks/tune_blocks.py            prints TFLOP/s per config, best first per kernel
    python benchmarks/tune_blocks.py --general-fwd
                                                the general forward's tiles on the inputs it serves on
                                                Hopper (masks, varlen, D96), alternated twice

The winners go into ``_fwd_config`` / ``_bwd_config`` in ``impl/triton/launch.py`` by hand, with the
measurement in ``benchmarks/NOTES.md``.
"""


import sys

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper, launch, launch_backward
from mpt_attention.padding import unpad
from mpt_attention.testing import attention_flops

FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
       (128, 64, 8, 4), (128, 128, 8, 4), (64, 64, 4, 4), (128, 32, 4, 4)]
BWD_KV = [(64, 128, 8, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
          (64, 64, 8, 2), (128, 128, 8, 2)]
BWD_Q = [(128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 8, 2)]


def cfg(t):
    return dict(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2], num_stages=t[3])


def bench(batch, heads, seq, head_dim, mode):
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    slopes = M.gen_slopes(heads, return_1d=True, device="cuda")
    fn = lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
    flops = attention_flops(batch, heads, seq, seq, head_dim, True, mode)
    if mode == "fwd":
        return flops / do_bench(fn, warmup=25, rep=80, return_mode="median") / 1e9
    dout = torch.randn_like(q)
    ms = do_bench(lambda: fn().backward(dout), warmup=25, rep=80, grad_to_none=[q, k, v], return_mode="median")
    return flops / ms / 1e9


def sweep(label, shape, mode, patch, options):
    results = []
    for opt in options:
        patch(opt)
        try:
            results.append((bench(*shape, mode), opt))
        except Exception as exc:
            print(f"  {label} {opt}: {type(exc).__name__}: {str(exc)[:120]}")
    results.sort(reverse=True)
    for tf, opt in results:
        print(f"{label:10s} {str(shape):24s} {str(opt):22s} {tf:7.1f} TFLOP/s", flush=True)
    return results[0][1] if results else options[0]


GENERAL_FWD = {128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
               64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]}


def general_fwd_cases():
    """(label, head dim, fn, real FLOPs) for what the general forward serves even on sm_90."""
    dev, dt = "cuda", torch.bfloat16
    cases = []
    for batch, heads, seq, dim in ((8, 16, 2048, 128), (2, 16, 8192, 128), (4, 16, 4096, 96), (4, 32, 4096, 64)):
        q, k, v = (torch.randn(batch, seq, heads, dim, device=dev, dtype=dt) for _ in range(3))
        slopes = M.gen_slopes(heads, return_1d=True, device=dev)
        cases.append((f"alibi B{batch} S{seq} D{dim}", dim,
                      lambda q=q, k=k, v=v, s=slopes: M.attention(q, k, v, backend="triton", causal=True,
                                                                  alibi_slopes=s),
                      attention_flops(batch, heads, seq, seq, dim, True)))
    batch, heads, seq, dim = 8, 16, 4096, 128
    q, k, v = (torch.randn(batch, seq, heads, dim, device=dev, dtype=dt) for _ in range(3))
    slopes = M.gen_slopes(heads, return_1d=True, device=dev)
    lengths = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=torch.Generator().manual_seed(2))
    kpm = (torch.arange(seq).view(1, seq) < lengths.view(batch, 1)).to(dev)
    real = sum(attention_flops(1, heads, int(n), int(n), dim, True) for n in lengths)
    cases.append(("padded (key_padding_mask)", dim,
                  lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes,
                                      key_padding_mask=kpm), real))
    (qp, kp, vp), (_, cu, max_len) = [unpad(t, kpm)[0] for t in (q, k, v)], unpad(q, kpm)[1:]
    cases.append(("varlen (same batch)", dim, lambda: M.attention_varlen(qp, kp, vp, cu, cu, max_len, max_len,
                                                                          backend="triton", causal=True,
                                                                          alibi_slopes=slopes), real))
    return cases


def general_fwd():
    hopper.ENABLED = False
    default_fwd = launch._fwd_config
    for label, dim, fn, flops in general_fwd_cases():
        options = GENERAL_FWD[128 if dim > 64 else 64]
        times = {opt: [] for opt in options}
        for _ in range(2):
            for opt in options:
                launch._fwd_config = lambda d, full_bias=False, opt=opt: cfg(opt)
                try:
                    times[opt].append(do_bench(fn, warmup=25, rep=80, return_mode="median"))
                except Exception as exc:
                    print(f"  {label} {opt}: {type(exc).__name__}: {str(exc)[:120]}")
        launch._fwd_config = default_fwd
        for opt, ts in times.items():
            if ts:
                print(f"{label:28s} {str(opt):18s} {' '.join(f'{t:.3f}' for t in ts)} ms "
                      f"{flops / min(ts) / 1e9:7.1f} TFLOP/s", flush=True)


def main():
    if "--general-fwd" in sys.argv:
        return general_fwd()
    hopper.ENABLED = False  # the configs below belong to the general kernels; on sm_90 the Hopper kernel would run
    default_fwd, default_bwd = launch._fwd_config, launch_backward._bwd_config
    for head_dim, shape in ((128, (4, 16, 4096, 128)), (64, (4, 32, 4096, 64))):
        def patch_fwd(opt):
            launch._fwd_config = lambda d, full_bias=False: cfg(opt)
        best_fwd = sweep(f"fwd D{head_dim}", shape, "fwd", patch_fwd, FWD)
        launch._fwd_config = default_fwd
        q_default = default_bwd(head_dim)[1]
        q_tuple = (q_default["BLOCK_M"], q_default["BLOCK_N"], q_default["num_warps"], q_default["num_stages"])

        def patch_kv(opt):
            launch_backward._bwd_config = lambda d, atomic_dq=False, wide_ds=False: (cfg(opt), cfg(q_tuple))
        best_kv = sweep(f"dkdv D{head_dim}", shape, "fwd_bwd", patch_kv, BWD_KV)

        def patch_q(opt):
            launch_backward._bwd_config = lambda d, atomic_dq=False, wide_ds=False: (cfg(best_kv), cfg(opt))
        best_q = sweep(f"dq D{head_dim}", shape, "fwd_bwd", patch_q, BWD_Q)
        launch_backward._bwd_config = default_bwd
        print(f"BEST D{head_dim}: fwd {best_fwd} dkdv {best_kv} dq {best_q}", flush=True)


if __name__ == "__main__":
    main()
