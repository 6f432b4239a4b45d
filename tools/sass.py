import sys, subprocess, tempfile, re
sys.path.insert(0, '.')
from compile_kernels import assemble, triton_tool
ptx = open(sys.argv[1]).read()
with tempfile.TemporaryDirectory() as tmp:
    obj, _ = assemble(ptx, tmp)
    out = subprocess.run([triton_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True).stdout
open(sys.argv[2], "w").write(out)
