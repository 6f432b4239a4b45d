"""One causal ALiBi forward through each forward kernel, for a profiler (benchmarks/NOTES.md):

    ncu --clock-control none -k regex:fwd_kernel --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_fwd.py [B H S D] [--bias-row | --no-bias]

Runs the Hopper (Gluon) kernel, then the general Triton kernel, each twice (the first call compiles).
``--bias-row``: MPT's float32 (1, H, 1, S) bias tensor instead of the slopes (the same scores); ``--no-bias``: causal
attention without ALiBi (the loop ALiBi's is measured against).
"""
import sys

import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper

args = [a for a in sys.argv[1:] if a not in ("--bias-row", "--no-bias")]
batch, heads, seq, dim = (int(x) for x in (args[:4] if len(args) > 3 else (2, 16, 8192, 128)))
q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
if "--no-bias" in sys.argv:
    alibi = {}
elif "--bias-row" in sys.argv:
    alibi = {"attn_bias": M.build_alibi_bias(heads, seq, device="cuda")}
else:
    alibi = {"alibi_slopes": M.gen_slopes(heads, return_1d=True, device="cuda")}
for enabled in (True, False):
    hopper.ENABLED = enabled
    for _ in range(2):
        M.attention(q, k, v, backend="triton", causal=True, **alibi)
torch.cuda.synchronize()
