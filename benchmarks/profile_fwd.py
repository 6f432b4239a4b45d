"""One causal ALiBi forward through each forward kernel, for a profiler (benchmarks/NOTES.md):

    ncu --clock-control none -k regex:fwd_kernel --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_fwd.py [B H S D]

Runs the Hopper (Gluon) kernel, then the general Triton kernel, each twice (the first call compiles).
"""
import sys

import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper

batch, heads, seq, dim = (int(x) for x in (sys.argv[1:5] if len(sys.argv) > 4 else (2, 16, 8192, 128)))
q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
slopes = M.gen_slopes(heads, return_1d=True, device="cuda")
for enabled in (True, False):
    hopper.ENABLED = enabled
    for _ in range(2):
        M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
torch.cuda.synchronize()
