"""One causal ALiBi backward as dispatched (Hopper dK/dV kernel beside the general dQ kernel), for a
profiler (benchmarks/NOTES.md):

    ncu --clock-control none -k regex:"dkdv|dq_kernel" --launch-skip 2 --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_bwd.py [B H S D] [--bias-row]

Runs the backward twice (the first call compiles); ``--launch-skip 2`` profiles the second.
``--bias-row``: MPT's float32 (1, H, 1, S) bias tensor instead of the slopes (the same scores).
"""
import sys

import torch

import mpt_attention as M

args = [a for a in sys.argv[1:] if a != "--bias-row"]
batch, heads, seq, dim = (int(x) for x in (args[:4] if len(args) > 3 else (2, 16, 8192, 128)))
q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
if "--bias-row" in sys.argv:
    alibi = {"attn_bias": M.build_alibi_bias(heads, seq, device="cuda")}
else:
    alibi = {"alibi_slopes": M.gen_slopes(heads, return_1d=True, device="cuda")}
out = M.attention(q, k, v, backend="triton", causal=True, **alibi)
dout = torch.randn_like(out)
for _ in range(2):
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
torch.cuda.synchronize()
