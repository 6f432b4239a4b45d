import re, sys, subprocess
sys.path.insert(0, '.')
import mpt_attention.impl.triton.hopper_backward as hb
from compile_kernels import compile_hopper_dkdv_kernel, _spills
from triton.experimental.gluon import language as gl
for R, Q, KR in [(int(a), int(b), c == "1") for a, b, c in (x.split(',') for x in sys.argv[1:])]:
    hb._FUSED_CONSUMER_REGS = gl.constexpr(R); hb._FUSED_DQ_REGS = gl.constexpr(Q); hb._FUSED_K_REGS = gl.constexpr(KR)
    k = compile_hopper_dkdv_kernel(128, True, 1, "bf16", fused_dq=True)
    ptx = k.asm["ptx"]
    regs = sorted(set(re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx)))
    print(R, Q, KR, "smem", k.metadata.shared, _spills(k), regs, flush=True)
    open(f"/tmp/fused_{R}_{Q}_{int(KR)}.ptx", "w").write(ptx)
