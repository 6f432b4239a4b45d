"""Compile every Triton and Gluon kernel for Hopper (sm_90) on this machine, no GPU needed.

Catches compile errors and shows shared-memory use and local-memory traffic (spills) before spending GPU time:
    python tools/compile_kernels.py            (must run without TRITON_INTERPRET)
Each ``ok`` line ends with ``ptx=`` and a digest of the kernel's PTX without its source locations: a change that only
moves code between files (or renames a helper) leaves every digest as it was, so two runs' outputs diffed show it.
The general Triton kernels (and the delta kernel) are compiled here without a launch's divisibility marks on pointers
and sizes, so their loads are scalar and their register counts not those that run: ``tools/compile_launches.py``
compiles them as launches specialise them. Constexpr parameters left out take their defaults, as at a launch.
"""

import functools
import hashlib
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mpt_attention.impl.triton import launch, launch_backward
from mpt_attention.impl.triton.reach import REACH_ROW, REACH_TABLE
from mpt_attention.impl.triton.backward import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from mpt_attention.impl.triton.forward import _attn_fwd_kernel
from mpt_attention.impl.triton.lean_launch import ptxas_options, with_user_ptxas_options

# the options every launch on a Hopper GPU adds (lean_launch.launch_kernel), so the kernels compiled here are those
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
if _HOPPER_PTXAS_OPTIONS := ptxas_options(9):
    LAUNCH_OPTIONS["ptx_options"] = with_user_ptxas_options(_HOPPER_PTXAS_OPTIONS)
_FLOAT_SCALARS = {"qk_scale2", "dropout_p", "softmax_scale"}
_POINTER_TYPES = {"KeyPad": "*u8", "Prefix": "*u8", "SeqId": "*i64", "Seed": "*i64", "KvRange": "*i32",
                  "SeqRange": "*i32",
                  "CuSeqQ": "*i32", "CuSeqK": "*i32", "EndSeqQ": "*i32", "EndSeqK": "*i32", "Lse": "*fp32",
                  "DLse": "*fp32", "Delta": "*fp32",
                  "DBiasCols": "*fp32", "DBias": "*bf16", "DQAcc": "*fp32", "Bias": "*fp32", "Slopes": "*fp32",
                  "Tiles": "*i32", "DKVPart": "*fp32", "RowStats": "*fp32", "DOScaled": "*bf16", "CuTiles": "*i32",
                  "CuKTiles": "*i32", "DQSync": "*i32", "Norms": "*i32", "SoftBlocks": "*i32"}


def constexpr_defaults(fn, constexprs: dict) -> dict:
    """``constexprs`` with each constexpr parameter of ``fn`` it leaves out at its default, as a launch that leaves it
    out compiles it (passed as an ``i32`` argument instead, its branches would be compiled in)."""
    return {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}


def compile_kernel(fn, constexprs: dict, options: dict, dtype: str = "bf16"):
    constexprs = constexpr_defaults(fn, constexprs)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = _POINTER_TYPES.get(name, f"*{dtype}")
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={**LAUNCH_OPTIONS, **options})


