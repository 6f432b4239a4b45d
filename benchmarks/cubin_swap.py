"""Is a kernel slower under another Triton because of its compiled code or because of how that Triton launches it?

Run under one Triton, ``save`` writes the cubins of the Hopper kernels a causal-ALiBi forward+backward compiles;
run under another, ``time`` times that step's kernels with the cubins this Triton compiled and with the saved ones
in their place (same launcher, arguments, grid and stream; the launch asks for the larger of the two shared-memory
sizes). Kernels whose parameter lists differ between the versions cannot be swapped: compare the PTX entries first.

    python3 benchmarks/cubin_swap.py save DIR                  (under Triton A)
    python3 benchmarks/cubin_swap.py time DIR [--rounds N]     (under Triton B: B's cubins against A's, alternated)

GPU only. Written for session 54's question: the dK/dV kernel 12% slower under Triton 3.7 than 3.6 (NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from triton.runtime import driver

import mpt_attention as M
from mpt_attention.impl.triton import lean_launch
from mpt_attention.testing import profile_kernels

SHAPES = {"d128": (8, 16, 2048, 128), "d64": (8, 32, 2048, 64)}  # (B, H, S, D), causal ALiBi, bf16, MHA


def _step(batch, n_heads, seq, head_dim):
    q, k, v = (torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")

    def step():
        out = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
        torch.autograd.grad(out, [q, k, v], dout)
    return step


def _compiled_by(step) -> list:
    """The compiled Hopper kernels that ``step``'s first call adds to the launch cache."""
    before = set(map(id, lean_launch._KERNELS.values()))
    step()
    torch.cuda.synchronize()
    return [k for k in lean_launch._KERNELS.values() if id(k) not in before and k.name.startswith("_hopper")]


def save(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for tag, shape in SHAPES.items():
        for kernel in _compiled_by(_step(*shape)):
            stem = os.path.join(folder, f"{tag}.{kernel.name}")
            with open(stem + ".cubin", "wb") as f:
                f.write(kernel.asm["cubin"])
            with open(stem + ".json", "w") as f:
                json.dump({"triton": triton.__version__, "shared": kernel.metadata.shared,
                           "num_warps": kernel.metadata.num_warps, "num_ctas": kernel.metadata.num_ctas}, f)
            print(f"saved {stem} (Triton {triton.__version__}, shared {kernel.metadata.shared})")


def swap_and_time(folder: str, rounds: int) -> None:
    device = driver.active.get_current_device()
    for tag, shape in SHAPES.items():
        step = _step(*shape)
        swaps = []  # (kernel, own (function, packed metadata), other's)
        for kernel in _compiled_by(step):
            stem = os.path.join(folder, f"{tag}.{kernel.name}")
            if not os.path.exists(stem + ".cubin"):
                continue
            meta = json.load(open(stem + ".json"))
            shared = max(meta["shared"], kernel.metadata.shared)
            with open(stem + ".cubin", "rb") as f:
                other = driver.active.utils.load_binary(kernel.name, f.read(), shared, device)[1]
            kernel.run  # loads this Triton's own cubin (its function handle)
            own_fn = driver.active.utils.load_binary(kernel.name, kernel.asm["cubin"], shared, device)[1]
            packed = (*kernel.packed_metadata[:2], shared, *kernel.packed_metadata[3:])
            swaps.append((kernel, (own_fn, packed), (other, packed), meta["triton"]))
        if not swaps:
            print(f"{tag}: no saved cubin matches this step's kernels")
            continue
        label = f"{tag} B{shape[0]} H{shape[1]} S{shape[2]} D{shape[3]}"
        for r in range(rounds):
            for which in (1, 2):
                for kernel, *choices, _ in swaps:
                    kernel.function, kernel.packed_metadata = choices[which - 1]
                lean_launch._ENCODED.clear()  # its launches hold the packed metadata
                name = f"Triton {triton.__version__}'s cubins" if which == 1 else f"Triton {swaps[0][3]}'s cubins"
                for ms, count, kname in profile_kernels(step, steps=10):
                    if kname.startswith("_hopper"):
                        print(f"{label} round {r} {name:22s} {ms:8.3f} ms/step {count}x {kname[:40]}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "time"])
    parser.add_argument("folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    save(args.folder) if args.action == "save" else swap_and_time(args.folder, args.rounds)


if __name__ == "__main__":
    main()
