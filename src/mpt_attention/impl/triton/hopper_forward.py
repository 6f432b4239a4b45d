"""Hopper (sm_90) forward kernel in Gluon: warp-specialised, so the tensor cores stay busy through
the softmax.

Plain Triton waits for every ``Q @ K^T`` right after issuing it (``tools/ptx_schedule.py``) and runs
all warps in lockstep, so the tensor cores idle through each softmax. Here a program splits into three roles
(FlashAttention-3's layout):

* a loader warp streams K and V tiles through the copy engine (TMA) into two shared-memory stages,
  waiting on an "empty" mbarrier per stage before reusing it and signalling a "ready" one
  (``hopper_loaders.forward_loader``);
* consumer warpgroups each own 64 query rows of a tile: three at tile width 64 (192-row tiles), two at 128
  (``CONSUMERS``, ``hopper.forward_consumers``). They run independently (no CTA-wide barrier in the loop), so one
  warpgroup's softmax overlaps another's matrix products:

      block j:  issue S_j = Q K_j^T (async);  issue O += P_{j-1} V_{j-1} (async)
                wait for S_j; release K_j's stage;  softmax of S_j -> P_j, alpha_j
                wait for the P V product; release V_{j-1}'s stage;  O *= alpha_j
                (causal ALiBi: issue block j+1's extension product, ``hopper_scores.issue_alibi_ext``)

  ptxas moves the second wait (and the release after it) above the softmax, so within a warpgroup
  S_j and P_{j-1} V_{j-1} run back to back and the softmax after them. Forcing the overlap measured
  7% slower (session 9, benchmarks/NOTES.md). A warpgroup's softmax is a chain of dependent instructions
  (~430 per thread and unmasked block at D64), so a third consumer, one more warp per scheduler, hides more of its
  latency: at D64 (160 registers per thread, FA3's 192-row tiles) 1.02-1.11x against two (session 36). With a causal
  mask each consumer runs only the blocks its own rows see and hands the tile's later ones back unread.

Persistent: one program per SM (``hopper.py`` launches min(tiles, SMs)) runs tile after tile. The first
round is tile = program id; after that the loader takes the next tile in ``tile_order`` from an atomic
counter as soon as it has issued its current tile's last loads, so the next tile's Q, K and V arrive
under this tile's last blocks and a slow SM takes fewer tiles. Q is double-buffered; the loader
publishes each tile's coordinates in a small global buffer (read by the consumers before and after the
key loop, so no register carries them through it: keeping them live cost 9%), and an empty tile (no key
blocks) tells the consumers to stop. Counting key blocks over all of a program's tiles as g, block g
lives in stage g % 2 and its barriers' phase is (g // 2) % 2. Against one program per tile: +8% at
B8 S2048, +9% at D64, -2% at S8192 (session 12, benchmarks/NOTES.md).

Causal ALiBi from slopes over at least ``hopper.REACH_MIN_KEYS`` keys (half as many in a training step,
``hopper.reach_applies``; ``REACH``): a tile starts at the first key block within ALiBi's reach of its first query
(``reach.py``: past it every probability is below 2^-48 of its row's largest), which the loader computes from the
heads' norm maxima and publishes with the tile's coordinates. A causal bias row (``REACH == REACH_ROW``) does the
same from its prefix maxima: the loader reads the tile's first block from ``reach.row_reach_kernel``'s table.
A training step over ``hopper.REACH_MIN_KEYS`` / 4 to 3 / 4 of it (``TABLE``, ``hopper.forward_table_applies``)
reads every block and hands its backward each 64 rows' first key block within reach instead (``store_first_block``;
from a bias row's terms, ``store_row_first_block``): its scores bound the far keys' far more closely than the norms
do, and no pass over q and k runs.

Scores (``hopper_scores``): with a positive scale and per-key terms a tensor-core product can add (none, causal
ALiBi, or a bias row without ALiBi: ``RAW``, ``hopper.raw_scores``) the terms join Q K^T through a k=16 extension
product and the row maximum is taken over the unscaled scores, the scale entering each exponential's fused
multiply-add (FA3's form). Against scaling every score and adding its terms in an FMA: no bias +2-4%, ALiBi +2-5%
at D64 and +0-2% at D128 (the extra product is 1/17 of a block's tensor-core work there), the bias row +4-6% at
D64 and +1-4% at D128 (benchmarks/NOTES.md session 35). Otherwise the scores are scaled first. ALiBi's extension
product reads no K, so it is issued at the end of the block before and Q K^T accumulates onto it: its latency
leaves the scores' path (D64 +1.8-3.2%, session 37). The same term as one FMA per score with the key's place as
an immediate (no registers: a thread's keys are its lane's base plus constants) measured 2-6% slower than the
product: the softmax's dependent chain, not the tensor cores, sets the D64 block's time.

A bias row over keys (MPT's ``(1, H, 1, S_k)`` tensor, any ``(B|1, H|1, 1, S_k)``) with ``RAW`` (``ROW_KEYS``):
its per-key terms (``common.row_keys_kernel``, [BLOCK_N, 16] per block) ride with K_j into a stage of their own.
Otherwise (with ALiBi, or a scale the extension cannot take) the row, as float32 log2 units, rides with V, into
a slot beside V's stage under V's barrier, and is added in the softmax's fused multiply-add with the
scale. Which block's slice rides with V_j depends on the head dim (``row_ahead``):
- D64: block j+1's (block 0's comes with the tile's Q). The consumer reads block j's slice at the top of
  block j, after waiting for V_{j-1} and before issuing S_j: loads issued behind a product wait until its
  shared-memory operands are read (read after S_j's issue: row / slopes 0.93; first: 0.95-0.97). V_{j-1}'s
  stage goes back only after P_{j-1} V_{j-1}, so every warp has read the slice by then. With block j's own
  slice the softmax of block j waited for V_j, which the loader issues a block after K_j: row / slopes
  0.89-0.94 -> 0.93-0.98.
- D128: block j's own, read after S_j's wait. Reading one block ahead keeps the slice's 32 registers
  live across that wait; ptxas spills at D128 and the row cells fell 4-13% (session 14).
A first version loaded the row from global memory per block: 0.52-0.76x.

A bias matrix in q's dtype (``BIAS_FULL``) rides with K instead: the loader copies each consumer's [64, BLOCK_N]
box of block j with K_j, the consumer reads it into the score tile's layout after S_j's wait and releases K's
stage after that (two stages x two boxes: 64 KB). At tile width 128 that only fits with one Q buffer per program
(``q_buffers``: 224 KB of 227), so the next tile's Q loads once this tile's output has left. The dense-bias
forward against the general kernel (session 19): 0.73 -> 0.59 ms at B4 H32 S2048 D64, 0.48 -> 0.37 ms at B4 H16
S2048 D128.

Scope (the launcher, ``hopper.py``, routes everything else to the general kernel in ``forward.py``):
bf16/fp16, head dim 64 or 72-128 (``HEAD_DIM``, the tile width, is 64 or 128: the copy engine reads
columns past D as zeros and drops them on stores; at D 72-96 the products take only 64 + ``TAIL`` columns,
16 or 32: D80 1.13x, D96 1.07x against all 128, benchmarks/NOTES.md session 18; at D 104-112 Q K^T takes 112,
``QK_COLS``, P V all 128: 1.01-1.02x, session 52), ALiBi from slopes (either
form) and/or a bias row or a bias matrix in q's dtype, no masks besides causal, no dropout, (B, S, H, D) inputs with
16-byte aligned strides (SDPA's (B, H, S, D) tensors transposed included), ``S_k > 0`` and, when causal,
``S_q <= S_k`` (every tile sees a block).

Packed sequences (``VARLEN``, ``attention_varlen``'s (T, H, D) tensors): tiles of 128 queries per sequence, counted
on the device (``hopper_tiles``), each with its sequence's lengths; Q, K and V boxes start at the sequence's first
row and run into the next sequence's (masked as keys, dropped as queries); output rows wholly inside the sequence
leave through the copy engine as dense, its last rows by masked plain stores, since a box would overwrite the next
sequence's rows. A tile whose rows see no key runs one masked block. With unused rows (``PACKED_USED``: FA3's
``seqused``, e.g. a right-padded batch run in place) the lengths are the used rows' and the rows past them may hold
anything: a tile's last block clears V's rows past the used keys before its P V (``clear_rows``; K's reach only
masked scores, Q's only rows never stored).
Against the general kernel on a ~50%-padded batch packed: forward 1.28x (D128), 1.23x (D64), 1.25x (non-causal)
(benchmarks/NOTES.md session 29).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from mpt_attention.impl.triton.common import LOG2E, SOFT_SCORE, encode_lse
from mpt_attention.impl.triton.gluon_compat import partition_arrive, partition_barrier, tma_store
from mpt_attention.impl.triton.hopper_loaders import clear_rows, forward_loader, q_buffer, q_buffers, row_ahead
from mpt_attention.impl.triton.hopper_scores import EXT_A_LAYOUT, EXT_B_LAYOUT, HALF_M, alibi_operand, alibi_side
from mpt_attention.impl.triton.hopper_scores import issue_alibi_ext, issue_over_d, issue_scores
from mpt_attention.impl.triton.hopper_scores import contracted_cols, main_cols, read_col_terms, read_tile_terms
from mpt_attention.impl.triton.hopper_scores import softmax_step
from mpt_attention.impl.triton.hopper_scores import write_key_positions, write_ones_operand
from mpt_attention.impl.triton.hopper_tiles import PACKED_USED, REACH_WORD, TABLE_NONE, TABLE_WORD, info_slot
from mpt_attention.impl.triton.reach import VANISH2

_SOFT_ROW = gl.constexpr(-1.2379400392853803e27)  # -2^90: below it a row's maximum is a soft mask's (ROW_KEYS)


@gluon.jit
def store_rows(Out, vals, first_row, n_rows, h, stride_os, stride_oh, col0, head_dim, layout: gl.constexpr):
    """Rows ``[first_row, first_row + n_rows)`` of head ``h`` of a packed (T, H, D) output from ``vals`` ([64, width]
    in ``layout``, columns from ``col0``; those past ``head_dim`` dropped): plain masked stores for packed sequences,
    where a copy-engine box of a sequence's last tile would overwrite the next sequence's rows (also the dK/dV
    kernel's dK and dV, 64 keys per consumer)."""
    rows = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, vals.shape[1], layout=gl.SliceLayout(0, layout))
    ptrs = Out + (first_row + rows).to(gl.int64)[:, None] * stride_os + h.to(gl.int64) * stride_oh + cols[None, :]
    gl.store(ptrs, vals, mask=(rows < n_rows)[:, None] & (cols < head_dim)[None, :])