def _compile_gluon(fn, consts: dict, rows: dict, head_dim: int, dtype: str, bias: str | None = None,
                   boxes: dict | None = None, ints: dict | None = None):
    """A Gluon Hopper kernel: ``rows`` gives each descriptor argument's box height (boxes [1, rows, 1, D] of
    (B, S, H, D) tensors); ``ints``: integer arguments' values, specialised as a launch does (``launch_attrs``);
    ``bias`` the dtype of a ``bias_desc`` bias-row descriptor (boxes [1, 1, BLOCK_N]), None for none;
    ``boxes`` other descriptor arguments' boxes in q's dtype (``None``: not passed)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    matrix_layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    consts = constexpr_defaults(fn, consts)
    boxes = boxes or {}
    sig = {}
    for name in fn.arg_names:
        if name in boxes:
            if boxes[name] is None:
                consts[name] = None
            elif isinstance(boxes[name], tuple):  # (box, dtype, layout)
                box, box_dtype, box_layout = boxes[name]
                sig[name] = f"tensordesc<{box_dtype}{list(box)},{box_layout!r}>"
                continue
            else:
                sig[name] = f"tensordesc<{dtype}{list(boxes[name])},{matrix_layout!r}>"
                continue
        if (name == "bias_desc" and bias is None) or (name == "dq_desc" and not consts.get("FUSED_DQ")):
            consts[name] = None
        if name in consts:
            sig[name] = "constexpr"
        elif name == "bias_desc":
            bits = 32 if bias == "fp32" else 16
            row_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=3)
            sig[name] = f"tensordesc<{bias}[1, 1, {consts['BLOCK_N']}],{row_layout!r}>"
        elif name == "dq_desc":  # the fused backward's float32 dQ buffer: 128-byte swizzled [1, BLOCK_M, 1, 32] boxes
            from mpt_attention.impl.triton.hopper_dkdv import _DQ_LAYOUT
            from mpt_attention.impl.triton.hopper_dq import DQ_COLS
            sig[name] = f"tensordesc<fp32[1, {rows['q_desc']}, 1, {DQ_COLS.value}],{_DQ_LAYOUT!r}>"
        elif name == "stats_desc":  # the dK/dV kernel's row terms: float32 [1, 2, BLOCK_M] boxes
            from mpt_attention.impl.triton.hopper_dkdv import _ROW_STATS_LAYOUT
            sig[name] = f"tensordesc<fp32[1, 2, {rows['q_desc']}],{_ROW_STATS_LAYOUT!r}>"
        elif name in rows:
            sig[name] = f"tensordesc<{dtype}[1, {rows[name]}, 1, {head_dim}],{layout!r}>"
        elif name in ("Out", "DK", "DV"):  # packed outputs (VARLEN), in q's dtype
            sig[name] = f"*{dtype}"
        elif name[0].isupper():
            sig[name] = _POINTER_TYPES.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in ("qk_scale2", "softmax_scale") else "i32"
    attrs = launch_attrs(fn, sig, consts, ints) if ints is not None else None
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                         attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **LAUNCH_OPTIONS})


def launch_attrs(fn, sig: dict, consts: dict, ints: dict) -> dict:
    """The specialisation a launch gives ``fn``'s arguments, applied to ``sig`` and ``consts`` (in place): an
    integer argument equal to 1 becomes a constant, one divisible by 16 (0 included) and every pointer are marked
    divisible by 16 (Triton's binder; pointers taken as 16-byte aligned). Without it the compiled kernel is not the
    one the GPU runs: at D128 its key loop differed by 50 instructions under Triton 3.7 (benchmarks/NOTES.md session
    54)."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in ints and name not in consts:
            if ints[name] == 1:
                sig[name] = "constexpr"
                consts[name] = 1
            elif ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif str(sig.get(name, "")).startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_hopper_kernel(head_dim: int, causal: bool, alibi: int, dtype: str = "bf16", bias: str | None = None,
                          tail: int = 0, bias_matrix: bool = False, varlen: bool = False, raw: bool | None = None,
                          consumers: int | None = None, reach: int = 0, qk_cols: int = 0, table: bool = False):
    """The Gluon Hopper forward (impl/triton/hopper_forward.py); ``bias``: the bias row's dtype, or None;
    ``tail``: the products' second piece of columns (``hopper.product_tail``); ``bias_matrix``: a bias matrix
    in q's dtype instead; ``varlen``: packed sequences; ``raw``: maxima over unscaled scores (``hopper.raw_scores``;
    None: as the launcher chooses for a positive scale); ``consumers``: consumer warpgroups (None: as the launcher
    chooses, ``hopper.forward_consumers``); ``reach``: causal ALiBi's key blocks past every query's reach skipped
    (``hopper.reach_applies``: 1 from the slopes, ``REACH_ROW`` from a bias row); ``qk_cols``: the columns Q K^T
    contracts (``hopper.qk_cols``; 0: the tile's, or 64 + ``tail``); ``table``: a short training step's forward
    writing its rows' first key blocks within reach (``TABLE``, ``hopper.forward_table_applies``)."""
    from mpt_attention.impl.triton.hopper import BLOCK_N, HALF_M, forward_consumers, raw_scores
    from mpt_attention.impl.triton.hopper_forward import _hopper_fwd_kernel

    if raw is None:  # as the launcher chooses for a positive scale (a stand-in of the bias's shape: a row or a matrix)
        stand_in = None if bias is None and not bias_matrix else torch.empty(1, 1, 2 if bias_matrix else 1, 1)
        raw = raw_scores(1.0, stand_in, alibi)
    row_keys = raw and bias is not None
    bias_row = bias is not None and not row_keys
    if consumers is None:  # as the launcher chooses
        consumers = forward_consumers(head_dim, varlen, raw)

    rows = {"q_desc": HALF_M, "o_desc": HALF_M, "k_desc": BLOCK_N, "v_desc": BLOCK_N}
    consts = {"IS_CAUSAL": causal, "ALIBI": alibi, "BLOCK_N": BLOCK_N, "HEAD_DIM": head_dim,
              "BIAS_ROW": bias_row, "TAIL": tail, "BIAS_FULL": bias_matrix, "VARLEN": varlen, "RAW": raw,
              "ROW_KEYS": row_keys, "CONSUMERS": consumers, "REACH": reach, "QK_COLS": qk_cols}
    if table:  # (as hopper.forward_plan: absent otherwise, so the other launches' digests stay)
        consts["TABLE"] = True
    boxes = {"bias_desc": [1, HALF_M, BLOCK_N]} if bias_matrix else None
    if row_keys:  # the row's per-key terms (common.row_keys_kernel): bfloat16 [1, 1, BLOCK_N, 16] boxes
        from mpt_attention.impl.triton.hopper import _ROW_KEYS_LAYOUT
        boxes, bias = {"bias_desc": ([1, 1, BLOCK_N, 16], "bf16", _ROW_KEYS_LAYOUT)}, None
    return _compile_gluon(_hopper_fwd_kernel, consts, rows, head_dim, dtype, bias, boxes)


def compile_hopper_dkdv_kernel(head_dim: int, causal: bool, alibi: int, dtype: str = "bf16", fused_dq: bool = False,
                               partial: bool = False, full_bias: bool = False, store_ds: bool = False, tail: int = 0,
                               varlen: bool = False, reach: int = 0, ints: dict | None = None, pdl: bool = False):
    """The Gluon Hopper dK/dV kernel (impl/triton/hopper_backward.py); ``fused_dq``: forming dQ too (the dQ warpgroup,
    or at tile width 128 without a bias matrix or tail the consumers and the writer warp);
    ``partial``: grouped heads split over programs (float32 dK, dV partial sums); ``full_bias``: a bias
    matrix, ``store_ds`` with its gradient; ``tail``: the products' second piece of columns (with ``fused_dq``);
    ``varlen``: packed sequences (with ``fused_dq``; no bias row). Each 64-query block's first program stores its
    dQ part where the launcher has it do so (``hopper_dkdv.first_write_dq``); ``reach``: query blocks past
    causal ALiBi's reach skipped (``hopper.reach_applies``: 1 from the slopes, ``REACH_ROW`` from a bias row,
    ``REACH_TABLE`` from the forward's table);
    ``ints``: integer arguments' values, specialised as a launch does (``launch_attrs``; tools/dkdv_as_launched.py);
    ``pdl``: launched as the delta kernel's programmatic dependent (``hopper_dkdv.dkdv_plan``)."""
    from mpt_attention.impl.triton.gluon_compat import KV_IN_STEP
    from mpt_attention.impl.triton.hopper_dkdv import BWD_HALF_N, bwd_block_m, first_write_dq, scaled_dout_blocks
    from mpt_attention.impl.triton.hopper_backward import _hopper_bwd_dkdv_kernel

    block_m = bwd_block_m(head_dim, full_bias, fused_dq)
    bias_row = alibi == 0 and causal and not full_bias and not varlen  # one bias-row variant among the five
    # with a bias, the fused route's loader reads dO's soft-masked blocks from the scaled copy (plans.run_fused)
    soft_blocks = fused_dq and (bias_row or full_bias) and scaled_dout_blocks(head_dim, full_bias)
    rows = {"q_desc": block_m, "do_desc": block_m, "k_desc": BWD_HALF_N, "v_desc": BWD_HALF_N,
            "dk_desc": BWD_HALF_N, "dv_desc": BWD_HALF_N}
    if soft_blocks:
        rows["dos_desc"] = block_m
    consts = {"IS_CAUSAL": causal, "ALIBI": alibi, "HEAD_DIM": head_dim, "SOFT_BLOCKS": soft_blocks,
              "BIAS_ROW": bias_row, "FUSED_DQ": fused_dq,
              "PARTIAL_DKV": partial, "BLOCK_M": block_m, "BIAS_FULL": full_bias, "STORE_DS": store_ds, "TAIL": tail,
              "VARLEN": varlen, "FIRST_WRITE": fused_dq and first_write_dq(head_dim, full_bias, varlen),
              "REACH": reach, "KV_IN_STEP": KV_IN_STEP, "PDL": pdl}
    box = [1, block_m, BWD_HALF_N]
    boxes = {"bias_desc": box if full_bias else None, "dbias_desc": box if store_ds else None}
    if not soft_blocks:
        boxes["dos_desc"] = None
    return _compile_gluon(_hopper_bwd_dkdv_kernel, consts, rows, head_dim, dtype, boxes=boxes, ints=ints)


def _compile_dq_staging_probe():
    """A kernel that compiles only if ``hopper_backward``'s dQ staging store has no bank conflicts (Gluon's
    compile-time count for the accumulator layout and the staging tiles' shared layout)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from mpt_attention.impl.triton.hopper_dq import DQ_CHUNK, DQ_COLS, DQ_ROWS, DQ_TILE_LAYOUT, dq_chunk_tiles
    from mpt_attention.impl.triton.hopper_dq import dqt_layout

    @gluon.jit
    def probe():
        tiles = dq_chunk_tiles(gl.zeros([DQ_CHUNK, DQ_ROWS], gl.float32, dqt_layout()))
        smem = gl.allocate_shared_memory(gl.float32, [DQ_CHUNK // DQ_COLS, DQ_ROWS, DQ_COLS], DQ_TILE_LAYOUT)
        gl.static_assert(gl.bank_conflicts(tiles.type, smem.type) == 0, "bank conflicts in the dQ staging store")
        smem.store(tiles)

    src = GluonASTSource(fn=probe, signature={}, constexprs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **LAUNCH_OPTIONS})


def triton_tool(name: str) -> str:
    """Path of a CUDA tool that ships with Triton (ptxas, cuobjdump): the versions its kernels are built with."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sm90_ptxas() -> str:
    """The ptxas Triton assembles sm_90 kernels with: its ``ptxas`` up to 3.8, its newer ``ptxas-blackwell`` from 3.9
    (whose PTX the older one rejects)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


@functools.cache
def _triton_reg_alloc_flag() -> tuple[str, ...]:
    """The register-allocation flag Triton's ``make_cubin`` passes every ptxas (from 3.7: ``--regAllocOptLevel=2``),
    read once from its source."""
    from triton.backends.nvidia import compiler

    with open(compiler.__file__) as f:
        found = re.search(r"--regAllocOptLevel=\d+", f.read())
    return (found.group(0),) if found else ()


def triton_ptxas_flags(ptx_options: str | None = LAUNCH_OPTIONS.get("ptx_options")) -> list[str]:
    """Triton's register-allocation flag and then ``ptx_options``, as Triton orders them: ptxas 13 assembles
    differently with that flag (``lean_launch.ptxas_options``)."""
    return [*_triton_reg_alloc_flag(), *(ptx_options.split() if ptx_options else [])]


def assemble(ptx: str, workdir: str, *flags: str) -> tuple[str, str]:
    """``ptx`` assembled for sm_90a by Triton's ptxas in ``workdir``: ``(object file path, ptxas's stderr)``."""
    src, obj = os.path.join(workdir, "k.ptx"), os.path.join(workdir, "k.o")
    with open(src, "w") as f:
        f.write(ptx)
    result = subprocess.run([sm90_ptxas(), "-arch=sm_90a", *flags, src, "-o", obj], capture_output=True,
                            text=True, check=True)
    return obj, result.stderr


def _spills(kernel) -> str:
    """ptxas's spill report for a compiled kernel (the PTX is re-assembled with Triton's own ptxas and flags), and
    ``WGMMA-SERIALISED`` where ptxas warns that it made every tensor-core product wait for the one before (C7514:
    a register of a product in flight read by another instruction; hopper_forward.py's early ALiBi product)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = assemble(kernel.asm["ptx"], tmp, "-v", *triton_ptxas_flags(kernel.metadata.ptx_options))[1]
    report = next((line.strip() for line in log.splitlines() if "spill" in line), "no report")
    return report + (" WGMMA-SERIALISED" if "C7514" in log else "")


def ptx_digest(kernel) -> str:
    """12 hex digits of a SHA-256 of the kernel's PTX without what names source files and lines (``.file``,
    ``.loc``, the DWARF sections and the ``$L__tmp`` labels that mark inlined calls for them), which moving code or
    calling a helper changes while the instructions stay the same."""
    lines, in_debug = [], False
    for line in kernel.asm["ptx"].splitlines():
        stripped = line.strip()
        if stripped.startswith(".section") and ".debug" in stripped:
            in_debug = True
        if in_debug:
            in_debug = stripped != "}"
            continue
        if not stripped.startswith((".file", ".loc", "//")) and not re.fullmatch(r"\$L__tmp\d+:", stripped):
            lines.append(stripped)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def _report_gluon(name: str, build, *args, **kwargs) -> int:
    """Compile a Gluon kernel with ``build(*args, **kwargs)`` and print ``ok`` with its shared memory and spills,
    or ``FAIL`` with the error's tail; returns the number of failures (0 or 1)."""
    try:
        k = build(*args, **kwargs)
    except Exception as exc:
        print(f"FAIL {name}: {str(exc)[-1500:]}")
        return 1
    print(f"ok   {name} smem={k.metadata.shared} {_spills(k)} ptx={ptx_digest(k)}")
    return 0


def main() -> int:
    failures = 0
    # bias rows reach the kernels as float32 log2 units (launch._log2_bias_rows), whatever the caller's dtype
    # (without ALiBi through the extension product: three consumers at D64)
    for head_dim, causal, alibi, dtype in [(128, True, 0, "bf16"), (64, True, 1, "bf16"), (128, False, 2, "fp16"),
                                           (64, True, 0, "bf16")]:
        failures += _report_gluon(f"hopper-fwd-bias-row D={head_dim} causal={causal} alibi={alibi} {dtype}",
                                  compile_hopper_kernel, head_dim, causal, alibi, dtype, "fp32")
    # a bias matrix in q's dtype (at tile width 128 with one Q buffer)
    for head_dim, tail, causal, alibi, dtype in [(64, 0, False, 0, "bf16"), (64, 0, True, 1, "fp16"),
                                                 (64, 0, False, 2, "bf16"), (128, 0, False, 0, "bf16"),
                                                 (128, 0, True, 1, "bf16"), (128, 16, True, 0, "fp16")]:
        failures += _report_gluon(f"hopper-fwd-bias-matrix D={head_dim} tail={tail} causal={causal} alibi={alibi} "
                                  f"{dtype}", compile_hopper_kernel, head_dim, causal, alibi, dtype, None, tail, True)
    # D 72-96: the forward's products on 64 + 16 or 64 + 32 of the tile's 128 columns
    for tail, causal, alibi, bias in [(16, True, 1, None), (32, False, 2, None), (16, True, 0, "fp32")]:
        failures += _report_gluon(f"hopper-fwd-tail={tail} D=128 causal={causal} alibi={alibi} bias={bias}",
                                  compile_hopper_kernel, 128, causal, alibi, "bf16", bias, tail)
    # D 104-112: Q K^T over 64 + 32 + 16 of the tile's 128 columns, P V over all of them
    for causal, alibi, bias, matrix in [(True, 1, None, False), (False, 2, None, False), (True, 0, "fp32", False),
                                        (True, 0, None, True)]:
        failures += _report_gluon(f"hopper-fwd-qk-cols=112 D=128 causal={causal} alibi={alibi} bias={bias} "
                                  f"matrix={matrix}", compile_hopper_kernel, 128, causal, alibi, "bf16", bias, 0,
                                  matrix, qk_cols=112)
    # D 72-96 where Triton's sm_90 ptxas is CUDA 13's (``hopper.forward_tail``): P V over all 128 columns
    for qk_cols, causal, alibi, bias in [(80, True, 1, None), (96, False, 2, None), (96, True, 0, "fp32")]:
        failures += _report_gluon(f"hopper-fwd-qk-cols={qk_cols} D=128 causal={causal} alibi={alibi} bias={bias}",
                                  compile_hopper_kernel, 128, causal, alibi, "bf16", bias, 0, qk_cols=qk_cols)
    # a zero or negative scale: maxima over the scaled scores
    for head_dim, causal, alibi, dtype, bias in [(128, True, 1, "bf16", None), (64, True, 0, "fp16", None),
                                                 (128, False, 1, "bf16", None), (64, True, 0, "bf16", "fp32")]:
        failures += _report_gluon(f"hopper-fwd-scaled-max D={head_dim} causal={causal} alibi={alibi} {dtype} "
                                  f"bias={bias}", compile_hopper_kernel, head_dim, causal, alibi, dtype, bias,
                                  raw=False)
    # packed sequences (attention_varlen): the forward only
    for head_dim, tail, causal, alibi, dtype in [(128, 0, True, 1, "bf16"), (64, 0, False, 2, "fp16"),
                                                 (128, 32, True, 0, "bf16")]:
        failures += _report_gluon(f"hopper-fwd-varlen D={head_dim} tail={tail} causal={causal} alibi={alibi} {dtype}",
                                  compile_hopper_kernel, head_dim, causal, alibi, dtype, None, tail, False, True)
    # with unused rows (seqused: PACKED_USED), which the consumers clear where a block reaches them
    from mpt_attention.impl.triton.hopper_tiles import PACKED_USED
    for head_dim, tail, causal, alibi, dtype in [(128, 0, True, 1, "bf16"), (64, 0, False, 2, "fp16"),
                                                 (128, 32, True, 0, "bf16")]:
        failures += _report_gluon(f"hopper-fwd-seqused D={head_dim} tail={tail} causal={causal} alibi={alibi} "
                                  f"{dtype}", compile_hopper_kernel, head_dim, causal, alibi, dtype, None, tail, False,
                                  PACKED_USED)
        failures += _report_gluon(f"hopper-bwd-seqused D={head_dim} tail={tail} causal={causal} alibi={alibi} "
                                  f"{dtype}", compile_hopper_dkdv_kernel, head_dim, causal, alibi, dtype,
                                  fused_dq=True, tail=tail, varlen=PACKED_USED)
    for head_dim, causal, alibi, dtype in [(128, True, 1, "bf16"), (64, True, 1, "bf16"), (128, False, 2, "fp16"),
                                           (128, False, 0, "bf16"), (64, True, 0, "fp16")]:
        for kind, build in (("fwd", compile_hopper_kernel), ("dkdv", compile_hopper_dkdv_kernel)):
            failures += _report_gluon(f"hopper-{kind} D={head_dim} causal={causal} alibi={alibi} {dtype}",
                                      build, head_dim, causal, alibi, dtype)
    # causal ALiBi past its reach (dense, slopes alone)
    for head_dim, dtype in [(64, "bf16"), (128, "fp16")]:
        failures += _report_gluon(f"hopper-fwd-reach D={head_dim} causal=True alibi=1 {dtype}", compile_hopper_kernel,
                                  head_dim, True, 1, dtype, reach=True)
    # the same in packed sequences (attention_varlen; one norm row per head), at both widths and with a tail
    for head_dim, tail in [(64, 0), (128, 0), (128, 32)]:
        failures += _report_gluon(f"hopper-fwd-packed-reach D={head_dim} tail={tail} causal=True alibi=1 bf16",
                                  compile_hopper_kernel, head_dim, True, 1, "bf16", None, tail, False, True, reach=True)
    for head_dim, fused_dq, partial in [(64, True, False), (128, True, False), (128, True, True), (128, False, False)]:
        failures += _report_gluon(f"hopper-bwd-reach D={head_dim} causal=True alibi=1 fused_dq={fused_dq} "
                                  f"partial={partial}", compile_hopper_dkdv_kernel, head_dim, True, 1,
                                  fused_dq=fused_dq, partial=partial, reach=True)
    # a short training step: the forward writing its rows' first key blocks (three consumers at D64, a tail, Q K^T on
    # 112 columns) and the dK/dV kernel ending its queries there (the consumers' dQ, the dQ warpgroup, split heads'
    # partial sums, a programmatic dependent)
    for head_dim, tail, qk in [(64, 0, 0), (128, 0, 0), (128, 32, 0), (128, 0, 112)]:
        failures += _report_gluon(f"hopper-fwd-table D={head_dim} tail={tail} qk_cols={qk} causal=True alibi=1 bf16",
                                  compile_hopper_kernel, head_dim, True, 1, "bf16", None, tail, qk_cols=qk, table=True)
    for head_dim, partial, pdl in [(64, False, True), (128, False, True), (128, True, False)]:
        failures += _report_gluon(f"hopper-bwd-table D={head_dim} causal=True alibi=1 partial={partial} pdl={pdl}",
                                  compile_hopper_dkdv_kernel, head_dim, True, 1, fused_dq=True, partial=partial,
                                  reach=REACH_TABLE, pdl=pdl)
    # the same from a bias row over the keys (its terms through the extension product; hopper_forward
    # store_row_first_block) at both widths and with a tail, and the dK/dV kernel with the row ending its queries there
    for head_dim, tail in [(64, 0), (128, 0), (128, 32)]:
        failures += _report_gluon(f"hopper-fwd-row-table D={head_dim} tail={tail} causal=True alibi=0 bf16",
                                  compile_hopper_kernel, head_dim, True, 0, "bf16", "fp32", tail, table=True)
    for head_dim, partial, pdl in [(64, False, True), (128, False, True), (128, True, False)]:
        failures += _report_gluon(f"hopper-bwd-row-table D={head_dim} causal=True alibi=0 partial={partial} pdl={pdl}",
                                  compile_hopper_dkdv_kernel, head_dim, True, 0, fused_dq=True, partial=partial,
                                  reach=REACH_TABLE, pdl=pdl)
    # a causal bias row past its reach (reach.row_reach_kernel's tables): through the extension product at both
    # widths, and scaled first (a zero scale: the row's slices come ahead, from the tile's first block)
    for head_dim, raw in [(64, None), (128, None), (64, False)]:
        failures += _report_gluon(f"hopper-fwd-row-reach D={head_dim} causal=True alibi=0 raw={raw} bf16",
                                  compile_hopper_kernel, head_dim, True, 0, "bf16", "fp32", raw=raw, reach=REACH_ROW)
    for head_dim, fused_dq, partial in [(64, True, False), (128, True, False), (128, True, True)]:
        failures += _report_gluon(f"hopper-bwd-row-reach D={head_dim} causal=True alibi=0 fused_dq={fused_dq} "
                                  f"partial={partial}", compile_hopper_dkdv_kernel, head_dim, True, 0,
                                  fused_dq=fused_dq, partial=partial, reach=REACH_ROW)
    # D64's three consumers without a causal mask, and two where raw maxima would take three
    failures += _report_gluon("hopper-fwd D=64 causal=False alibi=0 bf16", compile_hopper_kernel, 64, False, 0)
    failures += _report_gluon("hopper-fwd-two-consumers D=64 causal=True alibi=1 bf16", compile_hopper_kernel, 64, True,
                              1, consumers=2)
    for head_dim, causal, alibi, dtype, partial in [(128, True, 1, "bf16", False), (128, False, 2, "fp16", False),
                                                    (128, True, 0, "bf16", False), (64, True, 1, "bf16", False),
                                                    (64, True, 0, "fp16", False), (128, True, 1, "bf16", True),
                                                    (64, False, 2, "fp16", True)]:  # + the dQ warpgroup
        name = f"hopper-fused-dq D={head_dim} causal={causal} alibi={alibi} {dtype}{' partial dK dV' * partial}"
        failures += _report_gluon(name, compile_hopper_dkdv_kernel, head_dim, causal, alibi, dtype, fused_dq=True,
                                  partial=partial)
    # D 72-96 with the dQ warpgroup: the consumers' products on 64 + 16 or 64 + 32 columns
    # (alibi 0, causal, no matrix: the bias-row variant)
    for tail, causal, alibi, partial, full_bias in [(16, True, 1, False, False), (32, False, 2, True, False),
                                                    (16, True, 0, False, True), (32, True, 0, False, False)]:
        name = f"hopper-bwd-tail={tail} D=128 causal={causal} alibi={alibi} partial={partial} bias matrix={full_bias}"
        failures += _report_gluon(name, compile_hopper_dkdv_kernel, 128, causal, alibi, "bf16", fused_dq=True,
                                  partial=partial, full_bias=full_bias, store_ds=full_bias, tail=tail)
    # packed sequences in the fused backward (the consumers forming dQ at D128, the dQ warpgroup at D64, a tail)
    for head_dim, tail, causal, alibi, dtype in [(128, 0, True, 1, "bf16"), (64, 0, False, 2, "fp16"),
                                                 (128, 32, True, 0, "bf16")]:
        name = f"hopper-bwd-varlen D={head_dim} tail={tail} causal={causal} alibi={alibi} {dtype}"
        failures += _report_gluon(name, compile_hopper_dkdv_kernel, head_dim, causal, alibi, dtype, fused_dq=True,
                                  tail=tail, varlen=True)
    # packed sequences past causal ALiBi's reach (one norm row per head): each sequence's key blocks end their queries
    for head_dim, tail in [(64, 0), (128, 0), (128, 32)]:
        failures += _report_gluon(f"hopper-bwd-packed-reach D={head_dim} tail={tail} causal=True alibi=1 bf16",
                                  compile_hopper_dkdv_kernel, head_dim, True, 1, "bf16", fused_dq=True, tail=tail,
                                  varlen=True, reach=True)
    # a bias matrix (+ its gradient) in the fused backward
    for head_dim, causal, alibi, dtype, store_ds in [(128, False, 0, "bf16", True), (128, True, 1, "bf16", True),
                                                     (64, False, 2, "fp16", True), (128, False, 0, "fp16", False),
                                                     (64, True, 0, "bf16", False)]:
        name = f"hopper-fused-dq bias matrix D={head_dim} causal={causal} alibi={alibi} {dtype} dbias={store_ds}"
        failures += _report_gluon(name, compile_hopper_dkdv_kernel, head_dim, causal, alibi, dtype, fused_dq=True,
                                  full_bias=True, store_ds=store_ds)
    # the dK/dV kernel as the delta kernel's programmatic dependent (dense, without the reach): the consumers forming
    # dQ, the dQ warpgroup, a bias row's soft-masked blocks of dO at D64 (the loader waits before their words), a bias
    # matrix with its gradient
    for head_dim, causal, alibi, full_bias in [(128, True, 1, False), (64, True, 1, False), (64, True, 0, False),
                                               (128, False, 0, True)]:
        name = f"hopper-fused-dq-pdl D={head_dim} causal={causal} alibi={alibi} bias matrix={full_bias}"
        failures += _report_gluon(name, compile_hopper_dkdv_kernel, head_dim, causal, alibi, "bf16", fused_dq=True,
                                  full_bias=full_bias, store_ds=full_bias, pdl=True)
    # the dQ warpgroup's staging stores (its accumulator into swizzled float32 tiles): no bank conflicts (one
    # unswizzled tile had 4-way conflicts, and its stores bound the kernel: benchmarks/NOTES.md session 20)
    failures += _report_gluon("dq-staging: no bank conflicts", _compile_dq_staging_probe)

    def switches(causal, alibi, bias, *on):
        """The general kernels' switches: ``on`` names the masks and features set, the others off."""
        off = dict(HAS_KPM=False, HAS_SEQID=False, HAS_PREFIX=False, DROPOUT=False, VARLEN=False, REACH=False)
        return dict(IS_CAUSAL=causal, ALIBI=alibi, BIAS=bias, **off) | {name: True for name in on}

    # the last: MPT's bias row with nothing else, which every kernel reads through a descriptor
    flag_sets = [switches(True, 1, 0), switches(False, 2, 1, "HAS_KPM", "HAS_SEQID", "DROPOUT"),
                 switches(True, 2, 0, "HAS_PREFIX"), switches(True, 1, 0, "DROPOUT", "VARLEN"),
                 switches(False, 0, 2), switches(True, 0, 1)]
    # causal ALiBi from slopes past its reach (launch._general_reach), dense and packed (one norm row: reach.norm_row)
    flag_sets += [dict(flag_sets[0], REACH=True), dict(flag_sets[0], REACH=True, VARLEN=True)]
    for head_dim, flags in itertools.product((64, 128, 256), flag_sets):
        block_d = max(16, triton.next_power_of_2(head_dim))
        desc = not flags["HAS_KPM"]  # tensor-descriptor (TMA) loads wherever the launcher allows them
        row_desc = flags["BIAS"] == 1 and not flags["VARLEN"]  # a bias row through a descriptor (launch.py)
        jobs = [("fwd", _attn_fwd_kernel, launch._fwd_config(head_dim, full_bias=flags["BIAS"] == 2),
                 dict(KV_DESC=desc, ROW_DESC=row_desc))]
        kv_cfg, q_cfg = launch_backward._bwd_config(head_dim)
        atomic_cfg = launch_backward._bwd_config(head_dim, atomic_dq=True)[0]
        bias_grad = {1: 1, 2: 2}.get(flags["BIAS"], 0)
        ds_desc = bias_grad == 2  # dS stored through a descriptor (rows of 16-byte multiples)
        jobs += [("dkdv", _attn_bwd_dkdv_kernel, kv_cfg, dict(BIAS_GRAD=bias_grad, DESC=desc,
                                                              ATOMIC_DQ=0, DS_DESC=ds_desc)),
                 ("dkdv-atomic-dq", _attn_bwd_dkdv_kernel, atomic_cfg,
                  dict(BIAS_GRAD=bias_grad, DESC=desc, ATOMIC_DQ=2 if desc else 1, DS_DESC=ds_desc)),
                 ("dq", _attn_bwd_dq_kernel, q_cfg, dict(BIAS_GRAD=2 if flags["BIAS"] == 2 else 0, DESC=desc,
                                                         ROW_DESC=desc and row_desc))]
        for name, fn, cfg, extra in jobs:
            cfg = dict(cfg)
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            consts = dict(flags, DOT_PRECISION="tf32", BLOCK_D=block_d, **cfg, **extra)
            try:
                k = compile_kernel(fn, consts, opts)
                local = k.asm["ptx"].count("ld.local") + k.asm["ptx"].count("st.local")
                tma = k.asm["ptx"].count("cp.async.bulk.tensor")
                print(f"ok   {name:14s} D={head_dim:3d} {cfg} smem={k.metadata.shared} local-mem ops={local} "
                      f"tma loads={tma} ptx={ptx_digest(k)}")
            except Exception as exc:  # report every failure, not just the first
                failures += 1
                print(f"FAIL {name:5s} D={head_dim:3d} {flags}: {str(exc)[-1500:]}")
    delta_consts = dict(BLOCK_M=64, BLOCK_D=128, RELEASE=False)
    extra = [("delta", _attn_bwd_delta_kernel, dict(delta_consts, HAS_DLSE=True, SOFT_ROWS=1, ROW_STATS=False,
                                                    STORE_DELTA=True, ZERO_DQ=False, ZERO_SYNC=False),
              dict(num_warps=4, num_stages=1), "bf16"),
             # the Hopper backward with the dQ warpgroup: row terms, no (B, H, S_q) delta, the dQ sums zeroed
             ("delta-dq-warpgroup", _attn_bwd_delta_kernel, dict(delta_consts, HAS_DLSE=False, SOFT_ROWS=0,
                                                                 ROW_STATS=True, STORE_DELTA=False, ZERO_DQ=True,
                                                                 ZERO_SYNC=False),
              dict(num_warps=4, num_stages=1), "bf16"),
             # the fused Hopper backward with a bias: dO scaled only in the blocks holding a soft-masked row
             ("delta-soft-blocks", _attn_bwd_delta_kernel, dict(delta_consts, HAS_DLSE=False, SOFT_ROWS=2,
                                                                ROW_STATS=True, STORE_DELTA=False, ZERO_DQ=True,
                                                                ZERO_SYNC=False),
              dict(num_warps=4, num_stages=1), "bf16"),
             # where each block's first program stores its dQ part: no zeros there, the blocks' words zeroed
             ("delta-first-write", _attn_bwd_delta_kernel, dict(delta_consts, HAS_DLSE=False, SOFT_ROWS=0,
                                                                ROW_STATS=True, STORE_DELTA=False, ZERO_DQ=False,
                                                                ZERO_SYNC=True),
              dict(num_warps=4, num_stages=1), "bf16"),
             # the same releasing the dK/dV kernel launched as its programmatic dependent (hopper.PDL)
             ("delta-first-write-release", _attn_bwd_delta_kernel,
              dict(delta_consts, HAS_DLSE=False, SOFT_ROWS=0, ROW_STATS=True, STORE_DELTA=False, ZERO_DQ=False,
                   ZERO_SYNC=True) | dict(RELEASE=True), dict(num_warps=4, num_stages=1), "bf16"),
             ]
    # float32, which only the general kernels take: causal ALiBi measured from each row's diagonal
    # (launch._kernel_alibi), dots in IEEE float32, the tiles' loads through descriptors as launch.py gives them
    fp32_flags = dict(flag_sets[0], ALIBI=3, DOT_PRECISION="ieee", BLOCK_D=64)
    kv_cfg, q_cfg = launch_backward._bwd_config(64)
    extra += [("fwd-fp32", _attn_fwd_kernel, dict(fp32_flags, KV_DESC=True, ROW_DESC=False, **launch._fwd_config(64)),
               None, "fp32"),
              ("dkdv-fp32", _attn_bwd_dkdv_kernel, dict(fp32_flags, BIAS_GRAD=0, DESC=True, ATOMIC_DQ=0, DS_DESC=False,
                                                        **kv_cfg), None, "fp32"),
              ("dkdv-atomic-dq-fp32", _attn_bwd_dkdv_kernel, dict(fp32_flags, BIAS_GRAD=0, DESC=True, ATOMIC_DQ=2,
                                                                  DS_DESC=False,
                                                                  **launch_backward._bwd_config(64, atomic_dq=True)[0]),
               None, "fp32"),
              ("dq-fp32", _attn_bwd_dq_kernel, dict(fp32_flags, BIAS_GRAD=0, DESC=True, ROW_DESC=False, **q_cfg), None,
               "fp32")]
    for name, fn, consts, opts, dtype in extra:
        consts = dict(consts)
        if opts is None:
            opts = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages"))
        try:
            print(f"ok   {name} ptx={ptx_digest(compile_kernel(fn, consts, opts, dtype))}")
        except Exception as exc:
            failures += 1
            print(f"FAIL {name}: {str(exc)[-1500:]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
