"""The reach's norms pass (``reach.row_norm_max_kernel``: q's and k's per-head norm maxima) against a copy of the same
bytes, on the GPU (benchmarks/NOTES.md session 40):

    python benchmarks/norm_pass.py [--blocks 64,128,256] [--warps 4,8]

Per shape (bf16, (B, S, H, D) contiguous), the pass's time for each rows-per-program and warp count, its read rate,
and the rate of ``torch.Tensor.copy_`` of q and k (which reads and writes them: twice the bytes) in the same run; the
launcher's choice (``reach.norm_launch``) is marked. Times are torch.profiler kernel times (10 calls, median of 3).
"""

import argparse

import torch

from mpt_attention.impl.triton import reach
from mpt_attention.impl.triton.lean_launch import PlannedLaunch, cdiv, next_power_of_2
from mpt_attention.testing import profile_kernels

SHAPES = [(2, 16, 16, 8192, 128), (4, 32, 32, 4096, 64), (2, 32, 4, 8192, 128), (8, 16, 16, 2048, 128)]


def kernel_ms(step) -> float:
    """The step's GPU kernel time in ms (torch.profiler: its kernels' sum, averaged over 10 calls; median of 3)."""
    times = sorted(sum(ms for ms, _, _ in profile_kernels(step, steps=10)) for _ in range(3))
    return times[1]


def measure(batch, n_heads, n_kv, seq, head_dim, blocks, warps):
    q = torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seq, n_kv, head_dim, device="cuda", dtype=torch.bfloat16)
    words = torch.zeros(batch * (n_heads + n_kv), dtype=torch.int32, device="cuda")
    read = (q.numel() + k.numel()) * q.element_size()
    q2, k2 = torch.empty_like(q), torch.empty_like(k)
    copy_ms = kernel_ms(lambda: (q2.copy_(q), k2.copy_(k)))
    default, args, _ = reach.norm_launch(q, k, 0)
    cells = [f"copy {2 * read / copy_ms / 1e6:.0f} GB/s"]
    block_d = next_power_of_2(head_dim)
    for block_s in blocks:
        for num_warps in warps:
            launch = PlannedLaunch(reach.row_norm_max_kernel, (cdiv(seq, block_s) * 2, n_heads, batch),
                                   dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps))
            ms = kernel_ms(lambda launch=launch: launch(q, k, words, *args))
            mark = "*" if (block_s, num_warps) == (default.kwargs["BLOCK_S"], default.kwargs["num_warps"]) else ""
            cells.append(f"{block_s}x{num_warps}w{mark} {ms * 1e3:.1f} us {read / ms / 1e6:.0f} GB/s")
    print(f"B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim} ({read / 1e6:.0f} MB): " + "  ".join(cells), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="32,64,128,256", help="rows per program (comma-separated)")
    parser.add_argument("--warps", default="4,8", help="warps per program (comma-separated)")
    args = parser.parse_args()
    blocks = [int(x) for x in args.blocks.split(",")]
    warps = [int(x) for x in args.warps.split(",")]
    for shape in SHAPES:
        measure(*shape, blocks, warps)


if __name__ == "__main__":
    main()