@gluon.jit
def _consumer_tile(half, q3, buf, k_smem, v_smem, bias_smem, ext_a, ext_b, k_ready, k_empty, v_ready, v_empty, o_desc,
                   Lse, Slopes, g, info, stride_lb, stride_lh, stride_slb, stride_slh, seqlen_q, seqlen_k, qk_scale2,
                   Out, stride_os, stride_oh, head_dim, IS_CAUSAL: gl.constexpr, ALIBI: gl.constexpr,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, BIAS_ROW: gl.constexpr, TAIL: gl.constexpr,
                   BIAS_FULL: gl.constexpr, VARLEN: gl.constexpr, RAW: gl.constexpr, ROW_KEYS: gl.constexpr,
                   CONSUMERS: gl.constexpr, REACH: gl.constexpr, QK_COLS: gl.constexpr, Tiles,
                   TABLE: gl.constexpr):
    """One warpgroup, one tile: query rows ``start_m + 64 * half`` onwards (their Q in ``q3``, Q buffer ``buf``,
    landed), the key blocks they see (block j in stage ``(g + j) % 2``; with three consumers and a causal mask the
    tile's later blocks are released unread), then its output rows, staged through ``q3``
    (``VARLEN``: a sequence's last rows from registers, ``store_rows``). With a ``TAIL`` the output is two
    accumulators, columns [0, 64) and [64, 64 + TAIL). With ``REACH`` the tile's first block is the loader's
    ``first`` (``hopper_tiles.REACH_WORD``): the blocks before it lie past causal ALiBi's reach (``reach.py``) and were
    never loaded. With ``TABLE`` (every block read) it keeps each row's largest score before the blocks' shifts
    and stores its rows' first key block within reach (``store_first_block``); from a bias row (``ROW_KEYS``) each
    row's largest score less its block's least term (``store_row_first_block``)."""
    dtype: gl.constexpr = q3.dtype
    MAIN: gl.constexpr = main_cols(HEAD_DIM, TAIL)
    D_COLS: gl.constexpr = contracted_cols(HEAD_DIM, TAIL, QK_COLS)  # Q K^T's
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, MAIN, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    N_PV: gl.constexpr = 1 if TAIL == 0 else 2  # async groups per P V product (per S product likewise)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    HAS_COLS: gl.constexpr = (BIAS_ROW or ALIBI == 1) and not RAW
    ALIBI_MMA: gl.constexpr = RAW and ALIBI == 1
    EXT: gl.constexpr = ALIBI_MMA or ROW_KEYS  # an extension product adds per-key terms to the scores
    EARLY_EXT: gl.constexpr = ALIBI_MMA  # ALiBi's reads no K: issued a block early, Q K^T accumulates onto it
    ROW_TABLE: gl.constexpr = TABLE and ROW_KEYS  # (``Slopes``: the row's block terms, reach.row_block_terms)
    ROW_AHEAD: gl.constexpr = row_ahead(HEAD_DIM)
    ROW_FIRST: gl.constexpr = ROW_AHEAD and BIAS_ROW  # a slice to read before the block's first product

    # the coordinates come from memory before and again after the key loop, so that no register holds
    # them through it (the second consumer's loop rematerialised its column indices otherwise)
    b = gl.load(info, volatile=True)
    h = gl.load(info + 1, volatile=True)
    start_m = gl.load(info + 2, volatile=True)
    n_blocks = gl.load(info + 3, volatile=True)
    lo_masked = gl.load(info + 4, volatile=True)
    first = 0
    if REACH:
        first = gl.load(info + REACH_WORD, volatile=True)
    if VARLEN:  # the tile's sequence
        seqlen_q = gl.load(info + 6, volatile=True)
        seqlen_k = gl.load(info + 7, volatile=True)
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = gl.load(Slopes + b.to(gl.int64) * stride_slb + h.to(gl.int64) * stride_slh).to(gl.float32) * LOG2E
    row0 = start_m + half * HALF_M
    rows = row0 + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    diag = seqlen_k - seqlen_q
    if CONSUMERS == 3:  # this warpgroup's own blocks of the tile's (the rest it hands back unread, below)
        if IS_CAUSAL:
            n_blocks = gl.minimum(n_blocks, gl.cdiv(row0 + HALF_M + diag, BLOCK_N))
            lo_masked = gl.minimum((row0 + diag + 1) // BLOCK_N * BLOCK_N, seqlen_k // BLOCK_N * BLOCK_N)
        if row0 >= seqlen_q:  # the last tile's rows past the end: one block, never stored
            n_blocks = first + 1
    first_pos = row0 + diag  # this warpgroup's first query position (symmetric ALiBi's block sides)
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    alibi_cols = slope2 * offs_n.to(gl.float32)
    if ALIBI_MMA:
        ext_a.store(alibi_operand(slope2 / qk_scale2))
        fence_async_shared()
        partition_barrier()  # every warp's rows written before the warpgroup's first product reads them
    q = q3.reshape([HALF_M, HEAD_DIM])

    # block ``first`` (the launcher guarantees every tile at least one block)
    stage0 = g & 1
    phase0 = (g >> 1) & 1
    if ROW_AHEAD:  # block 0's slice came with Q; read before any product is issued (see the loop)
        col_terms = read_col_terms(alibi_cols, bias_smem, 2 + buf, col_layout, ALIBI, BIAS_ROW, BLOCK_N)
    mbarrier.wait(k_ready.index(stage0), phase0)
    s_tok = issue_scores(q, k_smem.index(stage0).reshape([BLOCK_N, HEAD_DIM]), ext_a, ext_b, half, stage0, s_zero,
                         D_COLS, EXT, ROW_KEYS, BLOCK_N)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    tile_terms = read_tile_terms(bias_smem, 2 * stage0 + half, s_layout, s_zero, BIAS_FULL)
    mbarrier.arrive(k_empty.index(stage0))
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
    if not ROW_AHEAD:
        if BIAS_ROW:
            mbarrier.wait(v_ready.index(stage0), phase0)
        col_terms = read_col_terms(alibi_cols, bias_smem, stage0, col_layout, ALIBI, BIAS_ROW, BLOCK_N)
    side = 0.0
    if ALIBI == 2:
        side = alibi_side(first * BLOCK_N, first_pos, BLOCK_N)
    p, alpha, m_i, l_i, row_top = softmax_step(s, m_i, l_i, rows, first * BLOCK_N, offs_n, col_terms, alibi_cols,
                                               side, tile_terms, qk_scale2, slope2, diag, seqlen_k,
                                               first * BLOCK_N >= lo_masked, IS_CAUSAL, ALIBI, HAS_COLS, BIAS_ROW,
                                               BIAS_FULL, RAW)
    row_terms = Slopes  # (ROW_TABLE: this row's block terms; never read otherwise)
    if ROW_TABLE:
        row_terms = Slopes + b.to(gl.int64) * stride_slb + h.to(gl.int64) * stride_slh
        row_top = row_top - gl.load(row_terms + first)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([HALF_M, MAIN], gl.float32, o_layout)
    if TAIL > 0:
        t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, TAIL, 16])
        t_rows: gl.constexpr = gl.SliceLayout(1, t_layout)
        acc_t = gl.zeros([HALF_M, TAIL], gl.float32, t_layout)
    s_ext = s_zero  # (EARLY_EXT: the next block's extension product, in flight from the end of the block before)
    if EARLY_EXT:
        # O's zeros must not be copied from one register after this product is issued (LLVM puts the loop's
        # initial copies there): ptxas takes such copies for reads of an accumulator under a product in flight
        # and serialises every product of the kernel (warning C7514). One opaque zero per register is written in
        # place instead.
        acc = gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [acc], dtype=gl.float32, is_pure=False, pack=1)
        s_ext = issue_alibi_ext(ext_a, ext_b, half, s_zero, BLOCK_N)

    g -= first  # the tile's block j is the program's block g + j
    for j in range(first + 1, n_blocks):
        stage = (g + j) & 1
        prev = 1 - stage
        low = 0.0
        if ROW_TABLE:  # the block's least term. (Its L2 round trip is not hidden: the S1024 D128 forward with a
            # row's table +13.5% against +3.5% with slopes', H100; benchmarks/patches/session78-row-table-prefetch.diff
            # loads it a block ahead, not yet run)
            low = gl.load(row_terms + j)
        if ROW_FIRST:
            # block j's bias slice came with V_{j-1}: read before S_j is issued. Issued after it (and before
            # P_{j-1} V_{j-1}), the loads returned only after both products had read their shared-memory operands:
            # the softmax's first use of the slice then held the consumers for 9% of their stall samples (ncu),
            # and row / slopes was 0.93 against 0.95-0.97 read first (benchmarks/NOTES.md session 26)
            mbarrier.wait(v_ready.index(prev), ((g + j - 1) >> 1) & 1)
            col_terms = read_col_terms(alibi_cols, bias_smem, prev, col_layout, ALIBI, BIAS_ROW, BLOCK_N)
        mbarrier.wait(k_ready.index(stage), ((g + j) >> 1) & 1)
        if EARLY_EXT:  # Q K^T onto the extension product issued at the end of the block before
            # waited here, under the loop's turn and K's barrier: left in flight across the loop's back edge,
            # ptxas again serialised every product (C7514)
            s_ext = warpgroup_mma_wait(0, deps=[s_ext])
            s_tok = issue_over_d(q, k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]), s_ext, D_COLS, True)
        else:
            s_tok = issue_scores(q, k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]), ext_a, ext_b, half, stage,
                                 s_zero, D_COLS, EXT, ROW_KEYS, BLOCK_N)
        if not ROW_FIRST:
            mbarrier.wait(v_ready.index(prev), ((g + j - 1) >> 1) & 1)
        v = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
        if TAIL == 0:
            acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        else:
            acc_tok = warpgroup_mma(p_op, v.slice(0, MAIN, dim=1), acc, is_async=True)
            acc_t_tok = warpgroup_mma(p_op, v.slice(MAIN, TAIL, dim=1), acc_t, is_async=True)
        s = warpgroup_mma_wait(N_PV, deps=[s_tok])
        tile_terms = read_tile_terms(bias_smem, 2 * stage + half, s_layout, s_zero, BIAS_FULL)
        mbarrier.arrive(k_empty.index(stage))
        if not ROW_AHEAD:
            if BIAS_ROW:  # block j's slice comes with V_j
                mbarrier.wait(v_ready.index(stage), ((g + j) >> 1) & 1)
            col_terms = read_col_terms(alibi_cols, bias_smem, stage, col_layout, ALIBI, BIAS_ROW, BLOCK_N)
        side = 0.0
        if ALIBI == 2:
            side = alibi_side(j * BLOCK_N, first_pos, BLOCK_N)
        p, alpha, m_i, l_i, top = softmax_step(s, m_i, l_i, rows, j * BLOCK_N, offs_n, col_terms, alibi_cols, side,
                                               tile_terms, qk_scale2, slope2, diag, seqlen_k, j * BLOCK_N >= lo_masked,
                                               IS_CAUSAL, ALIBI, HAS_COLS, BIAS_ROW, BIAS_FULL, RAW)
        if TABLE:
            row_top = gl.maximum(row_top, top - low)
        if TAIL == 0:
            acc, p_done = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
        else:
            acc, acc_t, p_done = warpgroup_mma_wait(0, deps=[acc_tok, acc_t_tok, p_op])
            acc_t = acc_t * gl.convert_layout(alpha, t_rows)[:, None]
        mbarrier.arrive(v_empty.index(prev))
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if EARLY_EXT:  # the next block's, off its scores' path (after the last block: waited for, unused)
            s_ext = issue_alibi_ext(ext_a, ext_b, half, s_zero, BLOCK_N)

    last = (g + n_blocks - 1) & 1
    mbarrier.wait(v_ready.index(last), ((g + n_blocks - 1) >> 1) & 1)
    v = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM])
    if VARLEN == PACKED_USED:  # only the tile's last block can reach past the used keys: its P V reads them last
        clear_rows(v, 0, gl.load(info + 7, volatile=True) - (n_blocks - 1) * BLOCK_N, BLOCK_N, HEAD_DIM)
    if TAIL == 0:
        acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        acc, p_done = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
    else:
        acc_tok = warpgroup_mma(p_op, v.slice(0, MAIN, dim=1), acc, is_async=True)
        acc_t_tok = warpgroup_mma(p_op, v.slice(MAIN, TAIL, dim=1), acc_t, is_async=True)
        acc, acc_t, p_done = warpgroup_mma_wait(0, deps=[acc_tok, acc_t_tok, p_op])
    mbarrier.arrive(v_empty.index(last))  # the loader refills this stage for the program's next tile
    if CONSUMERS == 3:  # the tile's blocks past this warpgroup's rows: released as they land
        for j in range(n_blocks, gl.load(info + 3, volatile=True)):
            stage = (g + j) & 1
            phase = ((g + j) >> 1) & 1
            mbarrier.wait(k_ready.index(stage), phase)
            mbarrier.arrive(k_empty.index(stage))
            mbarrier.wait(v_ready.index(stage), phase)
            mbarrier.arrive(v_empty.index(stage))

    b = gl.load(info, volatile=True)
    h = gl.load(info + 1, volatile=True)
    row0 = gl.load(info + 2, volatile=True) + half * HALF_M
    table_word = Tiles  # (without TABLE: never written)
    if TABLE:  # read beside the tile's other words, so that its latency overlaps theirs, not after the stores below
        table_word = Tiles + gl.load(info + TABLE_WORD, volatile=True) + half
    rows = row0 + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    lse_offset = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
    # Rows that saw no key are defined as 0 with a log-sum-exp of -inf (as in forward.py).
    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, o_rows)[:, None]
    out_t = out  # (no tail: never used)
    if TAIL > 0:
        out_t = acc_t / gl.convert_layout(l_safe, t_rows)[:, None]
    if VARLEN:
        q_start = gl.load(info + 5, volatile=True)
        seqlen_q = gl.load(info + 6, volatile=True)
        lse_offset += q_start
        if seqlen_q - row0 >= HALF_M:  # rows wholly inside the sequence: the copy engine's store, as dense
            store_through_buffer(q, q3, out, out_t, o_desc, 0, q_start + row0, h, MAIN, TAIL)
        else:  # the sequence's last rows: a box would overwrite the next sequence's
            store_rows(Out, out.to(dtype), q_start + row0, seqlen_q - row0, h, stride_os, stride_oh, 0, head_dim,
                       o_layout)
            if TAIL > 0:
                store_rows(Out, out_t.to(dtype), q_start + row0, seqlen_q - row0, h, stride_os, stride_oh, MAIN,
                           head_dim, t_layout)
    else:
        store_through_buffer(q, q3, out, out_t, o_desc, b, row0, h, MAIN, TAIL)
    if ROW_KEYS:  # a soft-masked row's maximum is SOFT_SCORE times (scale / its power of 2): common.row_keys_kernel
        m_i = gl.where(m_i < _SOFT_ROW, SOFT_SCORE, m_i)
    lse = encode_lse(m_i, l_i, BIAS_ROW or BIAS_FULL or ROW_KEYS)  # a soft-masked row keeps its key count
    gl.store(Lse + lse_offset + rows, lse, mask=rows < seqlen_q)
    if ROW_TABLE:
        store_row_first_block(table_word, rows, m_i, row_top, row_terms, qk_scale2, seqlen_q, seqlen_k, BLOCK_N,
                              s_layout)
    elif TABLE:
        store_first_block(table_word, rows, m_i, row_top, slope2, qk_scale2, seqlen_q, seqlen_k, BLOCK_N)
    tma.store_wait(0)


