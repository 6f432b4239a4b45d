"""The backward's kernels on the GPU, general Triton against the Hopper (Gluon) dK/dV kernel, for
benchmarks/NOTES.md: which kernel the dispatcher should pick at each head dim.

    python benchmarks/bwd_kernels.py

For each shape (bf16, causal ALiBi): the whole backward with the Hopper kernels off and on (as
dispatched; at a head dim the dispatcher keeps from the Hopper dK/dV kernel also with it forced on),
the Hopper dK/dV kernel called directly,
and its gradients' largest difference from the general kernels' relative to the gradient's largest value.
Per-kernel times of the general backward: ``benchmarks/host_overhead.py --kernels``.
"""

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper, hopper_dkdv, launch, launch_backward, plans

SHAPES = [(2, 16, 8192, 128), (4, 32, 4096, 64), (8, 16, 2048, 128)]


def measure(batch, heads, seq, dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))
    slopes = M.gen_slopes(heads, return_1d=True, device="cuda")
    scale = dim**-0.5
    out, lse = launch.forward(q, k, v, None, slopes, None, None, None, None, scale, True, 0.0)
    # the Hopper kernel's row terms (log2-domain LSE offsets and delta), as the backward writes them
    row_stats = hopper_dkdv.row_stats_buffer(batch, heads, seq, q.device)
    plans.row_terms(out, dout, lse, None, torch.empty_like(lse), row_stats=row_stats)

    def whole(enabled):
        hopper.ENABLED = enabled
        return launch_backward.backward(dout, q, k, v, out, lse, None, None, slopes, None, None, None, None, scale,
                                        True, 0.0, False)[:3]

    def dkdv():
        hopper_dkdv.backward_dkdv(q, k, v, dout, row_stats, dk, dv, None, slopes, scale, True, 1)

    ref = whole(False)
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    dkdv()
    err = " ".join(f"{n} {((a.float() - r.float()).abs().max() / r.float().abs().max()).item():.1e}"
                   for n, a, r in (("dk", dk, ref[1]), ("dv", dv, ref[2])))
    general = do_bench(lambda: whole(False), warmup=25, rep=100, return_mode="median")
    dispatched = do_bench(lambda: whole(True), warmup=25, rep=100, return_mode="median")
    forced = ""
    # the whole backward as it would be if the Hopper kernel were dispatched (packages older than the switch:
    # benchmarks/ab.sh times them too, so no forced run)
    if dim not in getattr(hopper, "BWD_HEAD_DIMS", (dim,)):
        dims, hopper.BWD_HEAD_DIMS = hopper.BWD_HEAD_DIMS, (*hopper.BWD_HEAD_DIMS, dim)
        try:
            ms = do_bench(lambda: whole(True), warmup=25, rep=100, return_mode="median")
        finally:
            hopper.BWD_HEAD_DIMS = dims
        forced = f", with the hopper dK/dV kernel {ms:.3f} ms"
    print(f"B{batch} H{heads} S{seq} D{dim}: backward general {general:.3f} ms, dispatched {dispatched:.3f} ms"
          f"{forced}; hopper dK/dV {do_bench(dkdv, warmup=25, rep=100, return_mode='median'):.3f} ms "
          f"(rel. diff to general: {err})", flush=True)


def main():
    for shape in SHAPES:
        measure(*shape)
    hopper.ENABLED = True


if __name__ == "__main__":
    main()
