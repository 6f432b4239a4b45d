"""Settings of ``mpt_attention.impl.triton.hopper`` against each other on the training step, in one process
(benchmarks/NOTES.md sessions 70-71). Per shape: the step (causal ALiBi forward and backward, bf16) captured in a
CUDA graph (``testing.capture_cuda_graph``) under each setting and replayed, the settings alternated, medians and
ranges over ``--rounds`` rounds and the median of each round's ratio to the first setting; first each setting's
gradients against the first's (the largest difference, and whether dK and dV are bitwise the same).

    python benchmarks/graph_ab.py --set PDL=0,1 [--shape B,H,H_KV,S,D ...] [--rounds N] [--bias-row]
    python benchmarks/graph_ab.py --set REACH_MIN_KEYS=4096,2048   # a training step's reach from 2048 / 1024 keys
    python benchmarks/graph_ab.py --set REACH_MIN_KEYS=8192,4096   # S1024: every block / the forward's table

``--set NAME=A,B,...``: integer values of ``hopper.NAME`` (``PDL`` 0/1, ``REACH_MIN_KEYS``, which also places the
forward's table, from a quarter to three quarters of it: ``hopper.forward_table_applies``); without ``--set``,
``PDL=0,1`` with every block computed (session 70's probe); every block also for any other setting unless
``--shipped-reach`` (the reach and the forward's table as shipped). ``--norm-scale X``: q and k drawn with standard
deviation X (larger norms: a shorter saving from the reach). ``--forward``: the step's forward alone, on inputs that
need gradients (the suite's forward cells); ``--inference``: the forward on inputs that need none (no table, the
norms' reach from ``REACH_MIN_KEYS`` keys). ``--kernels``: each setting's kernel times too (torch.profiler).
"""

import argparse
import statistics

import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper
from mpt_attention.testing import capture_cuda_graph, profile_kernels

REPLAYS = 20


def probe(batch, n_heads, n_kv, seq, head_dim, rounds, bias_row, name, values, norm_scale, shipped_reach=False,
          forward=False, kernels=False, inference=False):
    forward = forward or inference
    q, k = ((torch.randn(batch, seq, h, head_dim, device="cuda") * norm_scale).to(torch.bfloat16)
            .requires_grad_(not inference) for h in (n_heads, n_kv))
    v = torch.randn(batch, seq, n_kv, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=not inference)
    dout = torch.randn_like(q)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    kw = {"attn_bias": M.build_alibi_bias(n_heads, seq, device="cuda")} if bias_row else {"alibi_slopes": slopes}
    saved = {attr: getattr(hopper, attr) for attr in {"PDL", "REACH_MIN_KEYS", name}}
    if name != "REACH_MIN_KEYS" and not shipped_reach:
        hopper.REACH_MIN_KEYS = 1 << 62  # every block

    def step():
        out = M.attention(q, k, v, backend="triton", causal=True, **kw)
        if forward:  # the training step's forward alone (inputs that need gradients), as the suite's forward cells
            return (out,)
        return torch.autograd.grad(out, [q, k, v], dout)

    # each setting's gradients, then its training step captured in a CUDA graph, so the host's pace is out of the
    # numbers; replays alternate between the settings, each timed by events over ``REPLAYS`` replays
    grads, graphs = {}, {}
    for value in values:
        setattr(hopper, name, value)
        grads[value] = step()
        graphs[value] = capture_cuda_graph(step)[0]
        if kernels:  # each kernel's time under this setting (eager calls, torch.profiler)
            for ms, count, kernel in profile_kernels(step, steps=5)[:6]:
                print(f"  {name}={value}: {ms * 1e3:7.1f} us  x{count}  {kernel[:70]}", flush=True)
    for attr, value in saved.items():
        setattr(hopper, attr, value)
    first = values[0]
    for value in values:
        diffs = "  ".join(f"{t} {(g.float() - r.float()).abs().max().item():.2e}"
                          for t, g, r in zip(["out"] if forward else ["dq", "dk", "dv"], grads[value], grads[first]))
        kept = [0] if forward else [1, 2]  # the output, or dK and dV
        bitwise = all(torch.equal(grads[value][i], grads[first][i]) for i in kept)
        same = f"{'output' if forward else 'dK, dV'} bitwise: {bitwise}"
        print(f"  {name}={value}: max |diff| to {first}: {diffs}  {same}", flush=True)
    times = {value: [] for value in values}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for value, graph in graphs.items():
            graph.replay()
            start.record()
            for _ in range(REPLAYS):
                graph.replay()
            end.record()
            end.synchronize()
            times[value].append(start.elapsed_time(end) / REPLAYS)
    label = (f"B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim} {'bias row' if bias_row else 'slopes'}"
             + (f" norm x{norm_scale:g}" if norm_scale != 1.0 else "") + (" shipped reach" if shipped_reach else ""))
    what = "inference forward" if inference else "forward" if forward else "step"
    # the clocks drift between rounds (the fastest round ~5% under the median, session 70): each round's ratio to the
    # first setting, taken within the round, then their median
    paired = {value: statistics.median(a / b for a, b in zip(times[first], times[value])) for value in values}
    cells = "  ".join(f"{name}={value} {statistics.median(times[value]) * 1e3:6.1f} us "
                      f"[{min(times[value]) * 1e3:.1f}-{max(times[value]) * 1e3:.1f}] (paired {paired[value]:.4f}x)"
                      for value in values)
    print(f"{label} {what}: {cells}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="B,H,H_KV,S,D (repeatable; default B16 H16 S1024 D128)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--bias-row", action="store_true", help="MPT's (1, H, 1, S) bias row instead of slopes")
    parser.add_argument("--set", default="PDL=0,1", help="NAME=A,B,...: integer values of hopper.NAME")
    parser.add_argument("--norm-scale", type=float, default=1.0, help="standard deviation of q and k (default 1)")
    parser.add_argument("--shipped-reach", action="store_true",
                        help="keep hopper.REACH_MIN_KEYS as shipped (else every block, unless --set varies it)")
    parser.add_argument("--kernels", action="store_true", help="also each setting's kernel times (profiler)")
    parser.add_argument("--forward", action="store_true",
                        help="time the training step's forward alone (inputs that need gradients)")
    parser.add_argument("--inference", action="store_true",
                        help="time the forward on inputs that need no gradients (no table for a backward)")
    args = parser.parse_args()
    name, _, text = args.set.partition("=")
    if not hasattr(hopper, name) or not all(x.strip().lstrip("-").isdigit() for x in text.split(",")):
        parser.error(f"--set wants NAME=A,B with NAME an attribute of hopper and integer values, got {args.set!r}")
    values = [int(x) for x in text.split(",")]
    if len(set(values)) != len(values):  # (each setting's graph and times are kept under its value)
        parser.error(f"--set wants distinct values, got {args.set!r}")
    for shape in args.shape or ["16,16,16,1024,128"]:
        probe(*(int(x) for x in shape.split(",")), args.rounds, args.bias_row, name, values, args.norm_scale,
              args.shipped_reach, args.forward, args.kernels, args.inference)


if __name__ == "__main__":
    main()
