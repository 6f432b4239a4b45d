"""How far back causal ALiBi can see: past its reach every probability is below 2^-48 of the row's largest, so the
keys there hold together less than 2^-24 of the row's weight (float32's unit roundoff) for any S_k up to 2^24, and the
kernels leave them out.

With ``c = softmax_scale * log2(e)`` and ``a = slope * log2(e)`` (both log2 units), query i at position
``p = i + S_k - S_q`` gives key ``j <= p`` the score ``x_j = c * q.k_j - a * (p - j)`` (MPT's causal ALiBi, shifted
by a constant per row). The row's maximum ``m`` is at least the score of its own position, ``x_p = c * q.k_p``, so
by Cauchy-Schwarz, with ``|q|`` and ``|k|`` at most ``Q`` and ``K`` over the head's rows::

    x_j - m  <=  2 |c| Q K - a (p - j)

Every key at least ``reach = (VANISH2 + 2 |c| Q K) / a`` behind the query's position has ``x_j - m <= -VANISH2``
(48). The row's sum of ``2^(x_j - m)`` is at least 1 (its maximum's term), so the n keys left out weigh less than
``eps = n 2^-48`` of it: the output moves by at most ``2 eps max|v|``, the log-sum-exp by ``eps``, each gradient by
as little, far below the kernels' own rounding (P enters P V in q's 16-bit type). What does show is that a row's
online softmax starts at another block, whose scores round differently in float32 (the Hopper forward's first
block adds ALiBi's extension product after Q K^T, later blocks before it): where that block holds a row's large
probabilities, one may round to its 16-bit neighbour, a difference of the size of the rounding either way
(``testing.assert_agrees_with_every_block``; both meet the float64 reference's tolerance,
tests/test_gpu_hopper_reach.py). Until session 65 the margin was 128, where the Hopper kernels' exponential flushes
to 0 and the first computed block held only such probabilities; at 48 the reach is ~45% shorter at D64-128 with q,
k ~ N(0, 1), and a model of MPT's slopes leaves out ~27% of an S 2048 forward's blocks instead of ~19%
(benchmarks/NOTES.md session 65).
A causal tile whose first query sits at ``p0`` needs no key block that ends at least ``reach`` before ``p0``.

The bound needs each head's largest query and key norms: ``row_norm_max_kernel`` reads q and k once before the
kernel (memory-bound) and keeps the maxima as float32 bit patterns, whose integer order is the float order for
non-negative values, so an atomic maximum over int32 takes them. A NaN norm (a NaN or infinite input) is kept as
+inf: the head then reads every key, as without the bound. Slopes <= 0 (no decay) read every key too.

A bias row over the keys (MPT's ``(1, H, 1, S_k)`` ALiBi tensor, or any ``(B|1, H|1, 1, S_k)`` row) takes the same
bound with the row in place of the slope. In log2 units (``launch._log2_bias_rows``) key j scores ``x_j = c * q.k_j +
r_j``; with ``P(p) = max(r_0 .. r_p)`` the row's prefix maximum, a causal query at position ``p`` keeps a key scoring at
least ``P(p) - |c| Q K``, so::

    x_j - m  <=  2 |c| Q K + r_j - P(p)

and a key block whose prefix maximum at its last key, raised by 2^-12 of its magnitude, plus ``R = VANISH2 + 2 |c| Q
K`` is at most ``P(p0)`` lowered by 2^-12 of its magnitude is past the reach of every query from ``p0`` on (the 2^-12
cover the float32 rounding of the row's terms in the kernels' scores, far below it). ``P`` is kept on the converted
row (``kept.kept_on``: made once for a model's layers); ``row_reach_kernel`` turns it and the norms into a table per
call: each forward tile's first key block, or each backward key block's end of queries. Queries whose prefix maximum
is not a finite score above the soft mask (``common.SOFT_SCORE``) take nothing from it. A table costs one small launch
(3 us at S 8192) and leaves the kernels one load per tile or key block.

A training step over ``REACH_MIN_KEYS / 4`` to ``3 REACH_MIN_KEYS / 4`` keys takes neither bound
(``hopper.forward_table_applies``): its forward reads every block and keeps each row's largest score before the
blocks' ALiBi shifts, which bounds every key of a block from ``j0`` by ``c * top + a * (j0 - (S_k - 1))``; against
the row's maximum that gives each 64 rows' first key block within reach (``hopper_forward.store_first_block``), a
table the backward's key blocks end their queries by (``REACH_TABLE``). Where the norms' bound pays ``2 |c| Q K``
over the whole head, this one pays the row's own spread of scores and at most one block's ALiBi span. From a bias
row over the keys (its terms in the forward's extension product) each row keeps its largest score less the block's
least term, which bounds every key of a block by ``c * (top + L_b)`` (``row_block_terms``,
``hopper_forward.store_row_first_block``): for MPT's ALiBi row the same bound as from slopes.

What it saves depends on the data: see benchmarks/NOTES.md sessions 39-40 for N(0, 1) and
wider inputs at MPT's slopes, and for the lengths below which reading the norms costs more than the skipped blocks
(``hopper.REACH_MIN_KEYS``; a training step, which reads them once for its forward and backward, from half that:
session 64).
"""

