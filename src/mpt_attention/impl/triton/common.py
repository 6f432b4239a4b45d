"""Device functions shared by the forward and backward kernels: one score tile, one dropout tile.

Scores live in the log2 domain inside the kernels (``exp2`` is the fast instruction): with
``qk_scale2 = softmax_scale * log2(e)`` and every additive term multiplied by ``log2(e)``,
``exp2(s2 - lse2) == exp(s - lse)``.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Soft masks. A bias value below SOFT_MASK2 (log2 units; -2^20 ln 2 ~ -7.3e5 in the bias's own units)
# is a mask, not a score: MPT folds padding into its bias as finfo(float32).min, older code uses -1e9.
# Every such key scores exactly SOFT_SCORE, so q . k drops out (as it does in natural-unit math at
# finfo.min): a row that sees only soft-masked keys averages them uniformly, and next to any other key
# they weigh 0. Such a row's log-sum-exp, SOFT_SCORE + log2(count), would round to SOFT_SCORE and lose
# the count the backward needs, so the forward stores it as SOFT_LSE - count * SOFT_COUNT_UNIT (exact
# up to 2^23 keys; natural units, never produced by a row with a key above the mask). The backward
# reads the row's offset as SOFT_SCORE and scales its dO and delta by 1 / count (launch_backward.backward).
SOFT_MASK2 = tl.constexpr(-1048576.0)  # -2^20
SOFT_SCORE = tl.constexpr(-1.2676506002282294e30)  # -2^100
SOFT_LSE = tl.constexpr(-1.2676506002282294e30)  # -2^100
SOFT_COUNT_UNIT = tl.constexpr(1.5111572745182865e23)  # 2^77: one key in the encoded count
SOFT_MAX_COUNT = tl.constexpr(8388607.0)  # 2^23 - 1

# ALiBi modes (constexpr): none, MPT's causal form, the symmetric form, and MPT's causal form measured from each
# row's diagonal, slope * (j - i - (S_k - S_q)): the float32 kernels' (launch._kernel_alibi). The two causal forms
# differ by slope * (S_q - 1 - i) per row, which the softmax drops; the row's log-sum-exp is larger by it in the
# diagonal form (ops.public_lse subtracts it). Far from the last key MPT's own form gives scores and log-sum-exps
# of large magnitude (~ -736 in log2 units at slope 2, S 256; ulp 6e-5) whose float32 rounding the backward's
# exp2(s - lse) inherits; from the diagonal the terms that carry the softmax stay near 0 (docs/errors.md).
ALIBI_NONE = tl.constexpr(0)
ALIBI_CAUSAL = tl.constexpr(1)
ALIBI_SYMMETRIC = tl.constexpr(2)
ALIBI_CAUSAL_DIAGONAL = tl.constexpr(3)
# Bias modes (constexpr): none, one row per (batch, head) broadcast over queries, a full tile. A row
# reaches the kernels already in log2 units as float32 (log2_bias_rows_kernel, once per call); a full
# tile is converted as it is read.
BIAS_NONE = tl.constexpr(0)
BIAS_ROW = tl.constexpr(1)
BIAS_FULL = tl.constexpr(2)
# a row the caller has already read (``bias_ptrs`` then holds its [BLOCK_N] values)
BIAS_ROW_VALUES = tl.constexpr(3)


@triton.jit
def release_dependent_grid():
    """``griddepcontrol.launch_dependents``: the kernel launched after this one as a programmatic dependent may start
    once every program of this one has got here or exited (it then waits for this one's writes by
    ``wait_prior_grid``). A no-op without such a dependent."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def grid_row():
    """This program's (batch, head) row, ``batch * heads + head``, of a (blocks, heads, batch) grid: the
    launch order of a (blocks, batch * heads) grid, which CUDA refuses past 65535 rows (its limit on a
    grid's second and third axes; 2048 sequences x 32 heads at serving batch sizes)."""
    return tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def bias_pointers(bias_base, start_n, offs_m, offs_n, stride_bm, stride_bn, BIAS: tl.constexpr):
    """Pointers to the bias tile at key block ``start_n`` (``bias_base`` is at the tile's first row)."""
    base = bias_base + tl.cast(start_n, tl.int64) * stride_bn
    if BIAS == BIAS_ROW:
        ptrs = base + offs_n * stride_bn
    else:
        ptrs = base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
    return ptrs


