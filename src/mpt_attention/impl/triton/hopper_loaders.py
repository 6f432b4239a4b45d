"""The loader warps of the Hopper kernels: the producer side of each kernel's rings of shared-memory stages.

One warp per program issues every copy-engine (TMA) load and waits only on the barriers that say a stage is free
again; the consumers (``hopper_forward._consumer_partition``, ``hopper_backward._bwd_consumer_partition``) wait on
the barriers these loads complete. What each stage holds, and why the rings have the depths they have, is
explained in ``hopper_forward.py``'s and ``hopper_backward.py``'s docstrings; the ring sizes the consumers index
with the same arithmetic (``q_buffers``, ``q_buffer``, ``row_ahead``, ``bwd_stages``) live here beside the loops
that fill them, and so does ``clear_rows``, the consumers' part of what a landed stage holds for packed sequences
with unused rows.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from mpt_attention.impl.triton.backward import SOFT_BLOCK_ROWS
from mpt_attention.impl.triton.common import LOG2E
from mpt_attention.impl.triton.gluon_compat import partition_barrier, tma_load, wait_prior_grid
from mpt_attention.impl.triton.hopper_dq import HALF_N as _HALF_N
from mpt_attention.impl.triton.hopper_scores import HALF_M
from mpt_attention.impl.triton.hopper_tiles import PROGRAM_WORDS, REACH_WORD, TABLE_WORD, forward_tile
from mpt_attention.impl.triton.hopper_tiles import info_slot, n_forward_tiles
from mpt_attention.impl.triton.hopper_tiles import reach_first_block
from mpt_attention.impl.triton.hopper_tiles import row_reach_end_block, row_reach_first_block
from mpt_attention.impl.triton.reach import KERNEL_REACH_ROW


@gluon.constexpr_function
def q_buffers(head_dim, bias_full):
    """Q buffers per program: two (the next tile's Q lands under this tile's last blocks), one at D128 with a bias
    matrix, whose two stages of [128, 128] tiles take the second buffer's shared memory."""
    return 1 if bias_full and head_dim == 128 else 2


@gluon.jit
def q_buffer(r, Q_BUFS: gl.constexpr):
    """``(buffer, phase)`` of the Q of a program's ``r``-th tile."""
    if Q_BUFS == 2:
        return r & 1, (r >> 1) & 1
    else:
        return 0, r & 1


@gluon.constexpr_function
def row_ahead(head_dim):
    """Whether V_j carries block j+1's bias slice (else block j's): see ``hopper_forward.py``'s docstring."""
    return head_dim == 64


