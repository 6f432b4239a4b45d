"""WIP A/B on the GPU: the Hopper forward at D=64 with 2 consumer warpgroups (128-row tiles, 128-key
blocks) against 3 (192-row tiles, 64-key blocks, as FA3 tiles D=64), for benchmarks/NOTES.md.

    python benchmarks/fwd_d64.py

TFLOP/s per setting (bf16, causal; ALiBi slopes and no bias) and the largest difference of each
output from the general kernel's.
"""

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper
from mpt_attention.testing import attention_flops

SHAPES = [(4, 32, 4096, 64), (8, 16, 2048, 64), (1, 16, 16384, 64)]


def measure(batch, heads, seq, dim):
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    slopes = M.gen_slopes(heads, return_1d=True, device="cuda")
    flops = attention_flops(batch, heads, seq, seq, dim, causal=True, mode="fwd")
    for name, kw in (("alibi", {"alibi_slopes": slopes}), ("no-bias", {})):
        def run(kw=kw):
            return M.attention(q, k, v, backend="triton", causal=True, **kw)

        hopper.ENABLED = False
        ref = run()
        hopper.ENABLED = True
        cells = []
        for consumers in (2, 3):
            hopper.FWD_D64_CONSUMERS = consumers
            diff = (run().float() - ref.float()).abs().max().item()
            ms = do_bench(run, warmup=25, rep=100, return_mode="median")
            cells.append(f"{consumers} warpgroups {flops / ms / 1e9:.0f} TFLOP/s (max diff {diff:.1e})")
        print(f"B{batch} H{heads} S{seq} D{dim} {name}: " + "; ".join(cells), flush=True)
    hopper.FWD_D64_CONSUMERS = 3


def main():
    for shape in SHAPES:
        measure(*shape)


if __name__ == "__main__":
    main()
