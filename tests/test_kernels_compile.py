"""Every Triton kernel compiles for Hopper (sm_90) on this CPU machine: catches GPU-only compile errors.

The interpreter executes kernels as Python and accepts code the real compiler rejects (an early
``return`` inside a constexpr branch passed the interpreter and failed on the GPU), so CI compiles too.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_kernels.py")], capture_output=True,
                            text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("ok ") >= 75
    assert result.stdout.count("ok   hopper-fwd ") == 6 and result.stdout.count("ok   hopper-dkdv") == 5
    assert result.stdout.count("ok   hopper-fwd-two-consumers") == 1
    assert result.stdout.count("ok   hopper-fwd-bias-row") == 4
    assert result.stdout.count("ok   hopper-fwd-bias-matrix") == 6
    # a zero or negative scale: row maxima over the scaled scores (the others take them over the unscaled ones)
    assert result.stdout.count("ok   hopper-fwd-scaled-max") == 4
    # no kernel's tensor-core products made to wait one for another (ptxas's C7514, which an accumulator read while
    # its product is in flight brings on: the forward's ALiBi extension product issued a block early)
    assert "WGMMA-SERIALISED" not in result.stdout, [r for r in result.stdout.splitlines() if "SERIALISED" in r]
    # causal ALiBi through the scores' extension product without spills: holding its A operand in registers
    # instead spilled in the D128 loop and cost 1.3% (benchmarks/NOTES.md session 35); D64's three consumers have 160
    # registers per thread (the first 168): with this Triton one value of the first consumer spills (4 bytes; with
    # the GPU machine's Triton 3.6 none), the two-consumer kernel (240) spills none
    expected = {"hopper-fwd D=128": 0, "hopper-fwd D=64": 4, "hopper-fwd-two-consumers D=64": 0}
    for name, spilled in expected.items():
        line = next(row for row in result.stdout.splitlines()
                    if row.startswith(f"ok   {name} causal=True alibi=1 bf16 "))
        assert f"{spilled} bytes spill stores, {spilled} bytes spill loads" in line, line
    # D 104-112: the forward's Q K^T on 64 + 32 + 16 columns; with causal ALiBi it spills none
    assert result.stdout.count("ok   hopper-fwd-qk-cols=112") == 4
    start = "ok   hopper-fwd-qk-cols=112 D=128 causal=True alibi=1 "
    line = next(row for row in result.stdout.splitlines() if row.startswith(start))
    assert "0 bytes spill stores, 0 bytes spill loads" in line, line
    # D 72-96 under a CUDA 13 ptxas: Q K^T on 64 + 16 / 32 columns, P V on all 128 (``hopper.forward_tail``)
    assert result.stdout.count("ok   hopper-fwd-qk-cols=80 ") == 1
    assert result.stdout.count("ok   hopper-fwd-qk-cols=96 ") == 2
    # D 72-96: products on 64 + 16 or 32 columns
    assert result.stdout.count("ok   hopper-fwd-tail") == 3 and result.stdout.count("ok   hopper-bwd-tail") == 4
    assert result.stdout.count("ok   hopper-fwd-varlen") == 3 and result.stdout.count("ok   hopper-bwd-varlen") == 3
    # causal ALiBi's key blocks past its reach skipped (reach.py): the forward at both widths, the dK/dV kernel with
    # the dQ warpgroup, the consumers' dQ, split heads' partial sums and the reproducible split
    assert result.stdout.count("ok   hopper-fwd-reach") == 2 and result.stdout.count("ok   hopper-bwd-reach") == 4
    # a short training step's forward writing its table of first key blocks, and the backward reading it
    assert result.stdout.count("ok   hopper-fwd-table") == 4 and result.stdout.count("ok   hopper-bwd-table") == 3
    # and from a bias row over the keys
    assert result.stdout.count("ok   hopper-fwd-row-table") == 3
    assert result.stdout.count("ok   hopper-bwd-row-table") == 3
    # and in packed sequences (one norm row per head)
    assert result.stdout.count("ok   hopper-fwd-packed-reach") == 3
    assert result.stdout.count("ok   hopper-bwd-packed-reach") == 3
    # the same from a causal bias row's prefix maxima: the forward through the extension product at both widths and
    # scaled first, the dK/dV kernel with the dQ warpgroup, the consumers' dQ and split heads
    assert result.stdout.count("ok   hopper-fwd-row-reach") == 3
    assert result.stdout.count("ok   hopper-bwd-row-reach") == 3
    # seven with the dQ sums (at D128 the consumers form dQ, at D64 the dQ warpgroup), five more with a bias matrix
    # (and its gradient: the dQ warpgroup at both head dims)
    assert result.stdout.count("ok   hopper-fused-dq ") == 12
    assert result.stdout.count("ok   hopper-fused-dq bias matrix") == 5
    # the delta kernel's programmatic dependent (its loader and dQ partition waiting for it): the consumers' dQ, the
    # dQ warpgroup, a bias row, a bias matrix; and the delta kernel that lets it start
    assert result.stdout.count("ok   hopper-fused-dq-pdl") == 4
    assert result.stdout.count("ok   delta-first-write-release") == 1
    # the dQ warpgroup's staging stores compile only without bank conflicts (one accumulator shape: 64 queries)
    assert result.stdout.count("ok   dq-staging") == 1
    # the backward's delta kernel as the general kernels, the dQ warpgroup and the first-write dQ sums take it
    assert result.stdout.count("ok   delta ptx=") == 1 and result.stdout.count("ok   delta-dq-warpgroup") == 1
    assert result.stdout.count("ok   delta-first-write ") == 1
    # float32 in the general kernels, with causal ALiBi measured from each row's diagonal: forward, dK/dV (with and
    # without the atomic dQ) and dQ
    assert all(f"ok   {name}-fp32 ptx=" in result.stdout for name in ("fwd", "dkdv", "dkdv-atomic-dq", "dq"))
    # each kernel's PTX digest (source locations left out), which a change meant only to move code must keep
    oks = [row for row in result.stdout.splitlines() if row.startswith("ok ")]
    assert all(re.search(r" ptx=[0-9a-f]{12}$", row) for row in oks), [row for row in oks if " ptx=" not in row]


def test_ptx_schedule_tool_runs_and_reads_the_loop():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "ptx_schedule.py")], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # each forward has a loop whose QK^T (wgmma) and softmax (ex2) the tool found
    assert result.stdout.count("forward D=") == 2 and "[M8]" in result.stdout and "[e" in result.stdout
    # in the PTX the Gluon kernel keeps the P V product in flight (W1) into the softmax (ptxas then hoists
    # the W0 wait above it: the --sass test below); with causal ALiBi the next block's extension product (MC, which
    # adds ALiBi's columns) is issued after the softmax's ex2 and waited for (W0) before the scores
    hopper_schedule = result.stdout[result.stdout.index("gluon hopper kernel"):]
    assert "W0[M8]C[M8]CW1" in hopper_schedule
    assert re.search(r"\[e66\][^\n]*MC\n", hopper_schedule), hopper_schedule


def test_ptx_schedule_tool_reads_the_sass_ptxas_makes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "ptx_schedule.py"), "--sass"], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("gluon hopper kernel")]
    assert len(lines) == 2
    for line in lines:  # the consumer loop: two products in flight, the wait for the scores, the softmax
        assert "M8 W1" in line and "e66" in line, line


def test_dkdv_kernel_as_launched_keeps_its_descriptors_out_of_local_memory():
    """The D128 dK/dV kernel as a B8 H16 S2048 step launches it (``tools/dkdv_as_launched.py``): Triton 3.7's code
    kept the consumers' 24 operand descriptors in vector registers and spilled them, 248 bytes and 17-18 local loads
    per key loop, 12% slower than under 3.6 (benchmarks/NOTES.md session 54); formed per step (``KV_IN_STEP``) the
    kernel spills 20 bytes and each loop loads one value. Under the GPU machine's 3.6: 32 bytes, 1-2 loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "dkdv_as_launched.py")], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    spilled = int(re.search(r"(\d+) bytes spill stores", result.stdout).group(1))
    loops = re.findall(r"loop at instruction \d+: (\d+) instructions, 32 HGMMA, (\d+) LDL", result.stdout)
    assert len(loops) == 2, result.stdout  # the two consumers' key loops
    assert spilled <= 64 and all(int(loads) <= 4 and int(length) < 630 for length, loads in loops), result.stdout