@gluon.constexpr_function
def _clear_layout(cols):
    """128 threads over an [8, ``cols``] slice: 8 elements (16 bytes) per thread along a row."""
    across = max(1, min(4, cols // 32))
    return gl.BlockedLayout([1, 8], [8, 4], [4 // across, across], [1, 0])


@gluon.jit
def clear_rows(tile, lo, hi, ROWS: gl.constexpr, COLS: gl.constexpr):
    """Rows of a landed [ROWS, COLS] shared-memory tile outside ``[lo, hi)`` set to zero, eight rows (the swizzle's
    period) at a time, then made visible to the tensor cores. Packed sequences with unused rows (``PACKED_USED``): a
    box reaching past a sequence's used rows brings rows that may hold anything, and a masked score does not stop
    0 * NaN in a product over them (P V, dV += P^T dO, dK += dS^T Q, dQ += dS K). One warpgroup's call; where two
    read the same stage both clear it, writing the same values."""
    layout: gl.constexpr = _clear_layout(COLS)
    if lo > 0 or hi < ROWS:
        for r in gl.static_range(0, ROWS, 8):
            if r < lo or r + 8 > hi:
                part = tile.slice(r, 8, dim=0)
                x = part.load(layout)
                rows = r + gl.arange(0, 8, layout=gl.SliceLayout(1, layout))
                keep = (rows >= lo) & (rows < hi)
                part.store(gl.where(keep[:, None], x, gl.zeros_like(x)))
        fence_async_shared()
        partition_barrier()  # every warp's rows cleared before the warpgroup's next product reads the tile


@gluon.jit
def forward_loader(Tiles, q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_ready, q_empty,
                   k_ready, k_empty, v_ready, v_empty, n_m, n_bh, heads_per_group, n_heads, n_groups, seqlen_q,
                   seqlen_k, bias_b_on, bias_h_on, CuTiles, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, ext_b, Slopes,
                   stride_slb, stride_slh, qk_scale2, IS_CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
                   HEAD_DIM: gl.constexpr, BIAS_ROW: gl.constexpr, BIAS_FULL: gl.constexpr, VARLEN: gl.constexpr,
                   ROW_KEYS: gl.constexpr, CONSUMERS: gl.constexpr, REACH: gl.constexpr, TABLE: gl.constexpr = False):
    """One warp: per tile, its Q into buffer ``round % 2`` (buffer 0 with one, ``q_buffers``) once the
    consumers have stored the output of the tile that used the buffer before, then K_j and V_j into stage
    ``g % 2`` (``g`` counts key blocks over all of the program's tiles) as soon as the consumers have released
    it: the next tile's first loads run under this tile's last blocks. Tiles are addressed as [batch, row, head, 0]
    in (B, S, H, D), packed sequences (``VARLEN``) as [0, first row + row, head, 0] in (1, T, H, D): rows past a
    sequence's end are its neighbour's, masked as keys and never stored as queries. With ``BIAS_FULL`` the bias
    tile of K_j's block rides with K_j: one [64, BLOCK_N] box per consumer, at row ``b * bias_b_on + h *
    bias_h_on`` of the (B' * H', S_q, S_k) matrix. With ``ROW_KEYS`` the bias row's key terms of K_j's block
    (``common.row_keys_kernel``: [BLOCK_N, 16]) ride with K_j into ``ext_b``'s stage. With ``REACH`` the tile's
    blocks start at ``hopper_tiles.reach_first_block``'s, published with the coordinates (a bias row's also end at
    ``hopper_tiles.row_reach_end_block``'s). With ``TABLE`` (dense inputs) it publishes where the tile's first 64
    rows' entry of the table lies (``hopper_tiles.TABLE_WORD``), after the program slots."""
    kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
    bias_bytes: gl.constexpr = BLOCK_N * bias_smem.dtype.primitive_bitwidth // 8
    k_bytes: gl.constexpr = kv_bytes + (2 * HALF_M * bias_bytes if BIAS_FULL else 0) + (
        BLOCK_N * 16 * 2 if ROW_KEYS else 0)
    Q_BUFS: gl.constexpr = q_buffers(HEAD_DIM, BIAS_FULL)
    ROW_AHEAD: gl.constexpr = row_ahead(HEAD_DIM)
    n_tiles = n_forward_tiles(n_m, n_bh, n_heads, CuTiles, VARLEN)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    g = 0
    r = 0
    t = pid  # the first round is fixed; then whichever program is ready first takes the next tile
    while t < n_tiles:
        b, h, kv_h, start_m, n_blocks, lo_masked, q_start, k_start, len_q, len_k = forward_tile(
            t, n_m, n_bh, heads_per_group, n_heads, n_groups, seqlen_q, seqlen_k, CuTiles, CuSeqQ, CuSeqK, EndSeqQ,
            EndSeqK, IS_CAUSAL, BLOCK_N, VARLEN, CONSUMERS * HALF_M)
        tb = b  # the descriptors' batch coordinate: 0 in the packed (1, T, H, D) view
        if VARLEN:
            tb = 0
        j0 = 0
        if REACH == KERNEL_REACH_ROW:  # (dense inputs only: packed sequences take no bias)
            j0 = row_reach_first_block(Tiles, b, h, n_bh, n_heads, n_groups, start_m // (CONSUMERS * HALF_M), n_m,
                                       n_blocks)
            n_blocks = row_reach_end_block(Tiles, b, h, n_bh, n_heads, n_groups, n_m, n_blocks, j0)
        elif REACH:
            slope2 = gl.load(Slopes + b.to(gl.int64) * stride_slb + h.to(gl.int64) * stride_slh).to(gl.float32)
            norm_b = b
            norm_bh = n_bh
            if VARLEN:  # one row of norm maxima per head over every token (reach.norm_row)
                norm_b = 0
                norm_bh = n_heads
            j0 = reach_first_block(Tiles, norm_b, h, kv_h, norm_bh, n_heads, n_groups, start_m + len_k - len_q,
                                   n_blocks, slope2 * LOG2E, qk_scale2, BLOCK_N)
        buf, q_phase = q_buffer(r, Q_BUFS)
        mbarrier.wait(q_empty.index(buf), q_phase ^ 1)  # a fresh barrier counts as released
        # the tile's coordinates for the consumers, published by the arrive in Q's expect below
        info = info_slot(Tiles, buf)
        gl.store(info, b)
        gl.store(info + 1, h)
        gl.store(info + 2, start_m)
        gl.store(info + 3, n_blocks)
        gl.store(info + 4, lo_masked)
        if VARLEN:
            gl.store(info + 5, q_start)
            gl.store(info + 6, len_q)
            gl.store(info + 7, len_k)
        if REACH:
            gl.store(info + REACH_WORD, j0)
        if TABLE:  # (hopper_forward.store_first_block)
            gl.store(info + TABLE_WORD, 16 + nprog * PROGRAM_WORDS + (b * n_heads + h) * gl.cdiv(seqlen_q, HALF_M)
                     + start_m // HALF_M)
        if BIAS_ROW and ROW_AHEAD:  # the first block's bias slice comes with Q, into slot 2 + buf
            mbarrier.expect(q_ready.index(buf), CONSUMERS * HALF_M * HEAD_DIM * 2 + bias_bytes)
            tma_load(bias_desc, [b * bias_b_on, h * bias_h_on, j0 * BLOCK_N],
                     q_ready.index(buf), bias_smem.index(2 + buf))
        else:
            mbarrier.expect(q_ready.index(buf), CONSUMERS * HALF_M * HEAD_DIM * 2)
        for part in gl.static_range(CONSUMERS):
            tma_load(q_desc, [tb, q_start + start_m + part * HALF_M, h, 0], q_ready.index(buf),
                     q_smem.index(CONSUMERS * buf + part))
        g -= j0  # the tile's block j is the program's block g + j
        for j in range(j0, n_blocks):
            stage = (g + j) & 1
            free_phase = ((g + j) >> 1) & 1 ^ 1
            mbarrier.wait(k_empty.index(stage), free_phase)
            mbarrier.expect(k_ready.index(stage), k_bytes)
            tma_load(k_desc, [tb, k_start + j * BLOCK_N, kv_h, 0], k_ready.index(stage),
                     k_smem.index(stage))
            if ROW_KEYS:
                tma_load(bias_desc, [b * bias_b_on, h * bias_h_on, j * BLOCK_N, 0],
                         k_ready.index(stage), ext_b.index(stage))
            if BIAS_FULL:
                for half in gl.static_range(2):
                    tma_load(bias_desc, [b * bias_b_on + h * bias_h_on,
                                         start_m + half * HALF_M, j * BLOCK_N],
                             k_ready.index(stage), bias_smem.index(2 * stage + half))
            mbarrier.wait(v_empty.index(stage), free_phase)
            row_block = j  # the block whose bias slice rides with V_j, into V's stage's slot
            if ROW_AHEAD:
                row_block = j + 1
            if BIAS_ROW and row_block < n_blocks:
                mbarrier.expect(v_ready.index(stage), kv_bytes + bias_bytes)
                tma_load(bias_desc, [b * bias_b_on, h * bias_h_on, row_block * BLOCK_N],
                         v_ready.index(stage), bias_smem.index(stage))
            else:
                mbarrier.expect(v_ready.index(stage), kv_bytes)
            tma_load(v_desc, [tb, k_start + j * BLOCK_N, kv_h, 0], v_ready.index(stage),
                     v_smem.index(stage))
        g += n_blocks
        r += 1
        t = nprog + gl.atomic_add(Tiles, 1)  # Tiles[0] counts the tiles taken after the first round
    # no tile left: an empty one (n_blocks 0) tells the consumers to stop
    buf, q_phase = q_buffer(r, Q_BUFS)
    mbarrier.wait(q_empty.index(buf), q_phase ^ 1)
    gl.store(info_slot(Tiles, buf) + 3, 0)
    mbarrier.arrive(q_ready.index(buf))


@gluon.constexpr_function
def bwd_stages(block_m, bias_full):
    """Stages of the (Q, dO, row terms) ring: 3, or 2 where a third does not fit (a bias matrix at 64 queries
    per step: 231 KB; where the consumers form dQ, 3 fit beside 2 x 16 KB of dS and 32 KB of dQ staging). With 2
    the consumers waited on the copy engine for the next step's tiles (13% of the fused kernel's warp samples once
    the row terms no longer waited on global loads, benchmarks/NOTES.md session 21): the loader may refill a stage
    only after both consumers finished the step that used it."""
    return 2 if bias_full and block_m == 64 else 3


@gluon.jit
def backward_loader(k_desc, v_desc, q_desc, do_desc, bias_desc, stats_desc, k_smem, v_smem, q_smem, do_smem,
                    bias_smem, stats_smem, kv_bar, ready, empty, b, kv_h, h0, n_g, n_heads, start_n, lo, seqlen_q,
                    bias_bm, bias_hm, q_off, k_off, dos_desc, SoftBlocks, n_queries, HEAD_DIM: gl.constexpr,
                    BLOCK_M: gl.constexpr, BIAS_FULL: gl.constexpr, SOFT_BLOCKS: gl.constexpr,
                    WAIT: gl.constexpr = False):
    """One warp: this program's K and V once, then (Q, dO) of query block after query block, head after
    head of the program's ``n_g`` query heads from ``h0``, each into stage ``count % STAGES`` once the consumers
    have released it, with the queries' row terms (LSE offset and delta: 2 x BLOCK_M float32); with
    ``BIAS_FULL`` the step's bias tile too, one [BLOCK_M, 64] box per consumer. ``b`` is the descriptors' batch
    coordinate; ``q_off``, ``k_off`` a packed sequence's first rows (0 for dense inputs). ``SOFT_BLOCKS``: dO from
    ``dos_desc`` for the 64-query blocks whose word in ``SoftBlocks`` (cdiv(``n_queries``, 64) per head) is 1, each
    word read a step ahead (the first before K's and V's loads). ``WAIT``: the delta kernel, which writes the row
    terms (and dO's scaled rows and the blocks' words), may still run (``hopper_backward``'s ``PDL``): K's and V's
    loads go first."""
    if WAIT and SOFT_BLOCKS:
        wait_prior_grid()
    if SOFT_BLOCKS:  # the words of head h0's query blocks, then h0 + 1's, ...
        soft_words = gl.cdiv(n_queries, SOFT_BLOCK_ROWS)
        words = SoftBlocks + ((b * n_heads + h0) * soft_words).to(gl.int64)
        scaled = gl.load(words + lo // SOFT_BLOCK_ROWS)  # (lo < S_q: a causal key block's first query is a real one)
    mbarrier.expect(kv_bar, 4 * _HALF_N * HEAD_DIM * 2)
    for half in gl.static_range(2):
        tma_load(k_desc, [b, k_off + start_n + half * _HALF_N, kv_h, 0], kv_bar,
                 k_smem.index(half))
        tma_load(v_desc, [b, k_off + start_n + half * _HALF_N, kv_h, 0], kv_bar,
                 v_smem.index(half))
    if WAIT and not SOFT_BLOCKS:
        wait_prior_grid()
    STAGES: gl.constexpr = bwd_stages(BLOCK_M, BIAS_FULL)
    tile_bytes: gl.constexpr = 2 * BLOCK_M * HEAD_DIM * 2 + 2 * BLOCK_M * 4 + (2 * BLOCK_M * _HALF_N * 2 if BIAS_FULL
                                                                                else 0)
    count = 0
    for g in range(n_g):
        bias_row = b * bias_bm + (h0 + g) * bias_hm
        for start_m in range(lo, seqlen_q, BLOCK_M):
            stage = count % STAGES
            if SOFT_BLOCKS:  # the next step's word (this step's again after the last)
                next_m = start_m + BLOCK_M
                next_g = g
                if next_m >= seqlen_q:
                    next_m = lo
                    next_g = g + 1
                if next_g >= n_g:
                    next_m = start_m
                    next_g = g
                next_scaled = gl.load(words + next_g * soft_words + next_m // SOFT_BLOCK_ROWS)
            mbarrier.wait(empty.index(stage), (count // STAGES) % 2 ^ 1)  # a fresh barrier counts as released
            mbarrier.expect(ready.index(stage), tile_bytes)
            tma_load(q_desc, [b, q_off + start_m, h0 + g, 0], ready.index(stage),
                     q_smem.index(stage))
            tma_load(stats_desc, [b * n_heads + h0 + g, 0, q_off + start_m], ready.index(stage),
                     stats_smem.index(stage))
            if BIAS_FULL:
                for half in gl.static_range(2):
                    tma_load(bias_desc, [bias_row, start_m, start_n + half * _HALF_N],
                             ready.index(stage), bias_smem.index(2 * stage + half))
            if SOFT_BLOCKS:
                if scaled != 0:
                    tma_load(dos_desc, [b, start_m, h0 + g, 0], ready.index(stage),
                             do_smem.index(stage))
                else:
                    tma_load(do_desc, [b, start_m, h0 + g, 0], ready.index(stage),
                             do_smem.index(stage))
                scaled = next_scaled
            else:
                tma_load(do_desc, [b, q_off + start_m, h0 + g, 0], ready.index(stage),
                         do_smem.index(stage))
            count += 1
