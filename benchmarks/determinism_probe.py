"""Which output of the Triton backend changes between identical runs, under which block config."""
import torch
import mpt_attention as M
from mpt_attention.impl.triton import hopper, launch, launch_backward
from mpt_attention.testing import AttnCase, make_inputs

hopper.ENABLED = False  # the probed configs belong to the general kernels


def cfg(t):
    return dict(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2], num_stages=t[3])


def probe(label, case):
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    runs = []
    for _ in range(4):
        out = M.attention(q, k, v, backend="triton", **kw)
        runs.append((out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out))))
    for name, i in (("out", 0), ("dq", 1), ("dk", 2), ("dv", 3)):
        diffs = [(runs[0][i].float() - r[i].float()).abs().max().item() for r in runs[1:]]
        print(f"{label:40s} {name}: max diff over 3 reruns {max(diffs):.3e}", flush=True)


CASE = AttnCase(2, 1500, 1500, 8, 2, 128, causal=True, alibi=True, padding=True)
default_fwd, default_bwd = launch._fwd_config, launch_backward._bwd_config
for fwd, kv, dq in [((64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3)),
                    ((64, 64, 4, 3), (32, 64, 4, 2), (128, 64, 8, 2)),
                    ((128, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2)),
                    ((64, 64, 4, 3), (32, 64, 4, 1), (128, 64, 8, 1))]:
    launch._fwd_config = lambda d, full_bias=False, fwd=fwd: cfg(fwd)
    launch_backward._bwd_config = lambda d, atomic_dq=False, wide_ds=False, kv=kv, dq=dq: (cfg(kv), cfg(dq))
    probe(f"fwd{fwd} kv{kv} dq{dq}", CASE)
    probe("  same, no padding", AttnCase(2, 1500, 1500, 8, 2, 128, causal=True, alibi=True))
