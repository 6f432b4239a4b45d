"""Where the time of a padded batch's ``key_padding_mask`` call goes, beside the same batch read in place as
sequences with ``seqused`` (``attention_varlen``) and run dense:

    python benchmarks/padding_kernels.py [B H S D] [--host-profile]

The extras' padded batch (bench_attention.run_padding: ~50% right padding, causal ALiBi from slopes, default
B8 H16 S4096 D128). For each call, forward and forward+backward: each GPU kernel's time per
call (torch.profiler, ``testing.profile_kernels``) and the host's microseconds per call with the GPU queue kept
full (a call whose host time exceeds its kernels' is bound by the host, not the GPU). ``--host-profile``: also
cProfile's top functions (by own time) over 20 forward+backward calls of each.
"""

from __future__ import annotations

import sys

import torch

import mpt_attention as M
from mpt_attention.padding import right_padded
from mpt_attention.testing import host_us, profile_host, profile_kernels


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    batch, heads, seq, dim = (int(x) for x in (args[:4] if len(args) > 3 else (8, 16, 4096, 128)))
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    lengths = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=torch.Generator().manual_seed(2))
    kpm = (torch.arange(seq).view(1, seq) < lengths.view(batch, 1)).cuda()
    slopes = M.gen_slopes(heads, return_1d=True, device="cuda")
    dout = torch.randn_like(q)
    cu, used, longest = right_padded(kpm)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    calls = {
        "masked": lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes,
                                      key_padding_mask=kpm),
        "in place (seqused)": lambda: M.attention_varlen(*flat, cu, cu, longest, longest, backend="triton",
                                                         causal=True, alibi_slopes=slopes, seqused_q=used,
                                                         seqused_k=used).view_as(q),
        "dense": lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes),
    }
    for name, call in calls.items():
        def fwd(call=call):
            with torch.no_grad():
                return call()

        def fwd_bwd(call=call):
            torch.autograd.grad(call(), (q, k, v), dout)

        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            kernels = profile_kernels(fn, steps=5)
            total = sum(ms for ms, _, _ in kernels)
            print(f"\n{name} {mode}: kernels {total:.3f} ms per call, host {host_us(fn):.0f} us per call", flush=True)
            for ms, count, kernel in kernels:
                print(f"  {ms:8.3f} ms  x{count:<3d} {kernel[:100]}")
        if "--host-profile" in sys.argv:
            profile_host(fwd_bwd, 20, ("tottime", 18))

if __name__ == "__main__":
    main()