import torch
import triton
import triton.language as tl

from mpt_attention.impl.triton.lean_launch import PlannedLaunch, cdiv, next_power_of_2
from mpt_attention.kept import kept_on

# log2 units below a row's maximum past which keys are left out: their weight, n 2^-48 of the row's, stays below
# float32's unit roundoff up to 2^24 keys; the norms' product, whose float32 sums of products round, is scaled by
# 1 + 2^-8 where the kernels use it
VANISH2 = tl.constexpr(48.0)
NORM_SLACK = tl.constexpr(1.00390625)  # 1 + 2^-8
# a bias row's scores round with its terms' magnitude (row_keys_kernel's three bfloat16 parts sum to float32's
# precision; the backward adds the float32 term): this share of a prefix maximum covers them many times over
ROW_SLACK = tl.constexpr(0.000244140625)  # 2^-12
# what ``hopper.reach_applies`` returns: the reach from the slopes, or from a bias row's prefix maxima
REACH_SLOPES, REACH_ROW = 1, 2
# the backward's third source (``hopper.forward_table_applies``): causal ALiBi from slopes, each 64 query rows' first
# key block found by the training step's forward (``hopper_forward.store_first_block``)
REACH_TABLE = 3
ROW_STEP = 64  # a bias row's reach ends the backward's queries at a multiple of this (row_reach_kernel)
KERNEL_REACH_ROW = tl.constexpr(REACH_ROW)  # (what a kernel compares its REACH with)
KERNEL_REACH_TABLE = tl.constexpr(REACH_TABLE)
_SOFT_SCORE = tl.constexpr(-1.2676506002282294e30)  # common.SOFT_SCORE: -2^100, the soft mask


