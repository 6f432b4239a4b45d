"""Which tile a persistent Hopper program runs next (Gluon): the order of the forward's query tiles and of the
dK/dV kernel's key blocks, and each forward tile's key-block range, dense or over packed sequences.

A forward tile is 128 query rows of one (batch or sequence, head), 192 with three consumer warpgroups (dense D64,
``hopper.forward_consumers``). Dense inputs have ``n_m`` tiles per (batch, head) row; packed sequences
(``attention_varlen``) have ``cdiv(len_q, 128)`` per sequence, counted by ``CuTiles`` (cumulative over the
sequences, built on the device by ``hopper.forward``: no host sync).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from mpt_attention.impl.triton.common import LOG2E
from mpt_attention.impl.triton.reach import NORM_SLACK, VANISH2

BLOCK_M = gl.constexpr(128)  # query rows per forward tile of two consumer warpgroups (three: forward_tile's BLOCK_M)
# The forward's ``Tiles`` words: 16 counters ([0] the tile counter), then per program a slot of SLOT_WORDS for each of
# its two Q buffers (``info_slot``; hopper.forward_plan sizes it), then the reach's norm maxima and tables.
SLOT_WORDS = gl.constexpr(16)
PROGRAM_WORDS = gl.constexpr(32)
REACH_WORD = gl.constexpr(8)  # the slot's word holding the tile's first key block past the reach (``REACH``)
# the slot's word holding where the tile's first 64 rows' entry of the forward's table lies (``TABLE``: one word per
# 64 query rows of each (batch, head) past the program slots, ``forward_loader``, ``store_first_block``)
TABLE_WORD = gl.constexpr(10)
# a table entry is this less its first key block, so that a zeroed word holds none
# (``hopper_forward.store_first_block``)
TABLE_NONE = gl.constexpr(1 << 30)
# ``VARLEN``'s values: packed sequences whose every row takes part, or only each one's first ``seqused`` rows (FA3's
# arguments; ``attention_varlen``): the rest, which may hold anything (NaN), are cleared in shared memory before a
# product reads them (``hopper_loaders.clear_rows``), since 0 * NaN there would reach the used rows
PACKED = gl.constexpr(1)
PACKED_USED = gl.constexpr(2)


@gluon.jit
def tile_order(t, n_m, n_bh, heads_per_group):
    """(query tile, batch * head) of tile ``t``: tiles run longest first across a group of heads.
    Causal tiles near the bottom see the most keys; run per head, the last head's longest tiles would start
    near the end and finish last (8% of the kernel at S 8192, benchmarks/NOTES.md). A group's K and V fit in
    L2 together (``heads_per_group``, hopper.py); the one smaller group goes first, so the last group spreads
    over every SM."""
    pad = (heads_per_group - n_bh % heads_per_group) % heads_per_group
    group = (t + pad * n_m) // (heads_per_group * n_m)
    first = gl.maximum(group * heads_per_group - pad, 0)
    size = group * heads_per_group + heads_per_group - pad - first
    r = t - first * n_m
    return n_m - 1 - r // size, first + r % size


@gluon.jit
def sequence_of(r, n_seq, CuTiles):
    """The sequence that holds tile ``r`` (of one head): the last ``b`` with ``CuTiles[b] <= r`` (sequences
    without tiles are passed over), by bisection; also the dK/dV kernel's key blocks."""
    lo = 0
    hi = n_seq  # CuTiles[lo] <= r < CuTiles[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if gl.load(CuTiles + mid) <= r:
            lo = mid
        else:
            hi = mid
    return lo


@gluon.jit
def packed_tile(t, total, group):
    """(head, tile ``r`` over the packed sequences' tiles in order) of packed tile ``t``, of ``total`` per head:
    heads in groups of ``group`` (a divisor of the head count: ``hopper.packed_heads_per_group``), within a group
    tile after tile of each sequence with the group's heads innermost, so a sequence's longest tiles run for all
    of them before its shorter ones (heads outermost, the last sequence's long tiles of the last head started
    late: forward 0.322 ms against 0.274 for the same 8 x 2048 batch dense, backward 0.864 against 0.796, H200
    D128 causal, benchmarks/NOTES.md session 28)."""
    per_group = total * group
    hg = t // per_group
    rem = t - hg * per_group
    return hg * group + rem % group, rem // group


