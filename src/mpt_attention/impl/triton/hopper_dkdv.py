"""Host side of the Hopper dK/dV kernel (``hopper_backward.py``, with the dQ sums of ``hopper_dq.py``): its queries per
step, the buffers it reads and writes beside the gradients, and its launch, planned once per signature of the inputs
(``dkdv_plan``) and run from the plan (``run_dkdv``). Whether the backward takes this kernel at all, and the switches
that decide it (``BWD_HEAD_DIMS``, ``FUSED_BWD_HEAD_DIMS``, ``FUSED_GROUP_HEADS``, ``FIRST_WRITE_DQ``), are
``hopper.py``'s and ``launch.py``'s; the functions here read those switches at call time, so setting them on
``hopper`` (tests, benchmarks) takes effect.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mpt_attention.impl.triton import hopper
from mpt_attention.impl.triton.hopper import LOG2E, packed_heads_per_group, packed_kind, product_tail, reach_applies
from mpt_attention.impl.triton.hopper import tile_dim
from mpt_attention.impl.triton.hopper_views import bias_dims_on, bias_matrix_view, descriptor, rows_view, slope_args
from mpt_attention.impl.triton.lean_launch import PlannedLaunch, cdiv
from mpt_attention.impl.triton.reach import REACH_ROW, REACH_SLOPES, REACH_TABLE, norm_launch, row_prefix_max
from mpt_attention.impl.triton.reach import row_reach_launch
from mpt_attention.masks import sequence_ends

try:
    from triton.experimental.gluon import language as gl

    from mpt_attention.impl.triton.gluon_compat import KV_IN_STEP
    from mpt_attention.impl.triton.hopper import MATRIX_LAYOUT, TILE_LAYOUT
    from mpt_attention.impl.triton.hopper_backward import _hopper_bwd_dkdv_kernel
    from mpt_attention.impl.triton.hopper_dq import DQ_COLS, consumers_dq
    _DQ_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=4)  # fused dQ buffer
    _ROW_STATS_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)  # row_stats_buffer
except Exception:  # a Triton without Gluon's Hopper module (``hopper._IMPORT_ERROR`` says why): never launched
    _hopper_bwd_dkdv_kernel = None
    KV_IN_STEP = False

BWD_BLOCK_N, BWD_HALF_N = 128, 64  # hopper_backward: keys per program / per consumer warpgroup
assert BWD_BLOCK_N == hopper.BLOCK_M  # hopper.packed_tiles' counts serve both kernels


def bwd_rows_per_group(q, n_rows, heads_per_row, fused_dq):
    """How many rows (batch, KV head, split) of the dK/dV kernel's grid interleave their key blocks
    (``hopper_tiles.tile_order``, first key block first) with the fused dQ: as many as keep what
    their programs share, Q, dO and the float32 dQ sums of the row's ``heads_per_row`` query heads, within
    ``hopper.L2_GROUP_BYTES``. Row after row, the last row's long first blocks start near the end and finish
    last: grouped, the backward took 2.9% less at B8 S2048, 4.2-4.3% less for grouped heads there and at
    D64 32:8, 1.4% at S8192 (H200, benchmarks/NOTES.md session 16). Two rows of 16 MB together (S16k) lost
    2%, so a row over the budget runs alone; the reproducible split keeps row after row (grouped, its dK/dV
    kernel lost 3% at S2048 beside the dQ kernel's own order)."""
    if not fused_dq:
        return 1
    per_head = q.shape[1] * q.shape[3] * (2 * q.element_size() + 4)
    return max(1, min(n_rows, int(hopper.L2_GROUP_BYTES // max(per_head * heads_per_row, 1))))


def bwd_block_m(head_dim: int, bias_full: bool, fused_dq: bool) -> int:
    """Queries per step of the Hopper dK/dV kernel (``head_dim``: the tile width). 64 at D64 (its kernel 1.76 ->
    1.37 ms at B4 H32 S4096, benchmarks/NOTES.md session 14). At 128, 64 with the dQ sums (``fused_dq``) where
    the consumers form dQ themselves (hopper_backward's FA3 layout, D 72-128 without a bias matrix: the D128
    backward 1.03-1.05x the dQ warpgroup's at 32, session 24; D80, D96 1.08-1.09x, session 25); 32 with a bias
    matrix or the split dQ kernel, whose consumers' registers hold no more beside a dQ warpgroup or K's."""
    if head_dim <= 64 or (fused_dq and not bias_full):
        return 64
    return 32


def first_write_dq(head_dim: int, bias_full: bool, varlen: bool) -> bool:
    """Whether the dK/dV kernel with the dQ sums stores each 64-query block's first part instead of adding it into
    zeros (``FIRST_WRITE``, hopper_dq): dense inputs where the consumers form dQ (``hopper_dq.consumers_dq``). Every
    block is reached by some program, so the buffer needs no zeros, only a zeroed ``dq_sync_buffer``: causal or
    not, the key block holding a query's own key (its diagonal; ``unsupported`` leaves no row without keys) visits
    its block, and causal ALiBi's reach from slopes ends a key block's queries no earlier than its last key's
    (``hopper_tiles.reach_query_end``: the reach is at least 0 keys), and so does the forward's table
    (``hopper_tiles.table_query_end``). A bias row's table may end the diagonal's key
    block before a query (a removed key there, a larger term before it), but never the block holding the largest
    term up to the query's block's first row: each block's first row is a row the table tests, and that block's
    maximum lies above every such row's floor (``reach.row_reach_kernel``; tests/test_reach.py checks the cover)."""
    width = tile_dim(head_dim)
    # (the constexpr function's plain Python body: called as a ConstexprFunction it took ~1.4 us of host time per
    # backward on the development CPU, ~10x the body)
    return (hopper.FIRST_WRITE_DQ and not varlen
            and consumers_dq.fn(bwd_block_m(width, bias_full, True), width))


def scaled_dout_blocks(head_dim: int, bias_full: bool) -> bool:
    """Whether the fused backward with a bias reads dO's 64-query blocks from the delta kernel's scaled copy only where
    they hold a soft-masked row (``SOFT_BLOCKS``; the loader picks each block's source) instead of a scaled copy of
    every row: where the dQ warpgroup forms dQ (D up to 64, a bias matrix). Where the consumers form dQ
    (``hopper_dq.consumers_dq``) the loader's choice cost the consumers' loop a spill under their 240 registers (D128
    S8192: the dK/dV kernel 1.5-1.8% slower, more than the 17 us copy it saves; benchmarks/NOTES.md session 41)."""
    width = tile_dim(head_dim)
    return width is not None and not consumers_dq.fn(bwd_block_m(width, bias_full, True), width)


def dq_sync_buffer(batch: int, n_heads: int, s_q: int, device) -> torch.Tensor:
    """``FIRST_WRITE``'s int32 word per (batch, head, 64-query block), zeroed by the backward's delta kernel."""
    return torch.empty((batch, n_heads, -(-s_q // 64)), dtype=torch.int32, device=device)


def row_stats_buffer(batch: int, n_heads: int, s_q: int, device) -> torch.Tensor:
    """The dK/dV kernel's per-query terms, written by the backward's delta kernel: (B * H, 2, S_q rounded up to
    64) float32, each (batch, head) row's log2-domain LSE offset (``common.decode_lse2``) then its delta, rows
    16-byte aligned for the copy engine (boxes [1, 2, BLOCK_M]). The rows past S_q hold +inf and 0 (the delta
    kernel writes them), so a step's rows there get P = 0 without a select per row (``hopper_dkdv_steps.row_offsets``
    relies on it at tile width 64; packed sequences, ``batch`` 1, still select: a sequence's rows past its end are
    the next one's)."""
    return torch.empty((batch * n_heads, 2, -(-s_q // 64) * 64), dtype=torch.float32, device=device)


class DkdvPlan(NamedTuple):
    """What the Hopper dK/dV kernel's launch takes from its inputs' signature (``dkdv_plan``). ``descs``: the static
    parts of the descriptors of k, v, q, dO, dK, dV, dO's scaled blocks, the dQ sums, the bias matrix, dbias and the row
    terms (None for those absent); ``before``, ``after``: the launch's scalar arguments either side of its pointers;
    ``parts``: the shape of the float32 dK, dV partial sums of grouped heads split over programs, or None; ``norms``:
    the words of the heads' norm maxima (and a bias row's table) and ``row_norm_max_kernel``'s launch with its scalars
    (``reach_applies``), or None."""
    descs: tuple
    bias_row: bool
    before: tuple
    after: tuple
    parts: tuple | None
    launch: PlannedLaunch
    norms: tuple | None = None
    row_table: tuple | None = None  # ``row_reach_kernel``'s launch with its scalars (``REACH_ROW``), or None


def dkdv_plan(q, k, v, dout, row_stats, dk, dv, bias, slopes, softmax_scale, causal, alibi_mode,
              dq_acc=None, dbias=None, cu_q=None, max_q=0, first_write=False, dout_scaled=None, max_k=0,
              seqused: bool = False, forward_table: bool = False) -> DkdvPlan:
    """``backward_dkdv``'s launch for inputs of this signature (as ``forward_plan``, a function of it alone);
    ``first_write``: with a ``dq_sync`` buffer; ``dout_scaled``: dO's soft-masked blocks scaled (``run_dkdv``);
    packed sequences (``cu_q``) the longest ``max_q`` queries and ``max_k`` keys long, ``seqused`` where some of
    their rows are unused; ``forward_table``: ``run_dkdv`` gets the table of the training forward
    (``hopper.forward_table_applies``), whose rows' first key blocks end the key blocks' queries
    (``REACH_TABLE``)."""
    varlen = cu_q is not None
    if varlen:  # one (1, T, H, D) batch row for the descriptors; the sequences from the cumulative lengths
        n_seq, batch = cu_q.numel() - 1, 1
        (s_q, n_heads, head_dim), (s_k, n_kv) = q.shape, k.shape[:2]
        n_tokens_k = s_k
    else:
        batch, s_q, n_heads, head_dim = q.shape
        s_k, n_kv = k.shape[1], k.shape[2]
    width = tile_dim(head_dim)
    block_m = bwd_block_m(width, bias is not None and bias.shape[2] != 1, dq_acc is not None)
    descs = [(*rows_view(x, varlen), [1, rows, 1, width], TILE_LAYOUT)
             for x, rows in ((k, BWD_HALF_N), (v, BWD_HALF_N), (q, block_m), (dout, block_m), (dk, BWD_HALF_N),
                             (dv, BWD_HALF_N))]
    scaled = None if dout_scaled is None else (*rows_view(dout_scaled, varlen), [1, block_m, 1, width], TILE_LAYOUT)
    descs.append(scaled)
    # boxes of one step's queries x DQ_COLS columns
    descs.append(None if dq_acc is None else (*rows_view(dq_acc, varlen), [1, block_m, 1, DQ_COLS.value], _DQ_LAYOUT))
    bias_strides, b_on, h_on = (0, 0, 0), 0, 0
    bias_desc = dbias_desc = None
    bias_full = bias is not None and bias.shape[2] != 1
    if bias_full:  # boxes of one step's queries x one consumer's 64 keys
        shape, strides, b_on, h_on = bias_matrix_view(bias)
        bias_desc = (shape, strides, [1, block_m, BWD_HALF_N], MATRIX_LAYOUT)
        if dbias is not None:
            dbias_desc = ([batch * n_heads, s_q, s_k], [s_q * s_k, s_k, 1], [1, block_m, BWD_HALF_N], MATRIX_LAYOUT)
    elif bias is not None:  # read with plain loads here (one value per tile row): any strides do
        b_on, h_on = bias_dims_on(bias)
        bias_strides = (bias.stride(0), bias.stride(1), bias.stride(3))
    descs += [bias_desc, dbias_desc,
              ([batch * n_heads, 2, row_stats.shape[2]], list(row_stats.stride()), [1, 2, block_m],
               _ROW_STATS_LAYOUT)]
    # grouped heads with the fused dQ: FUSED_GROUP_HEADS query heads per program, the programs' dK, dV
    # partial sums added on the host in a fixed order (so dK, dV stay reproducible)
    n_groups = n_heads // n_kv
    heads = hopper.FUSED_GROUP_HEADS if n_groups % hopper.FUSED_GROUP_HEADS == 0 else 1
    n_splits = n_groups // heads if dq_acc is not None and not varlen else 1
    n_rows = batch * n_kv * n_splits
    grid = (cdiv(s_k, BWD_BLOCK_N) * n_rows,)
    if varlen:  # key blocks of 128 counted per sequence on the device; the grid an upper bound
        grid = ((cdiv(n_tokens_k, BWD_BLOCK_N) + n_seq) * n_kv,)
        group = packed_heads_per_group(n_kv, max_q * head_dim * (2 * q.element_size() + 4) * n_groups)
    else:
        group = bwd_rows_per_group(q, n_rows, n_groups // n_splits, dq_acc is not None)
    before = (*slope_args(slopes, None)[1], *bias_strides, b_on, h_on, n_kv, n_groups, n_splits, n_rows, group, s_q,
              s_k, softmax_scale * LOG2E, softmax_scale)
    after = (dk.stride(-3), dk.stride(-2), dv.stride(-3), dv.stride(-2), batch if not varlen else n_seq, head_dim,
             0)  # (``zero``)
    launch = PlannedLaunch(_hopper_bwd_dkdv_kernel, grid, dict(
        IS_CAUSAL=causal, ALIBI=alibi_mode, HEAD_DIM=width, BIAS_ROW=bias is not None and not bias_full,
        FUSED_DQ=dq_acc is not None, PARTIAL_DKV=n_splits > 1, BLOCK_M=block_m, BIAS_FULL=bias_full,
        STORE_DS=dbias_desc is not None, TAIL=product_tail(head_dim) if dq_acc is not None else 0,
        VARLEN=packed_kind(varlen, seqused),
        # (packed sequences: one row of norm maxima, batch 1, and the longest sequence's keys; none with unused rows)
        FIRST_WRITE=first_write,
        REACH=0 if seqused else reach_applies(bias, slopes, causal, alibi_mode, batch, max_k if varlen else s_k,
                                              training=True),
        SOFT_BLOCKS=dout_scaled is not None, KV_IN_STEP=KV_IN_STEP, num_warps=4))
    if forward_table and not varlen and not seqused and causal and not bias_full:
        # (causal ALiBi from slopes or a bias row: hopper.forward_table_applies; in place of the norms' reach or the
        # row's table, where those apply too)
        launch.kwargs["REACH"] = REACH_TABLE
    parts = (2, n_splits, batch, s_k, n_kv, width) if n_splits > 1 else None
    # the delta kernel's programmatic dependent (``hopper.PDL``) where nothing is launched between them (the reach's
    # norm maxima and a bias row's table are, the forward's table is not; packed sequences' block counts too) and
    # every buffer it writes was allocated before that kernel: grouped heads' partial sums are allocated after it,
    # from memory that kernel may still be reading (a temporary freed on its return, the caching allocator's stream
    # order assumed)
    if hopper.PDL and dq_acc is not None and not varlen and launch.kwargs["REACH"] in (0, REACH_TABLE) \
            and parts is None:
        launch.kwargs.update(PDL=True, launch_pdl=True)
    norms = row_table = None
    if launch.kwargs["REACH"] in (REACH_SLOPES, REACH_ROW):  # (all words, the norms' words, their launch, scalars)
        norm_pass, args, n_words = norm_launch(q, k, 0)
        norms = (n_words, n_words, norm_pass, args)
    if launch.kwargs["REACH"] == REACH_ROW:  # each key block's end of queries, past the norms (row_reach_query_end)
        n_kb = cdiv(s_k, BWD_BLOCK_N)
        row_table = row_reach_launch(bias, bias_dims_on(bias), q, k, softmax_scale * LOG2E, n_kb, 0, BWD_BLOCK_N, 0,
                                     n_words, True)
        norms = (n_words + batch * n_heads * n_kb, *norms[1:])
    return DkdvPlan(tuple(descs), bias is not None and not bias_full, before, after, parts, launch, norms, row_table)


def run_dkdv(plan: DkdvPlan, q, k, v, dout, row_stats, dk, dv, bias, slopes, dq_acc=None, dbias=None, cu_q=None,
             cu_k=None, dq_sync=None, reach_norms=None, dout_scaled=None, soft_blocks=None, used_q=None,
             used_k=None, reach_table=None) -> None:
    """``backward_dkdv`` for inputs of ``plan``'s signature; ``reach_norms``: the forward's norm maxima of the same q
    and k (``run_forward``), read instead of a pass of their own where the reach applies; ``reach_table``: the
    forward's table (``REACH_TABLE``, ``plan`` made with ``forward_table``); ``dout_scaled`` with
    ``soft_blocks`` (a bias that may soft-mask whole rows; dense inputs): the 64-query blocks of dO whose word in
    ``soft_blocks`` is 1 are read from ``dout_scaled`` instead (``plans.row_terms`` writes both). ``used_q``,
    ``used_k``: as ``forward`` takes them (the kernel writes dk, dv past the used keys as zeros)."""
    if cu_q is not None:  # (varlen: a sequence's last keys stored from registers, through dk and dv)
        cu_kb = hopper.packed_tiles(cu_k)
        ends_q, ends_k = sequence_ends(cu_q, used_q), sequence_ends(cu_k, used_k)
    else:
        cu_q = cu_k = cu_kb = ends_q = ends_k = row_stats  # never-read dummies
    parts = row_stats  # a never-read dummy with one split
    if plan.parts is not None:
        parts = torch.empty(plan.parts, dtype=torch.float32, device=q.device)
    norms = row_stats  # a never-read dummy without the reach
    if plan.launch.kwargs["REACH"] == REACH_TABLE:
        if reach_table is None or reach_table.numel() != q.shape[0] * q.shape[2] * -(-q.shape[1] // 64):
            raise RuntimeError("the dK/dV plan takes the forward's table of first key blocks, which this call lacks "
                               f"or has of another shape: {None if reach_table is None else reach_table.shape}")
        norms = reach_table
    if plan.norms is not None:
        n_words, norm_words, norm_launch, norm_args = plan.norms
        if reach_norms is not None and reach_norms.numel() == norm_words:
            norms = torch.empty(n_words, dtype=torch.int32, device=q.device)  # (the rest: the row's table)
            norms[:norm_words].copy_(reach_norms)
        else:
            norms = torch.zeros(n_words, dtype=torch.int32, device=q.device)
            norm_launch(q, k, norms, *norm_args)
    if plan.row_table is not None:
        table, args = plan.row_table
        table(norms, row_prefix_max(bias), bias, norms, norms, *args)  # (the backward reads no ends)
    d_k, d_v, d_q, d_o, d_dk, d_dv, d_dos, d_dq, d_bias, d_dbias, d_stats = plan.descs
    plan.launch(
        descriptor(k, *d_k), descriptor(v, *d_v), descriptor(q, *d_q), descriptor(dout, *d_o),
        None if d_dos is None else descriptor(dout_scaled, *d_dos), descriptor(dk, *d_dk),
        descriptor(dv, *d_dv), None if d_dq is None else descriptor(dq_acc, *d_dq),
        None if d_bias is None else descriptor(bias, *d_bias), None if d_dbias is None else descriptor(dbias, *d_dbias),
        descriptor(row_stats, *d_stats), row_stats if slopes is None else slopes, bias if plan.bias_row else row_stats,
        parts, *plan.before, dk, dv, cu_q, cu_k, ends_q, ends_k, cu_kb, row_stats if dq_sync is None else dq_sync,
        norms, row_stats if soft_blocks is None else soft_blocks, *plan.after,
    )
    if plan.parts is not None:
        head_dim = dk.shape[-1]
        dk.copy_(parts[0].sum(0)[..., :head_dim])  # the columns past D are zeros
        dv.copy_(parts[1].sum(0)[..., :head_dim])


def backward_dkdv(q, k, v, dout, row_stats, dk, dv, bias, slopes, softmax_scale, causal, alibi_mode,
                  dq_acc=None, dbias=None, cu_q=None, cu_k=None, max_q=0, dq_sync=None, reach_norms=None,
                  max_k=0) -> None:
    """dK, dV (written into ``dk``, ``dv``: k's shape, 16-byte aligned strides) by the Hopper kernel;
    ``row_stats`` as ``row_stats_buffer`` gives it, filled. With ``dq_acc`` (float32 zeros, or unwritten with
    ``dq_sync``; q's shape, 16-byte aligned strides) the same kernel adds dQ into it by bulk reductions, in
    no fixed order (the backward unless reproducibility is asked for: ``launch_backward.backward``). A bias matrix
    (``dq_acc`` only) is read in q's dtype; ``dbias`` (contiguous ``(B, H, S_q, S_k)`` in q's dtype, rows
    of 16-byte multiples) receives its gradient dS. Packed sequences (``cu_q``, ``cu_k``, with ``dq_acc``): q, k,
    v, dout and the gradients ``(T, H, D)``, ``row_stats`` as ``row_stats_buffer(1, H, T_q)`` gives it, the
    longest sequence ``max_q`` queries and ``max_k`` keys long. ``dq_sync`` (``dq_sync_buffer``, zeroed; where
    ``first_write_dq``): ``dq_acc`` is not zeroed, each block's first program writes it.
    ``reach_norms``: as ``run_dkdv`` takes them."""
    plan = dkdv_plan(q, k, v, dout, row_stats, dk, dv, bias, slopes, softmax_scale, causal, alibi_mode, dq_acc,
                     dbias, cu_q, max_q, dq_sync is not None, max_k=max_k)
    run_dkdv(plan, q, k, v, dout, row_stats, dk, dv, bias, slopes, dq_acc, dbias, cu_q, cu_k, dq_sync, reach_norms)
