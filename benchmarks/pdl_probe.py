"""The fused Hopper backward with and without programmatic dependent launch (``hopper.PDL``: the dK/dV kernel's
programs start on the SMs the delta kernel's last ones leave), in one process (benchmarks/NOTES.md session 70). Per
shape: the training step captured in a CUDA graph (``testing.capture_cuda_graph``) for each setting and replayed, the
settings alternated, medians and ranges over ``--rounds`` rounds and the median of each round's ratio to the
setting off; first dK and dV compared bitwise with the setting off, dQ to within its float32 sums' order.

    python benchmarks/pdl_probe.py [--shape B,H,H_KV,S,D ...] [--rounds N] [--bias-row]
"""

import argparse
import statistics

import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper
from mpt_attention.testing import capture_cuda_graph

SETTINGS = {"off": False, "on": True}
REPLAYS = 20


def probe(batch, n_heads, n_kv, seq, head_dim, rounds, bias_row):
    q = torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seq, n_kv, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    kw = {"attn_bias": M.build_alibi_bias(n_heads, seq, device="cuda")} if bias_row else {"alibi_slopes": slopes}
    hopper.REACH_MIN_KEYS = 1 << 62  # every block: the route PDL applies to

    def step():
        out = M.attention(q, k, v, backend="triton", causal=True, **kw)
        return torch.autograd.grad(out, [q, k, v], dout)

    # each setting's gradients, then its training step captured in a CUDA graph (testing.capture_cuda_graph), so the
    # host's pace is out of the numbers; replays alternate between the settings, each timed by events over
    # ``REPLAYS`` replays
    grads, graphs = {}, {}
    for name, pdl in SETTINGS.items():
        hopper.PDL = pdl
        grads[name] = step()
        graphs[name] = capture_cuda_graph(step)[0]
    hopper.PDL = True
    for name in SETTINGS:
        dq, dk, dv = grads[name]
        ref = grads["off"]
        dq_err = (dq.float() - ref[0].float()).abs().max().item()
        print(f"  {name:10s} dK, dV bitwise as off: {torch.equal(dk, ref[1]) and torch.equal(dv, ref[2])}  "
              f"dQ max diff {dq_err:.2e}", flush=True)
    times = {key: [] for key in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for key, graph in graphs.items():
            graph.replay()
            start.record()
            for _ in range(REPLAYS):
                graph.replay()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end) / REPLAYS)
    label = f"B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim} {'bias row' if bias_row else 'slopes'}"
    # the clocks drift between rounds (the fastest round ~5% under the median, session 70): each round's ratio to the
    # setting off, taken within the round, then their median
    paired = {name: statistics.median(off / t for off, t in zip(times["off"], times[name])) for name in SETTINGS}
    cells = "  ".join(f"{name} {statistics.median(times[name]) * 1e3:6.1f} us "
                      f"[{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}] (paired {paired[name]:.4f}x)"
                      for name in SETTINGS)
    print(f"{label} step: {cells}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="B,H,H_KV,S,D (repeatable; default B16 H16 S1024 D128)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--bias-row", action="store_true", help="MPT's (1, H, 1, S) bias row instead of slopes")
    args = parser.parse_args()
    for text in args.shape or ["16,16,16,1024,128"]:
        probe(*(int(x) for x in text.split(",")), args.rounds, args.bias_row)


if __name__ == "__main__":
    main()