@gluon.jit
def n_forward_tiles(n_m, n_bh, n_heads, CuTiles, VARLEN: gl.constexpr):
    """Tiles of the forward grid: ``n_m`` per (batch, head) row, or over packed sequences ``CuTiles[n_seq]``
    per head."""
    if VARLEN:
        return gl.load(CuTiles + n_bh // n_heads) * n_heads
    else:
        return n_m * n_bh


@gluon.jit
def forward_tile(t, n_m, n_bh, heads_per_group, n_heads, n_groups, seqlen_q, seqlen_k, CuTiles, CuSeqQ, CuSeqK,
                 EndSeqQ, EndSeqK, IS_CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr,
                 BLOCK_M: gl.constexpr = BLOCK_M):
    """Tile ``t``'s ``(b, h, kv_h, start_m, n_blocks, lo_masked, q_start, k_start, len_q, len_k)``: key blocks
    ``[0, n_blocks)`` are visible to some row of the tile, those before ``lo_masked`` to every row; ``q_start``,
    ``k_start`` the sequence's first rows in the packed tensors (0 for dense inputs) and ``len_q``, ``len_k`` its
    lengths (the rows that take part: up to ``EndSeqQ[b]``, ``EndSeqK[b]``; ``masks.sequence_ends``). Packed:
    ``packed_tile``'s order, each sequence's tiles longest first (``heads_per_group`` heads' K and V of a sequence
    stay in L2 across its tiles). A packed tile none of whose rows sees a key (causal with
    ``len_q > len_k``, or no keys) runs one fully masked block: its rows come out 0 with a log-sum-exp of -inf, and
    0 blocks is the loader's stop signal to the consumers."""
    if VARLEN:
        total = gl.load(CuTiles + n_bh // n_heads)
        h, r = packed_tile(t, total, heads_per_group)
        b = sequence_of(r, n_bh // n_heads, CuTiles)
        m = gl.load(CuTiles + b + 1) - 1 - r  # the sequence's last tile first
        q_start = gl.load(CuSeqQ + b)
        len_q = gl.load(EndSeqQ + b) - q_start
        k_start = gl.load(CuSeqK + b)
        len_k = gl.load(EndSeqK + b) - k_start
    else:
        m, bh = tile_order(t, n_m, n_bh, heads_per_group)
        b = bh // n_heads
        h = bh % n_heads
        q_start = 0
        k_start = 0
        len_q = seqlen_q
        len_k = seqlen_k
    start_m = m * BLOCK_M
    diag = len_k - len_q
    hi = len_k
    lo_masked = len_k // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        hi = gl.minimum(hi, start_m + BLOCK_M + diag)
        lo_masked = gl.minimum((start_m + diag + 1) // BLOCK_N * BLOCK_N, lo_masked)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    if VARLEN:  # (the consumers take block 0 as masked when lo_masked is 0; negative with more queries than keys)
        n_blocks = gl.maximum(n_blocks, 1)
        lo_masked = gl.maximum(lo_masked, 0)
    return b, h, h // n_groups, start_m, n_blocks, lo_masked, q_start, k_start, len_q, len_k


@gluon.jit
def head_reach(Norms, b, h, kv_h, n_bh, n_heads, n_kv, slope2, qk_scale2):
    """How many keys causal ALiBi reaches behind a query of head ``h`` (``reach.py``; float, +inf or NaN where the
    bound gives nothing). ``Norms``: the queries' (B, H) norm maxima, then the keys' (B, H_kv), as float32 bit
    patterns (``n_bh`` = B * H words before the keys'); ``slope2`` the head's slope in log2 units."""
    q_max = gl.load(Norms + b * n_heads + h).to(gl.float32, bitcast=True)
    k_max = gl.load(Norms + n_bh + b * n_kv + kv_h).to(gl.float32, bitcast=True)
    return (VANISH2 + 2.0 * NORM_SLACK * gl.abs(qk_scale2) * q_max * k_max) / slope2


@gluon.jit
def reach_first_block(Tiles, b, h, kv_h, n_bh, n_heads, n_groups, first_pos, n_blocks, slope2, qk_scale2,
                      BLOCK_N: gl.constexpr):
    """The first key block that a causal ALiBi tile whose first query sits at key position ``first_pos`` must read:
    the blocks before it end at least the head's reach (``head_reach``) behind every query of the tile. The norm
    maxima lie in ``Tiles`` past the program slots (``info_slot``). 0 where the bound gives nothing (slope <= 0, an
    infinite or NaN norm, a reach past the tile)."""
    reach = head_reach(Tiles + 16 + gl.num_programs(0) * PROGRAM_WORDS, b, h, kv_h, n_bh, n_heads, n_heads // n_groups,
                       slope2, qk_scale2)
    first = 0
    # (the comparisons are false for NaN; below first_pos the reach converts exactly enough, and its integer part
    # plus one is at least the reach: keys from first_pos - that on are kept)
    if slope2 > 0.0 and reach < first_pos.to(gl.float32):
        keep_from = first_pos - reach.to(gl.int32)
        if keep_from > 0:
            first = gl.minimum(keep_from // BLOCK_N, n_blocks - 1)
    return first


@gluon.jit
def row_reach_first_block(Tiles, b, h, n_bh, n_heads, n_groups, m, n_m, n_blocks):
    """A causal bias row's first key block for query tile ``m`` of ``n_m`` (``reach.row_reach_kernel``'s forward
    table, past the program slots and the norm maxima in ``Tiles``), at most the tile's last block."""
    table = Tiles + 16 + gl.num_programs(0) * PROGRAM_WORDS + n_bh + n_bh // n_groups
    return gl.minimum(gl.load(table + (b * n_heads + h) * n_m + m), n_blocks - 1)


@gluon.jit
def row_reach_end_block(Tiles, b, h, n_bh, n_heads, n_groups, n_m, n_blocks, first):
    """A tile's block count under a causal bias row: none past the row's last key that is not removed
    (``reach.row_reach_kernel``'s ends, after its forward table), at least one past its ``first``."""
    ends = Tiles + 16 + gl.num_programs(0) * PROGRAM_WORDS + n_bh + n_bh // n_groups + n_bh * n_m
    return gl.maximum(gl.minimum(n_blocks, gl.load(ends + b * n_heads + h)), first + 1)


@gluon.jit
def row_reach_query_end(Table, b, h0, n_g, n_heads, key_block, n_kb):
    """The dK/dV kernel's end of the query rows for key block ``key_block`` of ``n_kb`` and query heads ``[h0, h0 +
    n_g)`` under a causal bias row: the largest of ``reach.row_reach_kernel``'s backward table's entries."""
    end = 0
    for g in range(n_g):
        end = gl.maximum(end, gl.load(Table + (b * n_heads + h0 + g) * n_kb + key_block))
    return end


@gluon.jit
def reach_query_end(Norms, Slopes, stride_slb, stride_slh, b, norm_b, h0, n_g, kv_h, n_heads, n_kv, norm_rows,
                    last_key, diag, seqlen_q, qk_scale2):
    """The dK/dV kernel's end of the query rows a key block ending at ``last_key`` must visit for query heads
    ``[h0, h0 + n_g)``: rows from it on sit at least every head's reach (``head_reach``) past the block's last key,
    so their probabilities there are below 2^-48 of their rows' largest. ``seqlen_q`` where the bound gives nothing
    for some head. The slopes' row ``b``; the norm maxima's row ``norm_b`` of ``norm_rows`` (packed sequences: one,
    ``reach.norm_row``)."""
    end = 0
    for g in range(n_g):
        h = h0 + g
        slope2 = gl.load(Slopes + b.to(gl.int64) * stride_slb + h.to(gl.int64) * stride_slh).to(gl.float32) * LOG2E
        reach = head_reach(Norms, norm_b, h, kv_h, norm_rows * n_heads, n_heads, n_kv, slope2, qk_scale2)
        head_end = seqlen_q
        # (the comparisons are false for NaN; below S_q the reach converts exactly enough, rounded up by one)
        if slope2 > 0.0 and reach < seqlen_q.to(gl.float32):
            head_end = gl.minimum(last_key + reach.to(gl.int32) + 1 - diag, seqlen_q)
        end = gl.maximum(end, head_end)
    return end


@gluon.jit
def table_query_end(Table, b, h0, n_g, n_heads, key_block, seqlen_q, BLOCK_W: gl.constexpr):
    """The dK/dV kernel's end of the query rows for key block ``key_block`` (of 128 keys, the forward's blocks) and
    query heads ``[h0, h0 + n_g)`` from the training forward's table (``hopper_forward.store_first_block``: per
    (batch, head) and 64 query rows, the first key block within their reach): one past the last 64 rows that read
    the block, ``seqlen_q`` at most. The rows of a block's own diagonal always read it, so every 64 query rows end
    some key block's range (``hopper_dkdv.first_write_dq``)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    n_w = gl.cdiv(seqlen_q, 64)
    end = gl.zeros([BLOCK_W], gl.int32, layout)
    for g in range(n_g):
        row = Table + ((b * n_heads + h0 + g) * n_w).to(gl.int64)
        for w0 in range(0, n_w, BLOCK_W):
            w = w0 + gl.arange(0, BLOCK_W, layout=layout)
            first = TABLE_NONE - gl.load(row + w, mask=w < n_w, other=0)  # (as store_first_block stores it)
            end = gl.maximum(end, gl.where(first <= key_block, (w + 1) * 64, 0))
    return gl.minimum(gl.max(end, 0), seqlen_q)


@gluon.jit
def info_slot(Tiles, buf):
    """This program's slot for the tile in Q buffer ``buf``, which the loader fills for the consumers: ``(b, h,
    start_m, n_blocks, lo_masked, q_start, len_q, len_k)``, and at ``REACH_WORD`` the tile's first key block
    (``REACH``)."""
    return Tiles + 16 + (gl.program_id(0) * 2 + buf) * SLOT_WORDS
