"""Head dims between 64 and 128 (MPT-30B: 112) and SDPA's (B, H, S, D) layout on the Hopper kernels, against
the general kernels and the peers, in one run, for benchmarks/NOTES.md.

    python benchmarks/head_dims.py [--out DIR] [--rounds 3] [--modes fwd,fwd_bwd] [--layout-only]
                                   [--head-dims 80,96] [--providers triton-alibi,cudnn]

The Hopper kernels run D 72-120 in tiles of 128 columns (``hopper.tile_dim``; the copy engine zero-fills
the columns past D), and read (B, S, H, D) views with any aligned strides. Providers (bf16, causal ALiBi):
``triton-alibi`` (ours: the Hopper kernels where they apply), ``triton-alibi-general`` (ours with the Hopper
kernels off for the whole step, forward and backward; bench_attention.py's ``-general`` switches the forward
only), ``flex-alibi``, ``fa4-alibi`` (when installed), ``fa2`` and ``cudnn`` (SDPA, no bias). The layout
shape adds ``triton-alibi-bhsd`` / ``-bhsd-general``: ours on (B, H, S, D) tensors passed transposed.
TFLOP/s count D as given (the padding's extra work is not counted). Prints a table; writes ``head_dims.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper
from mpt_attention.testing import attention_flops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import alternation, make_providers, summarize_rounds, time_provider, warm_up

SHAPES = [  # (B, H_q, H_kv, S, D)
    (8, 64, 64, 2048, 112),  # MPT-30B: d_model 7168 over 64 heads
    (2, 64, 64, 8192, 112),  # MPT-30B at its 8k context
    (4, 32, 32, 4096, 96),
    (4, 32, 32, 4096, 80),
]
LAYOUT_SHAPE = (8, 16, 16, 2048, 128)  # bench_attention's first main shape, (B, H, S, D) tensors
PEERS = ("flex-alibi", "fa4-alibi", "fa2", "cudnn")


def providers_for(shape, layout: bool):
    batch, n_heads, n_kv, seq, head_dim = shape
    peers = make_providers(batch, n_heads, n_kv, seq, head_dim, dense_bias=False)
    ours = peers["triton-alibi"]
    out = {"triton-alibi": ours, "triton-alibi-general": ours}  # "-general": measured with the Hopper kernels off
    if layout:
        dev, slopes = "cuda", M.gen_slopes(n_heads, return_1d=True, device="cuda")
        q, k, v = (torch.randn(batch, h, seq, head_dim, device=dev, dtype=torch.bfloat16).requires_grad_()
                   for h in (n_heads, n_kv, n_kv))
        bhsd = (lambda: M.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="triton",
                                    causal=True, alibi_slopes=slopes), [q, k, v])
        out.update({"triton-alibi-bhsd": bhsd, "triton-alibi-bhsd-general": bhsd})
    out.update({name: peers[name] for name in PEERS})
    return out


def measure(name, provider, mode):
    """``provider`` timed; a ``-general`` one with the Hopper kernels off for the whole timed step, backward
    included."""
    if not name.endswith("-general"):
        return time_provider(*provider, mode)
    enabled, hopper.ENABLED = hopper.ENABLED, False
    try:
        return time_provider(*provider, mode)
    finally:
        hopper.ENABLED = enabled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--layout-only", action="store_true", help="only the (B, H, S, D) layout shape")
    parser.add_argument("--head-dims", help="only the shapes with these head dims, e.g. 80,96")
    parser.add_argument("--providers", help="only these providers, e.g. triton-alibi,cudnn")
    args = parser.parse_args()
    shapes = [s for s in SHAPES if not args.head_dims or str(s[4]) in args.head_dims.split(",")]
    rows = []
    warm_up()
    for shape in ([] if args.layout_only else shapes) + ([] if args.head_dims else [LAYOUT_SHAPE]):
        providers = providers_for(shape, layout=shape is LAYOUT_SHAPE)
        if args.providers:
            providers = {n: p for n, p in providers.items() if n in args.providers.split(",")}
        batch, n_heads, n_kv, seq, head_dim = shape
        label = f"B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim}"
        for mode in args.modes.split(","):
            flops = attention_flops(batch, n_heads, seq, seq, head_dim, causal=True, mode=mode)
            errors = {n: p for n, p in providers.items() if isinstance(p, str)}
            samples = {n: [] for n in providers}
            for name in alternation([n for n in providers if n not in errors], args.rounds):
                if name in errors:
                    continue
                try:
                    samples[name].append(measure(name, providers[name], mode))
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"[:160]
            for name in providers:
                row = dict(shape=label, mode=mode, provider=name, ms=None, tflops=None, note=errors.get(name, ""))
                if name not in errors:
                    ms, spread = summarize_rounds(samples[name])
                    row.update(ms=ms, tflops=flops / ms / 1e9, note=f"spread {spread:.1%}")
                rows.append(row)
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head_dims.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print("\n| shape | mode | provider | ms | TFLOP/s | vs ours general | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((x["ms"] for x in rows if x["shape"] == r["shape"] and x["mode"] == r["mode"]
                     and x["provider"] == "triton-alibi-general"), None)
        ratio = f"{base / r['ms']:.2f}x" if r["ms"] and base else "-"
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        print(f"| {r['shape']} | {r['mode']} | {r['provider']} | {ms} | {tf} | {ratio} | {r['note'][:70]} |")


if __name__ == "__main__":
    sys.exit(main())
