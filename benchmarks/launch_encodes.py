"""How much of a planned launch's host time is the copy-engine descriptors' encoding (probe, GPU only):

    python benchmarks/launch_encodes.py [--shape B,H,S,D] [--calls N]

Records the compiled-kernel launches (``lean_launch.run_compiled``) of one causal ALiBi forward+backward through the
public op, then per launch: the host time of ``run_compiled`` as the step makes it and through the compiled
kernel's ``run`` (Triton's wrapper encoding every descriptor per call, as before ``lean_launch._EncodedLaunch``), of
Triton's ``make_tensordesc_arg`` for each of its descriptors, and of the launcher itself with the descriptors encoded
beforehand (the floor of a cache of encoded descriptors). The whole step likewise, alternated three times. Also
``torch.zeros`` against ``torch.empty`` of the forward's tile counters. Triton 3.6's and 3.7's launcher layouts (the
ones ``_EncodedLaunch`` takes); other versions print why not. Under 3.7 it measures what session 54 could not.
"""

import argparse

import torch

import mpt_attention as M
from mpt_attention.impl.triton import lean_launch
from mpt_attention.testing import host_us


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="16,16,1024,128", help="B,H,S,D")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    batch, n_heads, seq, head_dim = map(int, args.shape.split(","))
    q, k, v = (torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    dout = torch.randn_like(q)

    def step():
        M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes).backward(dout)

    for _ in range(3):
        step()
    recorded, real = [], lean_launch.run_compiled

    def record(kernel, grid, device, values):
        recorded.append((kernel, grid, device, tuple(values)))
        real(kernel, grid, device, values)

    lean_launch.run_compiled = record
    step()
    lean_launch.run_compiled = real
    torch.cuda.synchronize()

    from triton.runtime import driver

    print(f"B{batch} H{n_heads} S{seq} D{head_dim}: {len(recorded)} compiled launches per step; host us per call")
    for kernel, grid, device, values in recorded:
        name = kernel.name if hasattr(kernel, "name") else "?"
        descs = [i for i, x in enumerate(values) if type(x) is lean_launch._Descriptor]
        run_us = host_us(lambda: real(kernel, grid, device, values), args.calls)
        encoded = lean_launch._ENCODED[id(kernel)][1]  # (run_compiled made the entry)
        lean_launch._ENCODED[id(kernel)] = (kernel, None)  # Triton's own run, its wrapper encoding every call
        wrapper_us = host_us(lambda: real(kernel, grid, device, values), args.calls)
        lean_launch._ENCODED[id(kernel)] = (kernel, encoded)
        line = (f"  {name[:40]:40s} descriptors {len(descs):2d}  run_compiled {run_us:6.1f} "
                f"(through kernel.run {wrapper_us:6.1f}{'' if encoded else ', not encoded once'})")
        if descs and encoded is not None:
            encode_us = host_us(lambda: [encoded._encode(values[i], meta) for i, meta in encoded.metas.items()],
                                args.calls * 5)
            flat = encoded.arguments(values)
            stream = driver.active.get_current_stream(device)
            base = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                    kernel.function, *encoded.head)
            if encoded.tail is None:  # Triton 3.6: the arguments spread; 3.7: annotations, signature, one list
                raw_us = host_us(lambda: encoded.launcher(*base, *flat), args.calls)
            else:
                raw_us = host_us(lambda: encoded.launcher(*base, *encoded.tail, flat), args.calls)
            line += f"  encodes {encode_us:6.1f}  launcher with encoded {raw_us:6.1f}"
        else:
            line += "  (no descriptors, or not Triton 3.6's or 3.7's launcher)"
        print(line, flush=True)
    n = 16 + 132 * 64
    zeros_us = host_us(lambda: torch.zeros(n, dtype=torch.int32, device="cuda"), args.calls)
    empty_us = host_us(lambda: torch.empty(n, dtype=torch.int32, device="cuda"), args.calls)
    print(f"  tile counters ({n} words): torch.zeros {zeros_us:.1f} us, torch.empty {empty_us:.1f} us")
    kept = dict(lean_launch._ENCODED)
    for _ in range(3):
        step_us = host_us(step, 50)
        lean_launch._ENCODED.update({key: (kernel, None) for key, (kernel, _) in kept.items()})
        wrapper_us = host_us(step, 50)
        lean_launch._ENCODED.update(kept)
        print(f"  the whole step: {step_us:.1f} us of host per call ({wrapper_us:.1f} through kernel.run)")


if __name__ == "__main__":
    main()
