"""The Hopper backward with dQ from the dK/dV kernel's own dQ warpgroup (the default, ``deterministic=None``)
against the reproducible split (``deterministic=True``: the dQ kernel beside the dK/dV kernel), for
benchmarks/NOTES.md.

    python benchmarks/fused_dq.py [--rounds 3] [--fwd-bwd]

Per shape (bf16, causal ALiBi, as many KV heads as query heads: where the dQ warpgroup is dispatched): the
whole backward in each mode, alternated over rounds (median), the speed-up over the split, and dQ's largest
difference from the split's relative to its largest value; at D128 dK and dV come from the same consumers
in both modes and must agree bitwise (at D64 the split runs the general kernels).
``--fwd-bwd`` times forward+backward through the public op instead, as bench_attention.py does.
"""

import argparse
import statistics

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import launch

SHAPES = [(8, 16, 2048, 128), (2, 16, 8192, 128), (1, 16, 16384, 128), (4, 32, 4096, 64)]  # (B, H, S, D)


def _inputs(batch, heads, seq, dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))
    return q, k, v, dout, M.gen_slopes(heads, return_1d=True, device="cuda")


def measure(shape, rounds, fwd_bwd):
    q, k, v, dout, slopes = _inputs(*shape)
    scale = q.shape[-1] ** -0.5
    out, lse = launch.forward(q, k, v, None, slopes, None, None, None, None, scale, True, 0.0)

    def backward(deterministic):
        return launch.backward(dout, q, k, v, out, lse, None, None, slopes, None, None, None, None, scale,
                               True, 0.0, False, deterministic=deterministic)[:3]

    if fwd_bwd:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step(deterministic):
            o = M.attention(*leaves, backend="triton", causal=True, alibi_slopes=slopes, deterministic=deterministic)
            return torch.autograd.grad(o, leaves, dout)
    else:
        step = backward
    variants = {"split": True, "warpgroup": None}  # deterministic

    def run(name):
        return step(variants[name])

    grads = {name: run(name) for name in variants}
    ref = grads["split"]
    checks = []
    for name in list(variants)[1:]:
        dq_diff = (grads[name][0].float() - ref[0].float()).abs().max() / ref[0].float().abs().max()
        dkdv_equal = all(torch.equal(a, b) for a, b in zip(ref[1:], grads[name][1:]))
        checks.append(f"{name}: dQ rel. diff {dq_diff.item():.1e}, dK dV bitwise equal {dkdv_equal}")
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            times[name].append(do_bench(lambda name=name: run(name), warmup=25, rep=100, return_mode="median"))
    med = {name: statistics.median(t) for name, t in times.items()}
    b, h, s, d = shape
    what = "forward+backward" if fwd_bwd else "backward"
    cells = ", ".join(f"{name} {med[name]:.3f} ms ({med['split'] / med[name]:.3f}x)" for name in variants)
    print(f"B{b} H{h} S{s} D{d} {what}: {cells}", flush=True)
    print("   rounds: " + "; ".join(f"{name} {' '.join(f'{t:.3f}' for t in ts)}" for name, ts in times.items()))
    print("   " + "; ".join(checks), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fwd-bwd", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in SHAPES:
        measure(shape, args.rounds, args.fwd_bwd)


if __name__ == "__main__":
    main()
