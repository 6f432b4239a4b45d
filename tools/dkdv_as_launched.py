"""Compile the Hopper dK/dV kernel as a dense causal-ALiBi training step launches it (no GPU needed) and show what
its innermost loops with tensor-core products compiled to: their length, local-memory loads (spills) and register
moves to the uniform datapath. For comparing Triton versions (benchmarks/NOTES.md session 54):

    python tools/dkdv_as_launched.py [--batch 8 --heads 16 --seq 2048 --head-dim 128] [--out DIR]
    PYTHONPATH=/path/to/another/triton python tools/dkdv_as_launched.py ...

Unlike ``tools/compile_kernels.py``, which leaves integer arguments unspecialised, this gives them the launch's
specialisation (``compile_kernels.launch_attrs``), so the cubin is the one the GPU runs for that shape (checked
byte for byte against the H200's at B8 H16 S2048 D128 under Triton 3.6 and 3.7). MHA, (H,) slopes, bf16.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from compile_kernels import _spills, compile_hopper_dkdv_kernel, triton_tool  # noqa: E402

from mpt_attention.impl.triton.hopper import product_tail, tile_dim  # noqa: E402
from mpt_attention.impl.triton.hopper_dkdv import bwd_rows_per_group  # noqa: E402


def launch_ints(batch: int, heads: int, seq: int, head_dim: int) -> dict:
    """The dK/dV kernel's integer arguments for a dense MHA step with (H,) slopes and contiguous (B, S, H, D) tensors,
    as ``hopper_dkdv.dkdv_plan`` passes them."""
    q = torch.empty(batch, seq, heads, head_dim, dtype=torch.bfloat16, device="meta")
    return dict(stride_slb=0, stride_slh=1, stride_bb=0, stride_bh=0, stride_bk=0, bias_b_on=0, bias_h_on=0,
                n_kv=heads, n_groups=1, n_splits=1, n_rows=batch * heads,
                rows_per_group=bwd_rows_per_group(q, batch * heads, 1, True), seqlen_q=seq,
                seqlen_k=seq, stride_dks=heads * head_dim, stride_dkh=head_dim, stride_dvs=heads * head_dim,
                stride_dvh=head_dim, n_seq=batch, head_dim=head_dim, zero=0)


def product_loops(sass: str) -> list[tuple[int, int, int, int, int]]:
    """``(first instruction, length, tensor-core products, local loads, R2UR moves)`` of each innermost loop (a
    backward branch's span, before the last ``EXIT``: past it are the barrier waits' retry blocks, which branch back
    into the loops) holding tensor-core products."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        line = re.sub(r"/\*[^*]*\*/", "", line).strip()
        if re.match(r"^\.L_x_\d+:", line):
            labels[line[:-1]] = len(instrs)
        elif line and not line.startswith(".") and line.endswith(";"):
            instrs.append(line)
    last_exit = max((i for i, ins in enumerate(instrs) if re.sub(r"^@!?U?P\w+ ", "", ins).startswith("EXIT")),
                    default=len(instrs))
    loops = []
    for end, ins in enumerate(instrs[:last_exit]):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if target and labels.get(target.group(1), end + 1) <= end:
            start = labels[target.group(1)]
            body = instrs[start:end + 1]
            if any("HGMMA" in i for i in body):
                loops.append((start, end))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in sorted(set(inner)):
        body = instrs[a:b + 1]
        out.append((a, b - a + 1, sum("HGMMA" in i for i in body), sum(" LDL" in f" {i}" for i in body),
                    sum("R2UR" in i for i in body)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tail", type=int, help="the products' second piece of columns (default: as launched, "
                        "hopper.product_tail; 0: the whole tile)")
    parser.add_argument("--out", help="folder for the kernel's ttgir, llir, ptx, cubin and sass")
    args = parser.parse_args()
    ints = launch_ints(args.batch, args.heads, args.seq, args.head_dim)
    tail = product_tail(args.head_dim) if args.tail is None else args.tail
    kernel = compile_hopper_dkdv_kernel(tile_dim(args.head_dim), True, 1, fused_dq=True, tail=tail, ints=ints)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([triton_tool("nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    print(f"Triton {triton.__version__}, B{args.batch} H{args.heads} S{args.seq} D{args.head_dim} tail {tail}: "
          f"{kernel.metadata.shared} bytes of shared memory; {_spills(kernel)}")
    for start, length, products, loads, moves in product_loops(sass):
        print(f"  loop at instruction {start}: {length} instructions, {products} HGMMA, {loads} LDL, {moves} R2UR")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for key in ("ttgir", "llir", "ptx"):
            with open(os.path.join(args.out, f"dkdv.{key}"), "w") as f:
                f.write(kernel.asm[key])
        with open(os.path.join(args.out, "dkdv.cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(os.path.join(args.out, "dkdv.sass"), "w") as f:
            f.write(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
