"""The backward's delta kernel (``plans.row_terms`` as the fused Hopper route launches it: delta, the row terms,
the dQ blocks' sync words) timed against a bandwidth peer, ``torch.add`` over O and dO, at one training shape
(benchmarks/NOTES.md session 69: 3.0 TB/s against the peer's 3.85 on an H200). ``benchmarks/ab.sh`` compares
package versions with it.

    python benchmarks/delta_probe.py [--shape B,H,S,D]
"""

import argparse

import torch
from triton.testing import do_bench

from mpt_attention.impl.triton import hopper_dkdv, plans


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="16,16,1024,128")
    b, h, s, d = (int(x) for x in parser.parse_args().shape.split(","))
    dev = "cuda"
    o = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(o)
    lse = torch.randn(b, h, s, device=dev, dtype=torch.float32)
    row_stats = hopper_dkdv.row_stats_buffer(b, h, s, dev)
    dq_sync = hopper_dkdv.dq_sync_buffer(b, h, s, dev)
    launch, scalars = plans.row_terms_plan(o, do, None, None, None, row_stats, None, dq_sync)
    dummy = lse

    def run():
        launch(o, do, lse, dummy, dummy, dummy, row_stats, dummy, dq_sync, dummy, dummy, dummy, *scalars)

    nbytes = 2 * o.numel() * o.element_size()
    peer = torch.empty_like(o)
    ms = do_bench(lambda: torch.add(o, do, out=peer), warmup=50, rep=300)
    print(f"torch.add(o, dO) (reads both, writes one): {ms * 1e3:7.1f} us  {3 * nbytes / 2 / ms / 1e9:6.2f} TB/s")
    run()
    ms = do_bench(run, warmup=50, rep=300)
    print(f"{'delta kernel, as planned':42s}: {ms * 1e3:7.1f} us  {nbytes / ms / 1e9:6.2f} TB/s (O and dO read)")


if __name__ == "__main__":
    main()