@triton.jit
def bias_row_source(bias_base, seqlen_k, BLOCK_N: tl.constexpr):
    """A converted bias row (launch._log2_bias_rows: float32, 16-byte aligned rows; launch.py checks) as a
    [1, S_k] tensor descriptor read in [1, BLOCK_N] boxes: through the copy engine, where a plain load
    went through a shared-memory layout conversion every block."""
    return tl.make_tensor_descriptor(bias_base, shape=[1, seqlen_k], strides=[BLOCK_N, 1], block_shape=[1, BLOCK_N])


@triton.jit
def block_bias(row_src, bias_base, start_n, offs_m, offs_n, stride_bm, stride_bn, BIAS: tl.constexpr,
               ROW_DESC: tl.constexpr, BLOCK_N: tl.constexpr):
    """What ``score_tile`` takes as ``bias_ptrs`` for key block ``start_n``: the row's [BLOCK_N] values read
    through ``row_src`` (ROW_DESC; score mode BIAS_ROW_VALUES), else ``bias_pointers``."""
    if ROW_DESC:
        return tl.reshape(row_src.load([0, start_n]), [BLOCK_N])
    else:
        return bias_pointers(bias_base, start_n, offs_m, offs_n, stride_bm, stride_bn, BIAS)


@triton.jit
def _log2_bias(raw):
    """Bias in log2 units. -inf stays -inf (the key is removed); values below SOFT_MASK2 become the
    soft mask SOFT_SCORE (MPT's finfo(float32).min times log2(e) would otherwise overflow to -inf and
    empty a row that natural-unit softmax keeps as a uniform average over its equally-masked keys); NaN stays
    NaN (the comparison is false for it), so the rows that see it are NaN, as in the reference."""
    scaled = raw.to(tl.float32) * LOG2E
    return tl.where(scaled < SOFT_MASK2, tl.where(raw == float("-inf"), float("-inf"), SOFT_SCORE), scaled)


