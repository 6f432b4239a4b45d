"""The Hopper backward with dQ from the dK/dV kernel's own dQ warpgroup (the default, ``deterministic=None``)
against the reproducible split (``deterministic=True``: the dQ kernel beside the dK/dV kernel), for
benchmarks/NOTES.md.

    python benchmarks/fused_dq.py [--rounds 3] [--fwd-bwd]

Per shape (bf16, causal ALiBi, as many KV heads as query heads: where the dQ warpgroup is dispatched): the
whole backward in each mode, alternated over rounds (median), the speed-up over the split, and dQ's largest
difference from the split's relative to its largest value; at D128 dK and dV come from the same consumers
in both modes and must agree bitwise (at D64 the split runs the general kernels).
``--fwd-bwd`` times forward+backward through the public op instead, as bench_attention.py does.
``--gqa 1 2 4``: grouped-head shapes, the warpgroup with 1, 2 and 4 query heads per program.
``--padded``: head dims run in tiles of 128 (replit-code's D80, D96, MPT-30B's D112 with its 56 heads).
``--first-write``: where the consumers form dQ, each 64-query block's first program storing into the unzeroed
dQ sums (``hopper.FIRST_WRITE_DQ``, the default) against all of them adding into zeros the delta kernel writes:
the backward alone and forward+backward through the public op, alternated (the kernels differ only there).
"""

import argparse
import statistics

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper, launch, launch_backward

SHAPES = [(8, 16, 16, 2048, 128), (2, 16, 16, 8192, 128), (1, 16, 16, 16384, 128), (4, 32, 32, 4096, 64)]
PADDED_SHAPES = [(4, 32, 32, 4096, 80), (2, 16, 16, 8192, 96), (2, 56, 56, 4096, 112)]
GQA_SHAPES = [(2, 32, 4, 8192, 128), (8, 32, 4, 2048, 128), (4, 32, 8, 4096, 64)]  # (B, H_q, H_kv, S, D)


def _inputs(batch, heads, kv_heads, seq, dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(2))
    k, v = (torch.randn(batch, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    return q, k, v, dout, M.gen_slopes(heads, return_1d=True, device="cuda")


def measure(shape, rounds, fwd_bwd, group_heads=()):
    q, k, v, dout, slopes = _inputs(*shape)
    scale = q.shape[-1] ** -0.5
    out, lse = launch.forward(q, k, v, None, slopes, None, None, None, None, scale, True, 0.0)

    def backward(deterministic):
        return launch_backward.backward(dout, q, k, v, out, lse, None, None, slopes, None, None, None, None, scale,
                                        True, 0.0, False, deterministic=deterministic)[:3]

    if fwd_bwd:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step(deterministic):
            o = M.attention(*leaves, backend="triton", causal=True, alibi_slopes=slopes, deterministic=deterministic)
            return torch.autograd.grad(o, leaves, dout)
    else:
        step = backward
    variants = {"split": (True, 0), "warpgroup": (None, 0)}  # (deterministic, query heads per program)
    if group_heads:
        variants = {"split": (True, 0), **{f"warpgroup, {n} heads/program": (None, n) for n in group_heads}}

    def run(name):
        det, heads = variants[name]
        if heads:
            hopper.FUSED_GROUP_HEADS = heads
        return step(det)

    grads = {name: run(name) for name in variants}
    ref = grads["split"]
    checks = []
    for name in list(variants)[1:]:
        dq_diff = (grads[name][0].float() - ref[0].float()).abs().max() / ref[0].float().abs().max()
        dkdv = " ".join(f"{n} {((a.float() - b.float()).abs().max() / b.float().abs().max()).item():.1e}"
                        for n, a, b in zip(("dK", "dV"), grads[name][1:], ref[1:]))
        checks.append(f"{name}: rel. diff dQ {dq_diff.item():.1e} {dkdv}")
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            times[name].append(do_bench(lambda name=name: run(name), warmup=25, rep=100, return_mode="median"))
    med = {name: statistics.median(t) for name, t in times.items()}
    b, h, hkv, s, d = shape
    what = "forward+backward" if fwd_bwd else "backward"
    cells = ", ".join(f"{name} {med[name]:.3f} ms ({med['split'] / med[name]:.3f}x)" for name in variants)
    print(f"B{b} H{h}/{hkv} S{s} D{d} {what}: {cells}", flush=True)
    print("   rounds: " + "; ".join(f"{name} {' '.join(f'{t:.3f}' for t in ts)}" for name, ts in times.items()))
    print("   " + "; ".join(checks), flush=True)


FIRST_WRITE_SHAPES = [(8, 16, 16, 2048, 128), (2, 16, 16, 8192, 128), (8, 32, 4, 2048, 128), (4, 32, 32, 2048, 96)]


def measure_first_write(shape, rounds):
    q, k, v, dout, slopes = _inputs(*shape)
    scale = q.shape[-1] ** -0.5
    out, lse = launch.forward(q, k, v, None, slopes, None, None, None, None, scale, True, 0.0)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def backward():
        return launch_backward.backward(dout, q, k, v, out, lse, None, None, slopes, None, None, None, None, scale,
                                        True, 0.0, False, deterministic=None)[:3]

    def fwd_bwd():
        o = M.attention(*leaves, backend="triton", causal=True, alibi_slopes=slopes)
        return torch.autograd.grad(o, leaves, dout)

    grads = {}
    for flag in (True, False):
        hopper.FIRST_WRITE_DQ = flag
        grads[flag] = backward()
    dq_diff = (grads[True][0].float() - grads[False][0].float()).abs().max() / grads[False][0].float().abs().max()
    same_dkdv = all(torch.equal(a, b) for a, b in zip(grads[True][1:], grads[False][1:]))
    times = {(what, flag): [] for what in ("backward", "fwd+bwd") for flag in (True, False)}
    for r in range(rounds):
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            hopper.FIRST_WRITE_DQ = flag
            for what, fn in (("backward", backward), ("fwd+bwd", fwd_bwd)):
                times[(what, flag)].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    hopper.FIRST_WRITE_DQ = True
    b, h, hkv, s, d = shape
    cells = []
    for what in ("backward", "fwd+bwd"):
        new, old = statistics.median(times[(what, True)]), statistics.median(times[(what, False)])
        wins = sum(a < b for a, b in zip(times[(what, True)], times[(what, False)]))
        cells.append(f"{what} first-write {new:.3f} ms, zeros {old:.3f} ms ({old / new:.3f}x, {wins}/{rounds} rounds)")
    print(f"B{b} H{h}/{hkv} S{s} D{d}: " + "; ".join(cells), flush=True)
    print(f"   dQ rel. diff {dq_diff.item():.1e}, dK dV bitwise equal: {same_dkdv}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fwd-bwd", action="store_true")
    parser.add_argument("--padded", action="store_true", help="D 80, 96, 112 (tiles of 128) instead")
    parser.add_argument("--first-write", action="store_true", help="the first-write dQ sums against zeroed ones")
    parser.add_argument("--gqa", type=int, nargs="*", help="grouped-head shapes instead, the warpgroup with each of "
                        "these query heads per program (hopper.FUSED_GROUP_HEADS)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.first_write:
        for shape in FIRST_WRITE_SHAPES:
            measure_first_write(shape, args.rounds)
        return
    for shape in GQA_SHAPES if args.gqa else PADDED_SHAPES if args.padded else SHAPES:
        measure(shape, args.rounds, args.fwd_bwd, tuple(args.gqa or ()))


if __name__ == "__main__":
    main()
