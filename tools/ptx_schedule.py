"""Print the order of tensor-core, wait, exp2 and copy instructions in the compiled forward loop (sm_90).

    python tools/ptx_schedule.py [--sass]  (no GPU needed; must run without TRITON_INTERPRET)

One line per basic block: ``[M8]`` eight wgmma instructions, ``C`` a commit, ``W0`` a wait for all
outstanding wgmma, ``[e34]`` 34 ex2 (the softmax), ``T`` a TMA copy, ``|`` a CTA barrier. FlashAttention-3
style overlap would show the next block's QK^T wgmma still in flight (``W1``) while the ex2 run; Triton
3.6/3.7 emit ``[M8] C W0 [e..]``: the tensor cores idle during the softmax (benchmarks/NOTES.md).
The Gluon Hopper kernel (impl/triton/hopper_forward.py) is printed last: its consumer loop issues
``[M8] C`` twice (next scores, then P V) and waits with ``W1`` before the softmax's ex2; with causal ALiBi
the next block's extension product ``M C`` follows the softmax and is waited for (``W0``) before the scores.

``--sass``: the same order after ptxas (assembled with the ptxas and cuobjdump that ship with Triton),
which is what runs. ptxas reschedules within a basic block and puts a wait as early as it may: in the Gluon
kernel the wait for the P V product (``W0``), the warpgroup barrier and the V stage's release (``A``,
mbarrier arrive) come above the softmax, so within one warpgroup the softmax does not overlap the P V
product. A wait alone in a basic block of its own stays put; the overlap that buys measured slower
(session 9, benchmarks/NOTES.md).
"""

import re
import subprocess
import sys
import tempfile

import triton

from compile_kernels import assemble, compile_hopper_kernel, compile_kernel, triton_ptxas_flags, triton_tool
from mpt_attention.impl.triton import launch
from mpt_attention.impl.triton.forward import _attn_fwd_kernel

_TAGS = (("wgmma.mma_async", "M"), ("wgmma.commit_group", "C"), ("ex2.approx", "e"),
         ("cp.async.bulk.tensor", "T"), ("bar.sync", "|"), ("barrier", "|"))


def schedule(ptx: str) -> str:
    out = []
    for line in ptx.split("\n"):
        text = line.strip()
        if re.match(r"^\$L__BB\d+_\d+:", text):
            out.append("\n  block: ")
        elif text.startswith("wgmma.wait_group"):
            out.append("W" + text.split()[-1].rstrip(";"))
        else:
            out.extend(tag for prefix, tag in _TAGS if text.startswith(prefix))
    joined = "".join(out)
    return re.sub(r"([Me])\1{2,}", lambda m: f"[{m.group(1)}{len(m.group())}]", joined)


_SASS_TAGS = {"DEPBAR.LE gsb0, 0x0": "W0", "DEPBAR.LE gsb0, 0x1": "W1", "DEPBAR.LE gsb0, 0x2": "W2",
              "MUFU.EX2": "e", "HGMMA": "M",
              "SYNCS.ARRIVE": "A", "BAR.SYNC": "|", "UTMALDG": "T", "SYNCS.PHASECHK": "w"}


def sass_schedule(ptx: str) -> str:
    """``schedule``'s tags over the SASS ptxas makes of ``ptx`` (``w``: an mbarrier wait), runs collapsed."""
    with tempfile.TemporaryDirectory() as tmp:
        obj, _ = assemble(ptx, tmp, *triton_ptxas_flags())
        sass = subprocess.run([triton_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True,
                              check=True).stdout
    tags = [_SASS_TAGS[t] for t in re.findall("|".join(re.escape(t) for t in _SASS_TAGS), sass)]
    runs = []
    for tag in tags:
        if runs and runs[-1][0] == tag:
            runs[-1][1] += 1
        else:
            runs.append([tag, 1])
    return " ".join(f"{tag}{count}" if count > 1 else tag for tag, count in runs)


def main() -> int:
    if "--sass" in sys.argv:
        for alibi, bias in ((1, None), (0, "fp32")):
            kernel = compile_hopper_kernel(128, causal=True, alibi=alibi, bias=bias)
            print(f"gluon hopper kernel D=128 alibi={alibi} bias={bias}, SASS: {sass_schedule(kernel.asm['ptx'])}")
        return 0
    flags = dict(IS_CAUSAL=True, ALIBI=1, BIAS=0, HAS_KPM=False, HAS_SEQID=False, HAS_PREFIX=False, DROPOUT=False,
                 VARLEN=False, KV_DESC=True, ROW_DESC=False, DOT_PRECISION="tf32")
    for head_dim in (64, 128):
        cfg = dict(launch._fwd_config(head_dim))
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        kernel = compile_kernel(_attn_fwd_kernel, dict(flags, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), **cfg),
                                opts)
        print(f"forward D={head_dim} {cfg} {opts}: {schedule(kernel.asm['ptx'])}")
    kernel = compile_hopper_kernel(128, causal=True, alibi=1)
    print(f"gluon hopper kernel D=128 (warp-specialised): {schedule(kernel.asm['ptx'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