@triton.jit
def log2_bias_rows_kernel(
    Bias, Out,
    stride_bb, stride_bh, stride_bk,
    stride_ob, stride_oh,
    n_heads, seqlen_k,
    BLOCK: tl.constexpr,
):
    """A bias row ``(B', H', 1, S_k)`` converted once per call into the float32 log2-unit values
    ``_log2_bias`` gives, so the kernels add it with no per-block conversion (the conversion ran once per
    column a thread holds, in every block of every program)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bh = grid_row()
    b64, h64 = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    ok = cols < seqlen_k
    raw = tl.load(Bias + b64 * stride_bb + h64 * stride_bh + cols.to(tl.int64) * stride_bk, mask=ok, other=0.0)
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + cols, _log2_bias(raw), mask=ok)


@triton.jit
def row_keys_kernel(
    Rows, Out,
    stride_rb, stride_rh,
    seqlen_k, qk_scale2, soft_raw,
    BLOCK: tl.constexpr,
):
    """A converted bias row (``log2_bias_rows_kernel``'s float32 log2 units, ``(B', H', 1, S_k)``) as the Hopper
    forward's per-key terms for its scores' extension product (hopper_forward ``ROW_KEYS``): key j's row of 16
    bfloat16 ``[t_hi, t_mid, t_lo, 0, ...]`` in ``Out`` ``(B', H', S_k, 16)``, three parts whose sum is t = row / scale
    to float32's precision (the forward adds them to the unscaled score, then scales). A soft mask (SOFT_SCORE)
    becomes ``soft_raw``, a power of 2 whose product with the scale is exact, so every soft-masked key of a row
    scores the same; -inf stays -inf in the first part, 0 in the others."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b64, h64 = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    ok = cols < seqlen_k
    x = tl.load(Rows + b64 * stride_rb + h64 * stride_rh + cols, mask=ok, other=0.0)
    t = tl.where(x == SOFT_SCORE, soft_raw, x / qk_scale2)
    hi = t.to(tl.bfloat16).to(tl.float32)
    rest = tl.where(t == float("-inf"), 0.0, t - hi)
    mid = rest.to(tl.bfloat16).to(tl.float32)
    lo = rest - mid
    part = tl.arange(0, 16)[None, :]
    vals = tl.where(part == 0, hi[:, None], tl.where(part == 1, mid[:, None], tl.where(part == 2, lo[:, None], 0.0)))
    row = (b64 * tl.num_programs(1) + h64) * seqlen_k
    tl.store(Out + (row + cols.to(tl.int64))[:, None] * 16 + part, vals.to(tl.bfloat16), mask=ok[:, None])


@triton.jit
def packed_row_sequence(rows, CuSeq, n_seq, search_steps):
    """The sequence ``b`` of each of ``rows`` (packed, in ``n_seq`` sequences), ``CuSeq[b] <= row < CuSeq[b + 1]``,
    found by bisection over ``CuSeq`` in ``search_steps`` halvings (rows past the last sequence: the last)."""
    lo = tl.zeros(rows.shape, dtype=tl.int32)
    hi = tl.full(rows.shape, n_seq, dtype=tl.int32)  # CuSeq[lo] <= row < CuSeq[hi]
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(CuSeq + mid) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def packed_rows_used(rows, CuSeq, EndSeq, n_seq, search_steps):
    """Whether each of ``rows`` is one of its sequence's used rows, ``[CuSeq[b], EndSeq[b])`` (``seqused``); rows
    past the last sequence are not."""
    return rows < tl.load(EndSeq + packed_row_sequence(rows, CuSeq, n_seq, search_steps))


@triton.jit
def dq_from_sums_kernel(
    DQ, DQAcc, CuSeq, EndSeq,
    stride_qt, stride_qh, stride_at, stride_ah,
    n_rows, n_seq, n_heads, head_dim, search_steps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of packed ``(T, H, D)`` sequences with unused rows (``seqused``) from the float32 sums ``DQAcc`` (the fused
    Hopper backward's): each used row's sums in dQ's dtype, zeros in every other row, whose sums are never read (the
    delta kernel zeroes only the used rows' sums: ``USED_ROWS``). One program per ``BLOCK_ROWS`` rows."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    used = packed_rows_used(rows, CuSeq, EndSeq, n_seq, search_steps)
    cols = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)[:, None]
    inside = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
    for h in range(n_heads):
        sums = tl.load(DQAcc + rows64 * stride_at + h * stride_ah + cols[None, :], mask=inside & used[:, None],
                       other=0.0)
        tl.store(DQ + rows64 * stride_qt + h * stride_qh + cols[None, :], sums.to(DQ.dtype.element_ty), mask=inside)


@triton.jit
def clear_unused_rows_kernel(
    X, CuSeq, EndSeq,
    stride_xt, stride_xh,
    n_rows, n_seq, n_heads, head_dim, search_steps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows of a packed ``(T, H, D)`` tensor past their sequence's used ones, ``[EndSeq[b], CuSeq[b + 1])``
    (``seqused``), set to 0; the others are not touched. One program per ``BLOCK_ROWS`` rows. The Hopper forward's
    tiles cover only used rows: its unused output rows are written here, ~half the bytes of zeroing the whole output
    first (and a tile wholly past the used rows cost more than either: ~80 us for B8 S4096 H16 D128 half padded,
    benchmarks/NOTES.md); the general kernels' unused rows too (``launch._clear_unused``)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    seq = packed_row_sequence(rows, CuSeq, n_seq, search_steps)
    unused = (rows < n_rows) & (rows >= tl.load(EndSeq + seq)) & (rows < tl.load(CuSeq + seq + 1))
    cols = tl.arange(0, BLOCK_D)
    ptrs = X + rows.to(tl.int64)[:, None] * stride_xt + cols[None, :]
    zero = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=X.dtype.element_ty)
    for h in range(n_heads):
        tl.store(ptrs + h * stride_xh, zero, mask=unused[:, None] & (cols < head_dim)[None, :])


@triton.jit
def encode_lse(m2, l_i, BIAS: tl.constexpr):
    """Natural-unit log-sum-exp from the row maximum ``m2`` (log2 units) and the sum ``l_i``; -inf
    for a row that saw no key, the encoded count for a soft-masked row (SOFT_LSE above)."""
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    lse = (m2 + tl.math.log2(l_safe)) * LN2
    if BIAS != BIAS_NONE:
        lse = tl.where(m2 == SOFT_SCORE, SOFT_LSE - tl.minimum(l_i, SOFT_MAX_COUNT) * SOFT_COUNT_UNIT, lse)
    return tl.where(live, lse, float("-inf"))


@triton.jit
def decode_lse2(lse, BIAS: tl.constexpr):
    """The backward's per-row offset in log2 units from a stored log-sum-exp: +inf for a row that saw
    no key (its P is 0, not NaN), SOFT_SCORE for a soft-masked row."""
    lse2 = lse * LOG2E
    if BIAS != BIAS_NONE:
        lse2 = tl.where(lse <= SOFT_LSE, SOFT_SCORE, lse2)
    return tl.where(lse == float("-inf"), float("inf"), lse2)


@triton.jit
def soft_row_scale(lse):
    """1 / count for a soft-masked row (SOFT_LSE encoding), else 1."""
    soft = (lse <= SOFT_LSE) & (lse > float("-inf"))
    count = tl.where(soft, (SOFT_LSE - lse) / SOFT_COUNT_UNIT, 1.0)
    return 1.0 / count


@triton.jit
def score_tile(
    qk,  # [BLOCK_M, BLOCK_N] fp32, q . k
    rows, cols,  # [BLOCK_M], [BLOCK_N] int32 absolute query / key indices
    bias_ptrs,  # pointers into the bias for (b, h): [BLOCK_N] if BIAS == BIAS_ROW, [BLOCK_M, BLOCK_N] if BIAS_FULL
    kpm_ptr, seqid_ptr, prefix_ptr,  # batch-offset pointers to (S_k,) rows, used if the flag is set
    q_seq,  # [BLOCK_M] sequence ids of the rows, used if HAS_SEQID
    slope2, qk_scale2, seqlen_q, seqlen_k,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    APPLY_MASK: tl.constexpr,
):
    """Log2-domain scores of one tile, ``-inf`` where a key is masked (only when APPLY_MASK)."""
    diag = seqlen_k - seqlen_q  # query i sits at absolute position i + diag
    s = qk * qk_scale2
    if ALIBI == ALIBI_CAUSAL:
        s += slope2 * (cols - (seqlen_k - 1)).to(tl.float32)[None, :]
    elif ALIBI == ALIBI_CAUSAL_DIAGONAL:
        s += slope2 * (cols[None, :] - rows[:, None] - diag).to(tl.float32)
    elif ALIBI == ALIBI_SYMMETRIC:
        s -= slope2 * tl.abs(rows[:, None] + diag - cols[None, :]).to(tl.float32)
    col_ok = cols < seqlen_k
    if BIAS == BIAS_ROW:  # one row broadcast over the queries (MPT's (1, H, 1, S_k)), in log2 units
        s += tl.load(bias_ptrs, mask=col_ok, other=0.0)[None, :]
    elif BIAS == BIAS_ROW_VALUES:
        s += bias_ptrs[None, :]
    elif BIAS == BIAS_FULL:
        in_bounds = (rows < seqlen_q)[:, None] & col_ok[None, :]
        s += _log2_bias(tl.load(bias_ptrs, mask=in_bounds, other=0.0))
    if APPLY_MASK:
        keep = col_ok[None, :]
        if IS_CAUSAL:
            visible = cols[None, :] <= rows[:, None] + diag
            if HAS_PREFIX:
                visible = visible | (tl.load(prefix_ptr + cols, mask=col_ok, other=0) != 0)[None, :]
            keep = keep & visible
        if HAS_KPM:
            keep = keep & (tl.load(kpm_ptr + cols, mask=col_ok, other=0) != 0)[None, :]
        if HAS_SEQID:
            k_seq = tl.load(seqid_ptr + cols, mask=col_ok, other=0)
            keep = keep & (q_seq[:, None] == k_seq[None, :])
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def sequence_bounds(b64, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """``(q_start, k_start, len_q, len_k)`` of sequence ``b``: its first row in the packed tensors and its lengths,
    up to its end row ``EndSeqQ/K[b]`` (``cu_seqlens[b + 1]``, or ``cu_seqlens[b] + seqused[b]``: launch.py).
    Without VARLEN every batch row starts at 0 and has the full lengths."""
    q_start = tl.zeros([], dtype=tl.int64)
    k_start = tl.zeros([], dtype=tl.int64)
    len_q = seqlen_q + tl.zeros([], dtype=tl.int32)
    len_k = seqlen_k + tl.zeros([], dtype=tl.int32)
    if VARLEN:
        q_start = tl.load(CuSeqQ + b64).to(tl.int64)
        k_start = tl.load(CuSeqK + b64).to(tl.int64)
        len_q = (tl.load(EndSeqQ + b64) - q_start).to(tl.int32)
        len_k = (tl.load(EndSeqK + b64) - k_start).to(tl.int32)
    return q_start, k_start, len_q, len_k


@triton.jit
def key_block_range(start_m, b64, KvRange, SeqRange, seqlen_q, seqlen_k,
                    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr,
                    HAS_PREFIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks the query tile at ``start_m`` visits, ``[lo, hi)``; ``[lo, lo_masked)`` need no mask
    (every key in range and visible to every row of the tile). ``SeqRange`` (B, query tiles, 2) holds
    the keys the tile's sequences span (launch.py; all keys when the ids are not sorted)."""
    diag = seqlen_k - seqlen_q
    hi = seqlen_k + tl.zeros([], dtype=tl.int32)
    if IS_CAUSAL and not HAS_PREFIX:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag)
    lo = tl.zeros([], dtype=tl.int32)
    if HAS_KPM:
        # keys before the first / after the last live key of this batch row are padding for every query
        lo = tl.load(KvRange + b64 * 2) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, tl.load(KvRange + b64 * 2 + 1))
    if HAS_SEQID:
        tile = (b64 * tl.cdiv(seqlen_q, BLOCK_M) + start_m // BLOCK_M) * 2
        lo = tl.maximum(lo, tl.load(SeqRange + tile) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, tl.load(SeqRange + tile + 1))
    # empty ranges as lo == hi; a tile past a short sequence's end (varlen) visits nothing
    hi = tl.where(start_m < seqlen_q, tl.maximum(hi, lo), lo)
    lo_masked = lo
    if not (HAS_KPM or HAS_SEQID or HAS_PREFIX):
        full = seqlen_k + tl.zeros([], dtype=tl.int32)
        if IS_CAUSAL:
            full = tl.minimum(full, start_m + diag + 1)
        # clamped to hi: an empty range must stay empty in both halves
        lo_masked = tl.minimum(tl.maximum(full, 0) // BLOCK_N * BLOCK_N, hi)
    return lo, lo_masked, hi


@triton.jit
def live_keys(cols, seqlen_k, kpm_ptr, HAS_KPM: tl.constexpr):
    """[BLOCK_N] bool: keys that exist and are not padding. K/V rows outside it are never loaded, so
    garbage there (NaN in an unwritten cache slot) cannot reach an output through 0 * NaN."""
    ok = cols < seqlen_k
    if HAS_KPM:
        ok = ok & (tl.load(kpm_ptr + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def dropout_keep(seed, bh, rows, cols, seqlen_q, seqlen_k, dropout_p):
    """[BLOCK_M, BLOCK_N] bool: which weights survive dropout; identical in forward and backward.

    One Philox stream per (batch*head, row, col) element through a 64-bit counter, so no two
    elements of one call share a random number, whatever the sizes. ``seqlen_q, seqlen_k`` are the
    counter's dims: the call's lengths, or the longest sequence's under varlen (row, col < them).
    """
    row_ids = (bh.to(tl.int64) * seqlen_q + rows.to(tl.int64)) * seqlen_k
    offsets = row_ids[:, None] + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_mask_kernel(
    Mask, Seed,
    stride_mbh, stride_mm,
    seqlen_q, seqlen_k, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the keep-mask the attention kernels use, (B*H, S_q, S_k) uint8, for tests."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = grid_row()
    seed = tl.load(Seed)
    rows = start_m + tl.arange(0, BLOCK_M)
    base = Mask + bh.to(tl.int64) * stride_mbh
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, rows, cols, seqlen_q, seqlen_k, dropout_p)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_mm + cols[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])