def test_general_kernels_launched_with_one_key_or_float32_tiles_compile_and_fit():
    """``tools/compile_launches.py`` over the launches the GPU fuzz broke (session 59): one key (Triton makes it a
    constant; ptxas 12.8 crashed on the key loop's pipelined descriptor loads, so ``launch._key_descriptors_ok``
    leaves them out), the dQ kernel storing dS for a float32 bias matrix's gradient at D80-128 (three stages
    needed 257 KB of shared memory, more than an sm_90 block has) and float32 inputs at D80. Every launch compiles
    and fits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    grids = [["--head-dims", "160", "--biases", "none", "--kernel", "fwd", "--seqs", "1", "37"],
             ["--head-dims", "80", "--biases", "row-grad", "matrix-grad", "shared-grad", "--kernel", "dq", "--seqs",
              "1", "37"],
             # float32 inputs past 64 columns (D>128's configs; the D 72-128 ones needed up to 328 KB)
             ["--head-dims", "80", "--biases", "matrix-grad", "--dtypes", "fp32", "--seqs", "37"]]
    for grid in grids:
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_launches.py"), *grid, "--heads", "4:2",
                                 "--bias-dtypes", "fp32", "--deterministic", "true", "--quiet"],
                                capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        total = int(re.search(r"launches, (\d+) specialisations", result.stdout).group(1))
        assert total >= 8 and f"0 of {total} failed" in result.stdout, result.stdout


def test_hopper_forward_assembled_by_ptxas13_keeps_its_registers():
    """Triton passes every ptxas ``--regAllocOptLevel=2``; ptxas 13 (Triton 3.9's for sm_90) then spilled the D64
    causal ALiBi forward: 408 bytes stored and 640 loaded, 11-13 local loads per key loop, 6% of its time on the
    H200 (benchmarks/NOTES.md session 55). Our launches pass ptxas 13's own default after it
    (``lean_launch.ptxas_options``). Checked with this Triton's ptxas of CUDA 13 standing in for the sm_90 one
    (TRITON_PTXAS_PATH), the kernel compiled with the launches' options (``compile_kernels.LAUNCH_OPTIONS``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    newer = get_ptxas(100).path
    version = subprocess.run([newer, "--version"], capture_output=True, text=True).stdout
    if not re.search(r"release 1[3-9]\.", version):
        pytest.skip(f"this Triton's sm_100 ptxas is not CUDA 13's: {version.strip()[-60:]}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_PTXAS_PATH"] = newer
    script = ("import sys; sys.path.insert(0, 'tools'); import compile_kernels as c; "
              "k = c.compile_hopper_kernel(64, True, 1); print(c.LAUNCH_OPTIONS.get('ptx_options'), '|', c._spills(k))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    options, spills = result.stdout.strip().splitlines()[-1].split(" | ")
    assert options == "--regAllocOptLevel=4"
    assert int(re.search(r"(\d+) bytes spill stores", spills).group(1)) <= 32, spills


def _barriers_before_helper_arrives(ptx: str) -> list[int]:
    """For each mbarrier arrival ``gluon_compat.partition_arrive`` makes (its ``.loc`` in gluon_compat.py), how many
    barriers (``bar.sync``; ``bar.warp.sync`` in a one-warp partition) come after the instruction before it that
    reads or writes memory, runs a product or branches."""
    files = dict(re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', ptx))
    helper = {n for n, name in files.items() if name.endswith("gluon_compat.py")}
    lines, counts, loc = ptx.splitlines(), [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith(".loc"):
            loc = text.split()[1]
        elif "mbarrier.arrive.shared::cta.b64 _" in text and loc in helper:
            count, j = 0, i - 1
            while j >= 0:
                prior = lines[j].strip()
                if prior.startswith(("bar.sync", "bar.warp.sync")):
                    count += 1
                elif re.match(r"(@%p\w+\s+)?(wgmma|ldmatrix|stmatrix|ld|st|cp|red|atom|fence|mbarrier|bra)\b|\$L__BB",
                              prior):
                    break  # the partition's last memory, product or control instruction
                j -= 1
            counts.append(count)
    return counts


def test_each_partition_arrive_follows_exactly_one_partition_barrier(tmp_path):
    """``gluon_compat.partition_arrive``: the arrival is one thread's, so every warp of the partition must have got
    there first. Up to Triton 3.7 our barrier does that; from 3.8 Triton emits one before every arrive itself and
    ours made two in a row (three extra per step in the dK/dV kernel's loops: benchmarks/NOTES.md session 56).
    Checked in the dK/dV kernels' PTX on both dQ routes: the consumers forming dQ (D128) and the dQ warpgroup (D64).
    (Under 3.6 and 3.7 Triton's shared-memory analysis also places a barrier at each of these arrivals when ours is
    left out, so there the check guards against two, not against none.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("import sys; sys.path.insert(0, 'tools'); import compile_kernels as c\n"
              f"for d in (128, 64):\n"
              f"    k = c.compile_hopper_dkdv_kernel(d, True, 1, fused_dq=True)\n"
              f"    open(f'{tmp_path}/dkdv{{d}}.ptx', 'w').write(k.asm['ptx'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for d, sites in ((128, 3), (64, 2)):
        counts = _barriers_before_helper_arrives((tmp_path / f"dkdv{d}.ptx").read_text())
        assert len(counts) >= sites and counts == [1] * len(counts), (d, counts)