@gluon.jit
def store_first_block(word, rows, m_i, row_top, slope2, qk_scale2, seqlen_q, seqlen_k, BLOCK_N: gl.constexpr):
    """Into ``word``: the first key block that some of a warpgroup's 64 query ``rows`` (those below ``seqlen_q``)
    read above 2^-48 of their largest probability (``TABLE``: causal ALiBi from slopes, ``RAW``, every block read),
    for the backward's reach (``hopper_tiles.table_query_end``). In log2 units a score of key j in the block from
    ``j0`` is ``c * s_j + a * (j0 - (S_k - 1))`` with ``s_j`` the block's score before its shift (Q K^T plus the
    extension product's ``a / c * (j - j0)``), so with ``row_top`` the row's largest ``s_j`` over all its blocks
    every key of the block scores at most ``c * row_top + a * (j0 - (S_k - 1))``; below ``m_i - 48`` (the row's
    maximum, ``reach.VANISH2``) the block is past the row's reach. The bound is the data's own, where the norm pass
    bounds ``c * q.k`` by ``|c| Q K`` over the whole head (``reach.py``). The block holding the row's maximum, and
    every later one up to its own position, meet it: at most the row's diagonal block. A NaN, or a slope <= 0,
    gives block 0. Stored as ``TABLE_NONE`` less the block, by each row's atomic maximum (``hopper_tiles.
    table_query_end`` reads it so). Against the warpgroup's minimum over its rows and one store: the S1024 forward
    0.7-1.1% faster, the step 0.15-0.4% (H100, benchmarks/NOTES.md session 76)."""
    keep_from = (seqlen_k - 1).to(gl.float32) + (m_i - VANISH2 - row_top * qk_scale2) / slope2
    pos = rows + (seqlen_k - seqlen_q)
    keep_from = gl.where((keep_from == keep_from) & (slope2 > 0.0), gl.maximum(keep_from, 0.0), 0.0)
    # (the integer part rounds down: a block from key ``first * BLOCK_N >= keep_from`` on is kept, a block before is
    # past the reach)
    kept = gl.minimum(keep_from, pos.to(gl.float32)).to(gl.int32)
    store_table_entry(word, rows, gl.minimum((kept + BLOCK_N - 1) // BLOCK_N, pos // BLOCK_N), seqlen_q)


@gluon.jit
def store_table_entry(word, rows, first, seqlen_q):
    """Each of ``rows``' first key block into their 64 rows' table ``word``: ``TABLE_NONE`` less it, by an atomic
    maximum (the least block wins; ``hopper_tiles.table_query_end`` reads it so). The word starts at 0, no entry
    (``hopper.run_forward`` zeroes ``Tiles``); rows past S_q give none (alone: the last tile's third warpgroup, whose
    word lies past the table's row)."""
    gl.atomic_max(word + gl.zeros_like(rows), TABLE_NONE - first, mask=rows < seqlen_q, sem="relaxed")


@gluon.jit
def store_row_first_block(word, rows, m_i, row_top, row_terms, qk_scale2, seqlen_q, seqlen_k, BLOCK_N: gl.constexpr,
                          s_layout: gl.constexpr):
    """``store_first_block`` for a bias row over the keys (``ROW_KEYS``): a key j's unscaled score is ``q.k + t_j``
    (t the row over the scale). ``row_top`` is the row's largest score less its block's least term ``L`` (over
    every block the row read), so each key of block b scores at most ``row_top + L_b``: ALiBi's row, whose terms
    grow by the same steps in every block, gets ``store_first_block``'s bound. With ``P_b`` the prefix maximum of
    the L up to block b (``reach.row_block_terms``, at ``row_terms + n_kb``; a block of removed keys only, which
    scores -inf, counts -inf), a block with ``c * (row_top + P_b)`` below ``m_i - 49`` (``reach.VANISH2`` and one
    bit for the terms' float32 rounding) is past the row's reach, and so is every block before it. The row's first
    block is the count of such blocks, at most its diagonal's; a NaN, or a soft-masked key anywhere in the bias
    row (its prefix maxima +inf), counts none."""
    n_kb = gl.cdiv(seqlen_k, BLOCK_N)
    kb = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))  # (hopper.forward_table_applies: n_kb <= BLOCK_N)
    prefix = gl.load(row_terms + n_kb + kb, mask=kb < n_kb, other=float("inf"))
    past = (row_top[:, None] + prefix[None, :]) * qk_scale2 < (m_i - VANISH2 - 1.0)[:, None]  # [HALF_M, BLOCK_N]
    pos = rows + (seqlen_k - seqlen_q)
    store_table_entry(word, rows, gl.minimum(gl.sum(past.to(gl.int32), 1), pos // BLOCK_N), seqlen_q)


@gluon.jit
def store_through_buffer(q, q3, out, out_t, o_desc, b, row, h, MAIN: gl.constexpr, TAIL: gl.constexpr):
    """This warpgroup's output rows staged in its Q buffer (Q is no longer read) and bulk-stored from there at
    ``[b, row, h, 0]``; with a tail, the columns past it keep the copy engine's zeros, dropped by the store (also
    the dK/dV kernel's dK and dV, through its K and V buffers)."""
    dtype: gl.constexpr = q.dtype
    if TAIL == 0:
        q.store(out.to(dtype))
    else:
        q.slice(0, MAIN, dim=1).store(out.to(dtype))
        q.slice(MAIN, TAIL, dim=1).store(out_t.to(dtype))
    fence_async_shared()
    tma_store(o_desc, [b, row, h, 0], q3)


@gluon.jit
def _consumer_partition(half, Tiles, q_smem, k_smem, v_smem, bias_smem, ext_a, ext_b, q_ready, q_empty, k_ready,
                        k_empty, v_ready, v_empty, o_desc, Lse, Slopes, stride_lb, stride_lh, stride_slb, stride_slh,
                        seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim, IS_CAUSAL: gl.constexpr,
                        ALIBI: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, BIAS_ROW: gl.constexpr,
                        TAIL: gl.constexpr, BIAS_FULL: gl.constexpr, VARLEN: gl.constexpr, RAW: gl.constexpr,
                        ROW_KEYS: gl.constexpr, CONSUMERS: gl.constexpr, REACH: gl.constexpr,
                        QK_COLS: gl.constexpr, TABLE: gl.constexpr):
    """One warpgroup, the tiles the loader takes, until it sends an empty one (their coordinates in
    ``Tiles``); Q's buffer goes back to the loader once this warpgroup's output rows have left it."""
    my_ext_a = ext_a.index(half)
    if RAW and ALIBI == 1:
        write_key_positions(ext_b.index(half).reshape([BLOCK_N, 16]), BLOCK_N)
    if ROW_KEYS:
        write_ones_operand(my_ext_a)
    g = 0
    r = 0
    n_blocks = 1
    while n_blocks > 0:
        buf, q_phase = q_buffer(r, q_buffers(HEAD_DIM, BIAS_FULL))
        mbarrier.wait(q_ready.index(buf), q_phase)
        info = info_slot(Tiles, buf)
        n_blocks = gl.load(info + 3, volatile=True)
        if n_blocks > 0:
            _consumer_tile(half, q_smem.index(CONSUMERS * buf + half), buf, k_smem, v_smem, bias_smem, my_ext_a, ext_b,
                           k_ready, k_empty, v_ready, v_empty, o_desc, Lse, Slopes, g, info, stride_lb, stride_lh,
                           stride_slb, stride_slh, seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim,
                           IS_CAUSAL, ALIBI,
                           BLOCK_N, HEAD_DIM, BIAS_ROW, TAIL, BIAS_FULL, VARLEN, RAW, ROW_KEYS, CONSUMERS, REACH,
                           QK_COLS, Tiles, TABLE)
            first = 0
            if REACH:
                first = gl.load(info + REACH_WORD, volatile=True)
            # After the tile's output store has completed (tma.store_wait), and after every warp's last read of
            # the tile's slot: the arrive is one thread's (Triton 3.6), and once the slot is back the loader writes
            # the next tile's coordinates there. The reach's first block was read here after the arrive until
            # session 42: a warp that read the next tile's then counted its blocks wrong and waited on a stage phase
            # that never came (a stop seen with MPT's bias row at D64, benchmarks/NOTES.md session 42).
            partition_arrive(q_empty, buf)
            g += n_blocks - first
        r += 1


@gluon.jit
def _hopper_fwd_kernel(
    q_desc, k_desc, v_desc, o_desc, bias_desc, Lse, Slopes, Tiles, Out, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, CuTiles,
    stride_lb, stride_lh, stride_slb, stride_slh, stride_os, stride_oh,
    n_heads, n_groups, n_bh, seqlen_q, seqlen_k, qk_scale2, bias_b_on, bias_h_on, heads_per_group, head_dim,
    IS_CAUSAL: gl.constexpr, ALIBI: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    BIAS_ROW: gl.constexpr, TAIL: gl.constexpr = 0, BIAS_FULL: gl.constexpr = False, VARLEN: gl.constexpr = False,
    RAW: gl.constexpr = False, ROW_KEYS: gl.constexpr = False, CONSUMERS: gl.constexpr = 2,
    REACH: gl.constexpr = False, QK_COLS: gl.constexpr = 0, TABLE: gl.constexpr = False,
):
    """Persistent: each program runs query tiles of ``CONSUMERS`` * 64 rows (``hopper_tiles.forward_tile``: ``n_m`` per
    (batch, head) row, ``n_bh`` rows; ``VARLEN``: ``n_bh`` = sequences * heads, tiles counted by ``CuTiles``) until
    none is left; launched with num_warps=4 (the first consumer warpgroup), the other consumers and the loader come
    from ``warp_specialize``. The descriptors
    (host-built, see hopper.py) are q/o (B, S_q, H, D) and k/v (B, S_k, H_kv, D) with their strides, boxes
    [1, 64, 1, HEAD_DIM] for q/o and [1, BLOCK_N, 1, HEAD_DIM] for k/v: rows past a sequence's end and
    columns past D read as zeros and are never written. ``bias_desc`` (``BIAS_ROW``) views the bias row as
    (B|1, H|1, S_k) with boxes [1, 1, BLOCK_N]; ``bias_b_on``/``bias_h_on`` are 0 where it broadcasts.
    ``BIAS_FULL`` (D64 only: the shared memory): ``bias_desc`` views a bias matrix in q's dtype as (B' * H', S_q,
    S_k) with boxes [1, 64, BLOCK_N], batch b and head h at ``b * bias_b_on + h * bias_h_on``. ``VARLEN``: q/o and
    k/v are packed sequences viewed as (1, T, H, D), ``CuSeqQ``/``CuSeqK`` their int32 cumulative lengths and
    ``EndSeqQ``/``EndSeqK`` each one's end row (``cu[1:]``, or with ``PACKED_USED`` the end of its used rows); the
    output rows reaching past their sequence's end go to ``Out`` ((T, H, D), strides ``stride_os``, ``stride_oh``;
    ``head_dim`` columns) by plain stores, and those past it are not written; the LSE is (H, T_q) (``stride_lb``
    0)."""
    dtype: gl.constexpr = q_desc.dtype
    tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    BLOCK_M: gl.constexpr = CONSUMERS * HALF_M

    n_m = gl.cdiv(seqlen_q, BLOCK_M)
    # Q: two buffers (this tile's and the next; one with a D128 bias matrix), each two warpgroup halves
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS * q_buffers(HEAD_DIM, BIAS_FULL), 1, HALF_M, 1, HEAD_DIM],
                                       tile_layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, 1, BLOCK_N, 1, HEAD_DIM], tile_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, BLOCK_N, 1, HEAD_DIM], tile_layout)
    if BIAS_ROW:
        # slots 0, 1 beside V's stages; with row_ahead also 2, 3 beside Q's buffers (block 0's slice)
        if row_ahead(HEAD_DIM):
            bias_smem = gl.allocate_shared_memory(bias_desc.dtype, [4, 1, 1, BLOCK_N], bias_desc.layout)
        else:
            bias_smem = gl.allocate_shared_memory(bias_desc.dtype, [2, 1, 1, BLOCK_N], bias_desc.layout)
    elif BIAS_FULL:  # [stage, consumer]: the block's tile rows of each consumer warpgroup
        bias_smem = gl.allocate_shared_memory(bias_desc.dtype, [4, 1, HALF_M, BLOCK_N], bias_desc.layout)
    else:
        bias_smem = v_smem  # never read
    # the extension product's operands (RAW): A per consumer (ALiBi's slope parts, or ones against a bias row's
    # terms), B per consumer (ALiBi: the key positions) or per K stage (ROW_KEYS: the row's terms, with K)
    if (RAW and ALIBI == 1) or ROW_KEYS:
        ext_a = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, HALF_M, 16], EXT_A_LAYOUT)
        if ROW_KEYS:  # the copy engine's boxes: the descriptor's layout (hopper._ROW_KEYS_LAYOUT, the same)
            ext_b = gl.allocate_shared_memory(gl.bfloat16, [2, 1, 1, BLOCK_N, 16], bias_desc.layout)
        else:
            ext_b = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, 1, 1, BLOCK_N, 16], EXT_B_LAYOUT)
    else:
        ext_a = v_smem  # never read
        ext_b = v_smem
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=CONSUMERS)  # one arrival per consumer warpgroup
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)

    # (the partitions' arguments are spelled out: constexprs stored in a tuple variable become tensors)
    if CONSUMERS == 3:
        # setmaxnreg shares the register file among four warpgroups (the loader's warp takes one): 24 for the
        # loader, 160 for two consumers and what is left, 168, for the first
        gl.warp_specialize([
            (_consumer_partition, (0, Tiles, q_smem, k_smem, v_smem, bias_smem, ext_a, ext_b, q_ready, q_empty, k_ready,
                                      k_empty, v_ready, v_empty, o_desc, Lse, Slopes, stride_lb, stride_lh, stride_slb,
                                      stride_slh, seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim,
                                      IS_CAUSAL, ALIBI, BLOCK_N, HEAD_DIM, BIAS_ROW, TAIL, BIAS_FULL, VARLEN, RAW,
                                      ROW_KEYS, CONSUMERS, REACH, QK_COLS, TABLE)),
            (_consumer_partition, (1, Tiles, q_smem, k_smem, v_smem, bias_smem, ext_a, ext_b, q_ready, q_empty, k_ready,
                                      k_empty, v_ready, v_empty, o_desc, Lse, Slopes, stride_lb, stride_lh, stride_slb,
                                      stride_slh, seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim,
                                      IS_CAUSAL, ALIBI, BLOCK_N, HEAD_DIM, BIAS_ROW, TAIL, BIAS_FULL, VARLEN, RAW,
                                      ROW_KEYS, CONSUMERS, REACH, QK_COLS, TABLE)),
            (_consumer_partition, (2, Tiles, q_smem, k_smem, v_smem, bias_smem, ext_a, ext_b, q_ready, q_empty, k_ready,
                                      k_empty, v_ready, v_empty, o_desc, Lse, Slopes, stride_lb, stride_lh, stride_slb,
                                      stride_slh, seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim,
                                      IS_CAUSAL, ALIBI, BLOCK_N, HEAD_DIM, BIAS_ROW, TAIL, BIAS_FULL, VARLEN, RAW,
                                      ROW_KEYS, CONSUMERS, REACH, QK_COLS, TABLE)),
            (forward_loader, (Tiles, q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_ready,
                               q_empty, k_ready, k_empty, v_ready, v_empty, n_m, n_bh, heads_per_group, n_heads,
                               n_groups, seqlen_q, seqlen_k, bias_b_on, bias_h_on, CuTiles, CuSeqQ, CuSeqK, EndSeqQ,
                               EndSeqK, ext_b, Slopes, stride_slb, stride_slh, qk_scale2, IS_CAUSAL, BLOCK_N,
                               HEAD_DIM, BIAS_ROW, BIAS_FULL, VARLEN, ROW_KEYS, CONSUMERS, REACH, TABLE)),
        ], [4, 4, 1], [160, 160, 24])
    else:
        gl.warp_specialize([
            (_consumer_partition, (0, Tiles, q_smem, k_smem, v_smem, bias_smem, ext_a, ext_b, q_ready, q_empty, k_ready,
                                      k_empty, v_ready, v_empty, o_desc, Lse, Slopes, stride_lb, stride_lh, stride_slb,
                                      stride_slh, seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim,
                                      IS_CAUSAL, ALIBI, BLOCK_N, HEAD_DIM, BIAS_ROW, TAIL, BIAS_FULL, VARLEN, RAW,
                                      ROW_KEYS, CONSUMERS, REACH, QK_COLS, TABLE)),
            (_consumer_partition, (1, Tiles, q_smem, k_smem, v_smem, bias_smem, ext_a, ext_b, q_ready, q_empty, k_ready,
                                      k_empty, v_ready, v_empty, o_desc, Lse, Slopes, stride_lb, stride_lh, stride_slb,
                                      stride_slh, seqlen_q, seqlen_k, qk_scale2, Out, stride_os, stride_oh, head_dim,
                                      IS_CAUSAL, ALIBI, BLOCK_N, HEAD_DIM, BIAS_ROW, TAIL, BIAS_FULL, VARLEN, RAW,
                                      ROW_KEYS, CONSUMERS, REACH, QK_COLS, TABLE)),
            (forward_loader, (Tiles, q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_ready,
                               q_empty, k_ready, k_empty, v_ready, v_empty, n_m, n_bh, heads_per_group, n_heads,
                               n_groups, seqlen_q, seqlen_k, bias_b_on, bias_h_on, CuTiles, CuSeqQ, CuSeqK, EndSeqQ,
                               EndSeqK, ext_b, Slopes, stride_slb, stride_slh, qk_scale2, IS_CAUSAL, BLOCK_N,
                               HEAD_DIM, BIAS_ROW, BIAS_FULL, VARLEN, ROW_KEYS, CONSUMERS, REACH, TABLE)),
        ], [4, 1], [240, 24])