@triton.jit
def row_norm_max_kernel(
    Q, K, Norms,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    seqlen_q, seqlen_k, n_kv, head_dim, first,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``Norms[first + b * H + h]`` and ``Norms[first + B * H + b * H_kv + h]`` (int32, zeroed by the caller) become
    at least the bit patterns of the largest Euclidean norms, as float32, of ``Q[b, s, h, :]`` and ``K[b, s, h, :]``
    over the rows ``s`` of this program's block; +inf for a NaN norm. (B, S, H, D) tensors with a unit last stride;
    grid ``(cdiv(S_q, BLOCK_S) + cdiv(S_k, BLOCK_S), H, B)``: q's blocks, then k's (programs past H_kv idle)."""
    blocks_q = tl.cdiv(seqlen_q, BLOCK_S)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_heads = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    # (each branch forms its own pointers: q's and k's strides may differ in width, int32 against int64)
    if pid < blocks_q:
        rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows.to(tl.int64)[:, None] * stride_qs + cols[None, :])
        ok = rows < seqlen_q
        out = Norms + first + b * n_heads + h
    else:
        rows = (pid - blocks_q) * BLOCK_S + tl.arange(0, BLOCK_S)
        ptrs = (K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + rows.to(tl.int64)[:, None] * stride_ks + cols[None, :])
        ok = (rows < seqlen_k) & (h < n_kv)  # (k's programs past H_kv: no row, no write)
        out = Norms + first + tl.num_programs(2) * n_heads + b * n_kv + h
    x = tl.load(ptrs, mask=ok[:, None] & (cols < head_dim)[None, :], other=0.0).to(tl.float32)
    # [BLOCK_S]
    norms = tl.sqrt(tl.sum(x * x, 1))
    norms = tl.where(norms == norms, norms, float("inf"))  # NaN: the head's bound gives no reach
    if tl.sum(ok.to(tl.int32), 0) > 0:
        tl.atomic_max(out, tl.max(norms, 0).to(tl.int32, bitcast=True))


@triton.jit
def _head_reach2(Norms, b, h, n_heads, n_kv, batch, qk_scale2):
    """``R = VANISH2 + 2 |c| Q K`` of head ``h`` of batch row ``b`` (log2 units; +inf for an infinite norm)."""
    q_max = tl.load(Norms + b * n_heads + h).to(tl.float32, bitcast=True)
    k_max = tl.load(Norms + batch * n_heads + b * n_kv + h // (n_heads // n_kv)).to(tl.float32, bitcast=True)
    return VANISH2 + 2.0 * NORM_SLACK * tl.abs(qk_scale2) * q_max * k_max


@triton.jit
def slope_reach(Norms, b, h, n_heads, n_kv, batch, slope2, qk_scale2):
    """How many keys causal ALiBi of log2 slope ``slope2`` reaches behind a query of head ``h`` of batch row ``b``
    (the general kernels' form of ``hopper_tiles.head_reach``): +inf where the bound gives nothing (slope <= 0, a NaN
    or infinite norm)."""
    reach = _head_reach2(Norms, b, h, n_heads, n_kv, batch, qk_scale2) / slope2
    return tl.where((slope2 > 0.0) & (reach == reach), reach, float("inf"))


@triton.jit
def norm_row(b, batch, PACKED: tl.constexpr):
    """``(row, rows)``: the batch row of norm maxima that a program of batch row ``b`` (of ``batch``) reads, and how
    many rows there are. Packed sequences share row 0 of 1: each head's maxima over every token
    (``launch._reach_norms``), a bound for each of its sequences."""
    row = b
    rows = batch
    if PACKED:
        row = 0
        rows = 1
    return row, rows


@triton.jit
def reach_first_key(Norms, b, h, n_heads, n_kv, batch, slope2, qk_scale2, first_pos, BLOCK_N: tl.constexpr):
    """The first key, a multiple of ``BLOCK_N``, that a causal ALiBi query tile whose first query sits at key position
    ``first_pos`` must read: every key before it lies more than the head's reach behind every query of the tile
    (``hopper_tiles.reach_first_block``'s rule). 0 where the bound gives nothing."""
    reach = slope_reach(Norms, b, h, n_heads, n_kv, batch, slope2, qk_scale2)
    # (below first_pos the reach converts exactly enough; its integer part plus one is at least the reach)
    ok = reach < first_pos.to(tl.float32)
    keep_from = first_pos - tl.where(ok, reach, 0.0).to(tl.int32)
    return tl.where(ok, keep_from // BLOCK_N * BLOCK_N, 0)


@triton.jit
def reach_query_end(Norms, b, h, n_heads, n_kv, batch, slope2, qk_scale2, last_key, diag, seqlen_q):
    """The end of the query rows a key block ending at ``last_key`` must visit for head ``h``: rows from it on sit
    more than the head's reach past the block (``hopper_tiles.reach_query_end``'s rule). ``seqlen_q`` where the
    bound gives nothing."""
    reach = slope_reach(Norms, b, h, n_heads, n_kv, batch, slope2, qk_scale2)
    ok = reach < seqlen_q.to(tl.float32)
    end = last_key + tl.where(ok, reach, 0.0).to(tl.int32) + 1 - diag
    return tl.where(ok, tl.minimum(end, seqlen_q), seqlen_q)


@triton.jit
def _row_floor(prefix, reach2):
    """``(floor, live)``: a key block whose ``_row_top`` is at most ``floor`` lies past the reach of a query whose
    position's prefix maximum is ``prefix``; ``live`` is False where that prefix gives nothing (NaN, infinite, soft
    mask, or an infinite reach)."""
    reach2 = tl.zeros_like(prefix) + reach2  # (the interpreter takes no `&` of a vector and a scalar)
    live = (prefix > _SOFT_SCORE) & (prefix < float("inf")) & (reach2 < float("inf"))
    return tl.where(prefix < 0, prefix * (1 + ROW_SLACK), prefix * (1 - ROW_SLACK)) - reach2, live


@triton.jit
def _row_top(prefix):
    """A key block's prefix maximum raised by its rounding slack (-inf stays -inf: every key so far is removed)."""
    return tl.where(prefix < 0, prefix * (1 - ROW_SLACK), prefix * (1 + ROW_SLACK))


@triton.jit
def row_reach_kernel(
    Norms, Prefix, Rows, Ends, Table,
    stride_pb, stride_ph, stride_rb, stride_rh, stride_eb, stride_eh,
    seqlen_q, seqlen_k, n_kv, qk_scale2, n_entries, norms_first, table_first,
    FOR_BACKWARD: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_STEP: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """A causal bias row's reach as a table the Hopper kernels read, ``Table[table_first + (b * H + h) * n_entries +
    e]`` (int32). Forward: entry ``e`` is the query tile of ``TILE_M`` rows from ``e * TILE_M``; the value its first key
    block of ``BLOCK_N`` to read (the kernel clamps it to the tile's last). After the B * H * ``n_entries`` entries,
    one per (b, h): the end of the blocks any tile must read. Blocks past the row's last key that is not removed
    (-inf; a padded batch row's end, launch.forward's bias row for a key padding mask) add nothing to any query's
    result, not even to its rescales. Backward (``FOR_BACKWARD``): entry ``e`` is the key block ``[e * BLOCK_N, (e +
    1) * BLOCK_N)``; the value the end of the queries it must visit, a multiple of ``ROW_STEP`` (or ``seqlen_q``): the
    rows from it on lie past its reach. ``Prefix``: the row's prefix maxima (log2 units; (B', H', S_k) with strides
    ``stride_pb``, ``stride_ph``, 0 where it broadcasts). ``Ends``: the forward's ends (``row_ends``: (B', H') int32,
    strides ``stride_eb``, ``stride_eh``). ``Rows``: the row itself (strides ``stride_rb``, ``stride_rh``), read for
    the backward's key blocks, whose bound is their own maximum: a block of removed keys after kept ones is past
    every query's reach, where the prefix at its last key would keep it for every later query. ``Norms``: the heads'
    norm maxima (``row_norm_max_kernel``, q's (B, H) then k's (B, H_kv), from word ``norms_first``). Grid
    ``(cdiv(n_entries, BLOCK_E), H, B)``."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_heads = tl.num_programs(1)
    reach2 = _head_reach2(Norms + norms_first, b, h, n_heads, n_kv, tl.num_programs(2), qk_scale2)
    row = Prefix + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
    diag = seqlen_k - seqlen_q
    entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = entries < n_entries
    scan = tl.arange(0, BLOCK_S)
    if FOR_BACKWARD:
        # [BLOCK_E, BLOCK_N] the key block's terms; [BLOCK_E] their maximum, NaN if any is NaN (never past)
        keys = entries[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        terms = tl.load(Rows + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh + keys,
                        mask=e_ok[:, None] & (keys < seqlen_k), other=float("-inf"))
        has_nan = tl.max((terms != terms).to(tl.int32), 1) > 0
        top = tl.where(has_nan | ~e_ok, float("nan"), _row_top(tl.max(terms, 1)))
        keep_to = tl.zeros([BLOCK_E], tl.int32)  # grid rows up to which some row still reads the block
        for s0 in range(0, tl.cdiv(seqlen_q, ROW_STEP), BLOCK_S):
            grid_rows = (s0 + scan) * ROW_STEP
            pos = grid_rows + diag
            ok = (grid_rows < seqlen_q) & (pos >= 0)
            floor, live = _row_floor(tl.load(row + pos, mask=ok, other=float("nan")), reach2)
            # [BLOCK_E, BLOCK_S]
            past = (live[None, :] & (top[:, None] <= floor[None, :])) | (grid_rows >= seqlen_q)[None, :]
            keep_to = tl.maximum(keep_to, tl.max(tl.where(past, 0, (s0 + scan + 1)[None, :]), 1))
        value = tl.minimum(keep_to * ROW_STEP, seqlen_q)
    else:
        pos = entries * TILE_M + diag  # the tile's first query's position
        floor, live = _row_floor(tl.load(row + pos, mask=e_ok & (pos >= 0), other=float("nan")), reach2)
        n_blocks = tl.cdiv(seqlen_k, BLOCK_N)
        value = tl.full([BLOCK_E], n_blocks, tl.int32)  # the first block the tile must read
        for s0 in range(0, n_blocks, BLOCK_S):
            blocks = s0 + scan
            top = _row_top(tl.load(row + tl.minimum(blocks * BLOCK_N + BLOCK_N - 1, seqlen_k - 1),
                                   mask=blocks < n_blocks, other=float("nan")))
            # [BLOCK_E, BLOCK_S]
            past = live[:, None] & (top[None, :] <= floor[:, None])
            value = tl.minimum(value, tl.min(tl.where(past, n_blocks, blocks[None, :]), 1))
        if tl.program_id(0) == 0:  # and the row's end (row_ends)
            ends = Table + table_first + n_heads * tl.num_programs(2) * n_entries
            tl.store(ends + b * n_heads + h, tl.load(Ends + b * stride_eb + h * stride_eh))
    tl.store(Table + table_first + (b * n_heads + h) * n_entries + entries, value, mask=e_ok)


def norm_launch(q, k, first):
    """``row_norm_max_kernel``'s launch over (B, S, H, D) tensors like ``q`` and ``k``, writing from word ``first``:
    ``(PlannedLaunch, its scalars, the words it writes)``: B * H of q's maxima, then B * H_kv of k's. Packed (T, H, D)
    tensors (launched as they are) are one batch row: each head's maxima over every token (``norm_row``)."""
    if q.dim() == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    batch, s_q, n_heads, dim = q.shape
    s_k, n_kv = k.shape[1], k.shape[2]
    block_d = next_power_of_2(dim)
    # 32 KB of bfloat16 per program: 8-10% faster than 16 KB at S 2048-8192 (benchmarks/norm_pass.py, session 40)
    block_s = max(16, 16384 // block_d)
    return (PlannedLaunch(row_norm_max_kernel, (cdiv(s_q, block_s) + cdiv(s_k, block_s), n_heads, batch),
                          dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)),
            (*q.stride()[:3], *k.stride()[:3], s_q, s_k, n_kv, dim, first), batch * (n_heads + n_kv))


def row_reach_launch(rows, dims_on, q, k, qk_scale2, n_entries, tile_m, block_n, norms_first, first, for_backward):
    """``row_reach_kernel``'s launch for a converted bias row like ``rows`` (varying over batch and heads as
    ``dims_on``, ``hopper_views.bias_dims_on``) and q, k like ``q``, ``k`` (B, S, H, D): reading the norm maxima
    from word ``norms_first``, writing ``n_entries`` entries per (batch, head) from word ``first`` (forward: query
    tiles of ``tile_m`` rows; backward: key blocks), key blocks of ``block_n``. ``(PlannedLaunch, its scalars)``;
    the prefix maxima (``row_prefix_max``), the row, then the forward's ends (``row_ends``) come first among its
    tensors."""
    batch, s_q, n_heads = q.shape[:3]
    s_k, n_kv = k.shape[1], k.shape[2]
    b_on, h_on = dims_on
    rows_h = rows.shape[1] if h_on else 1
    block_e = 16 if for_backward else 32
    return (PlannedLaunch(row_reach_kernel, (cdiv(n_entries, block_e), n_heads, batch),
                          dict(FOR_BACKWARD=for_backward, TILE_M=tile_m, BLOCK_N=block_n, ROW_STEP=ROW_STEP,
                               BLOCK_E=block_e, BLOCK_S=64, num_warps=4)),
            (rows_h * s_k * b_on, s_k * h_on, rows.stride(0) * b_on, rows.stride(1) * h_on, rows_h * b_on, h_on,
             s_q, s_k, n_kv, qk_scale2, n_entries, norms_first, first))


def row_prefix_max(rows: torch.Tensor) -> torch.Tensor:
    """A converted bias row's (``launch._log2_bias_rows``: (B', H', 1, S_k) float32) prefix maxima over the keys,
    contiguous (B', H', S_k); NaN from a NaN on. Kept on the row (``kept.kept_on``): made once for a model's layers
    and again for the backward only if the row changed."""
    return kept_on(rows, "_mpt_attention_row_prefix_max", lambda: torch.cummax(rows[:, :, 0], dim=-1).values,
                   on_device=True)


def row_ends(rows: torch.Tensor, block_n: int) -> torch.Tensor:
    """A converted bias row's (``launch._log2_bias_rows``: (B', H', 1, S_k) float32) end for the forward's key blocks
    of ``block_n``: per (B', H'), the blocks up to its last key that is not removed (-inf; NaN counts as kept),
    contiguous int32 (B', H'). Kept on the row like ``row_prefix_max`` (MPT's row: once for a model's layers)."""
    def ends():
        s_k = rows.shape[-1]
        keys = torch.arange(s_k, dtype=torch.int32, device=rows.device)
        kept = torch.where(rows[:, :, 0] != float("-inf"), keys, -1)
        last = kept.amax(-1) if s_k else kept.new_full(kept.shape[:2], -1)
        return torch.div(last + block_n, block_n, rounding_mode="floor").to(torch.int32).contiguous()
    return kept_on(rows, "_mpt_attention_row_ends", ends, key=block_n, on_device=True)


def row_block_terms(rows: torch.Tensor, qk_scale2: float, soft_raw: float, block_n: int) -> torch.Tensor:
    """A converted bias row's (``launch._log2_bias_rows``: (B', H', 1, S_k) float32) terms for the forward's table
    (``hopper_forward.store_row_first_block``), contiguous float32 (B', H', 2, key blocks of ``block_n``): per block
    the least of its kept keys' terms (a removed key, -inf, scores -inf whatever q.k; +inf for a block of none),
    then the prefix maxima of those (a block of none counted -inf), both in the Hopper forward's unscaled units
    (``common.row_keys_kernel``: the row over the scale, a soft mask as ``soft_raw``; NaN propagates). A row with a
    soft-masked key gets prefix maxima of +inf, which leave nothing out: next to its ~2^107 a row's scores round
    away in float32, so the bound would not hold, and a row that sees only soft-masked keys weighs them all. Kept on
    the row like ``row_prefix_max``: MPT's row, once for a model's layers."""
    def terms():
        s_k = rows.shape[-1]
        n_kb = cdiv(s_k, block_n)
        soft = rows[:, :, 0] == _SOFT_SCORE.value
        t = torch.where(soft, soft_raw, rows[:, :, 0] / qk_scale2)
        pad = n_kb * block_n - s_k
        kept = torch.where(t == float("-inf"), float("inf"), t)
        low = torch.nn.functional.pad(kept, (0, pad), value=float("inf")).unflatten(-1, (n_kb, block_n)).amin(-1)
        floor = torch.where(low == float("inf"), float("-inf"), low)
        prefix = torch.cummax(floor, dim=-1).values.masked_fill(soft.any(-1, keepdim=True), float("inf"))
        return torch.stack([low, prefix], dim=2).contiguous()
    return kept_on(rows, "_mpt_attention_row_block_terms", terms, key=(qk_scale2, soft_raw, block_n), on_device=True)
