import sys
sys.path.insert(0, '.')
from compile_kernels import compile_hopper_dkdv_kernel, _spills
k = compile_hopper_dkdv_kernel(int(sys.argv[1]), True, 1, "bf16", fused_dq=True)
print(sys.argv[1:], _spills(k))
