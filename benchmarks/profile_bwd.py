"""One causal ALiBi backward as dispatched (Hopper dK/dV kernel beside the general dQ kernel), for a
profiler (benchmarks/NOTES.md):

    ncu --clock-control none -k regex:"dkdv|dq_kernel" --launch-skip 2 --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_bwd.py [B H S D]

Runs the backward twice (the first call compiles); ``--launch-skip 2`` profiles the second.
"""
import sys

import torch

import mpt_attention as M

batch, heads, seq, dim = (int(x) for x in (sys.argv[1:5] if len(sys.argv) > 4 else (2, 16, 8192, 128)))
q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
slopes = M.gen_slopes(heads, return_1d=True, device="cuda")
out = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
dout = torch.randn_like(out)
for _ in range(2):
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
torch.cuda.synchronize()
