"""Backward kernels: dK/dV per key block (looping over the query heads of its group), dQ per query block.

By default no atomics: each program owns the gradient tile it writes, so the backward is
deterministic and GQA/MQA sums over the query-head group inside one program. ``ATOMIC_DQ`` (the
``deterministic=False`` option) folds dQ into the dK/dV kernel with float32 atomics instead of a
second pass that recomputes every tile. The probabilities are recomputed from
the forward's log-sum-exp; ``delta = rowsum(dO * O)`` is precomputed.

Bias gradient (``dS``, the gradient of the scores) comes out in one of two forms:
``BIAS_GRAD == 1`` column sums per (batch, head) for a bias that is broadcast over query rows
(MPT's ``(1, H, 1, S)``), written by the dK/dV kernel; ``BIAS_GRAD == 2`` the full ``dS`` tile, written
by the dK/dV kernel when the launcher then forms dQ = dS K as one GEMM on it (a full-shape bias in q's
dtype) or accumulates dQ with atomics, else by the dQ kernel. The launcher reduces either to the bias's
own shape.
"""

import triton
import triton.language as tl

from mpt_attention.impl.triton.common import (
    BIAS_ROW, BIAS_ROW_VALUES, LOG2E, bias_pointers, bias_row_source, block_bias, decode_lse2, dropout_keep,
    grid_row, key_block_range, live_keys, packed_rows_used, release_dependent_grid, score_tile, sequence_bounds,
    soft_row_scale,
)
from mpt_attention.impl.triton.reach import norm_row, reach_first_key, reach_query_end


# how the delta kernel writes dO scaled for soft-masked rows (SOFT_ROWS): not at all, every row, or only the
# 64-row blocks holding one, with a word per block saying which
SOFT_EVERY_ROW = tl.constexpr(1)
SOFT_BLOCKS = tl.constexpr(2)
SOFT_BLOCK_ROWS = tl.constexpr(64)


@triton.jit
def _row_stats(lse_row, delta_row, rows, row_ok, BIAS: tl.constexpr):
    """Log2-domain row offset (common.decode_lse2) and delta; ``lse_row``, ``delta_row`` point at the
    (batch, head)'s first query row."""
    lse = tl.load(lse_row + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(delta_row + rows, mask=row_ok, other=0.0)
    return decode_lse2(lse, BIAS), delta


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DO, Lse, DLse, Delta, DOScaled, RowStats, DQAcc, DQSync, SoftBlocks, CuSeq, EndSeq,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_sb, stride_ss, stride_sh,
    stride_ab, stride_as, stride_ah,
    n_heads, seqlen_q, head_dim, stats_cols, n_seq, search_steps,
    HAS_DLSE: tl.constexpr, SOFT_ROWS: tl.constexpr, ROW_STATS: tl.constexpr, STORE_DELTA: tl.constexpr,
    ZERO_DQ: tl.constexpr, ZERO_SYNC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    USED_ROWS: tl.constexpr = False, RELEASE: tl.constexpr = False,
):
    """delta = rowsum(dO * O) - dlse in float32, (B, H, S_q): one read of each, no float32 copies.

    SOFT_ROWS (a bias is present): rows whose stored log-sum-exp encodes a soft-masked row's key count
    (common.SOFT_LSE) recompute P as 1 per key instead of 1 / count; scaling that row's dO and delta by
    1 / count gives the same dV, dS and so dQ, dK, dbias. ``SOFT_EVERY_ROW``: every row's dO is written to
    ``DOScaled`` (unchanged where the scale is 1), which the backward kernels then read instead of dO.
    ``SOFT_BLOCKS`` (the Hopper dK/dV kernel, whose loader picks the source per 64-query block): only the
    blocks holding a soft-masked row are written there, and ``SoftBlocks``, one int32 word per (batch, head,
    64-row block), says which (1) and which not (0), so a bias that soft-masks no whole row (MPT's ALiBi row)
    costs no copy of dO (16 us of a 1.6 ms D64 backward at B4 H32 S4096 on an H200).

    ROW_STATS (the Hopper dK/dV kernel's input): also the row's log2-domain offset (common.decode_lse2) and
    delta side by side in ``RowStats``, (B * H, 2, ``stats_cols``) float32, for the kernel's copy engine, +inf
    and 0 in the rows from S_q to ``stats_cols`` (the launch's grid covers them);
    ``STORE_DELTA`` False where no kernel reads ``Delta`` (that kernel's dQ warpgroup takes both from there).

    ZERO_DQ: zeros in the float32 dQ sums ``DQAcc`` (q's shape) that the dK/dV kernels then add into, instead
    of a fill kernel of their own before this one (a launch less: ~30 us of host time per step on the H200
    machine's CPU, where a short step is host-bound, benchmarks/NOTES.md session 23). Where the Hopper kernel's
    first program per 64-row block stores into the sums instead (hopper_dq), ZERO_SYNC zeros that kernel's word
    per block, ``DQSync`` (B, H, cdiv(S_q, 64)) int32.

    USED_ROWS (packed sequences with unused rows, ``seqused``; one batch row): the rows past a sequence's used ones
    (``common.packed_rows_used`` over ``CuSeq`` and ``EndSeq``) read no O or dO (delta 0) and get no zeros in
    ``DQAcc`` (``common.dq_from_sums_kernel`` writes their dQ as zeros without reading the sums); half the bytes of
    a half-padded batch read in place.

    RELEASE (the Hopper dK/dV kernel launched after this one as its programmatic dependent: ``hopper.PDL``): each
    program first lets it start, so its programs take the SMs this kernel's last ones leave and load K and V
    meanwhile; it waits for these writes before reading them."""
    if RELEASE:
        release_dependent_grid()
    start_m = tl.program_id(0) * BLOCK_M
    bh = grid_row()
    b64 = (bh // n_heads).to(tl.int64)
    h64 = (bh % n_heads).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    if USED_ROWS:
        mask = mask & packed_rows_used(rows, CuSeq, EndSeq, n_seq, search_steps)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    stats = bh.to(tl.int64) * seqlen_q + rows
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows64 * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows64 * stride_dos + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + stats, mask=row_ok, other=0.0)
    if SOFT_ROWS or ROW_STATS:
        lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
    if SOFT_ROWS:
        scale = soft_row_scale(lse)
        delta *= scale
        do_scaled = (do.to(tl.float32) * scale[:, None]).to(do.dtype)
        scaled_mask = mask
        if SOFT_ROWS == SOFT_BLOCKS:
            tl.static_assert(BLOCK_M == SOFT_BLOCK_ROWS, "one program per flagged block")
            soft = tl.max(tl.where(scale != 1.0, 1, 0), 0)  # rows past S_q read lse 0: scale 1
            tl.store(SoftBlocks + bh.to(tl.int64) * tl.cdiv(seqlen_q, SOFT_BLOCK_ROWS) + start_m // SOFT_BLOCK_ROWS,
                     soft)
            scaled_mask = mask & (soft != 0)
        tl.store(DOScaled + b64 * stride_sb + h64 * stride_sh + rows64 * stride_ss + offs_d[None, :], do_scaled,
                 mask=scaled_mask)
    if STORE_DELTA:
        tl.store(Delta + stats, delta, mask=row_ok)
    if ZERO_DQ:
        tl.store(DQAcc + b64 * stride_ab + h64 * stride_ah + rows64 * stride_as + offs_d[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=mask)
    if ZERO_SYNC:
        if start_m % 64 == 0:  # one word per 64 rows (BLOCK_M is 64, or 32 in the interpreter)
            tl.store(DQSync + bh.to(tl.int64) * tl.cdiv(seqlen_q, 64) + start_m // 64, 0)
    if ROW_STATS:  # the rows past S_q up to ``stats_cols``: +inf (P = 0 there) and delta 0
        row_stats = RowStats + bh.to(tl.int64) * 2 * stats_cols + rows
        stats_ok = rows < stats_cols
        tl.store(row_stats, tl.where(row_ok, decode_lse2(lse, SOFT_ROWS), float("inf")), mask=stats_ok)
        tl.store(row_stats + stats_cols, tl.where(row_ok, delta, 0.0), mask=stats_ok)


@triton.jit
def _tile_grads(
    q, k, v, do, lse2, delta, rows, cols, bias_ptrs, kpm_ptr, seqid_ptr, prefix_ptr, q_seq, slope2,
    qk_scale2, seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, APPLY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One tile's recomputed probabilities (after dropout, for dV) and dS = P * (dP - delta), the
    gradient of the scores; shared by both backward kernels so they cannot drift apart."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = score_tile(
        qk, rows, cols, bias_ptrs, kpm_ptr, seqid_ptr, prefix_ptr, q_seq, slope2, qk_scale2,
        seqlen_q, seqlen_k, IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, APPLY_MASK,
    )
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    p_dropped = p
    if DROPOUT:
        keep = dropout_keep(seed, bh, rows, cols, rng_q, rng_k, dropout_p)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    return p_dropped, p * (dp - delta[:, None])


@triton.jit
def _dkdv_blocks(
    dk, dv, dbias_cols, k, v, q_head, do_head, bias_head, lse_row, delta_row, kpm_ptr, seqid_ptr, prefix_ptr,
    dq_head, ds_head, stride_dqs,
    stride_qs, stride_dos, stride_bm, stride_bn, cols, offs_m, offs_n, offs_d, slope2, qk_scale2,
    seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo, hi,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, APPLY_MASK: tl.constexpr, Q_DESC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DS_DESC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Accumulate dK, dV (and bias column sums) of one key block over query blocks [lo, hi).
    Q_DESC: Q and dO tiles through tensor descriptors (TMA on Hopper). ATOMIC_DQ: also add this key
    block's share of dQ into a float32 buffer with atomics, so no separate dQ pass recomputes the tile:
    faster, but the summation order, hence the last bits of dQ, varies between runs. BIAS_GRAD == 2:
    store the full dS tile (``ds_head``: a descriptor under DS_DESC, else a pointer)."""
    d_ok = offs_d < head_dim
    diag = seqlen_k - seqlen_q
    if Q_DESC:
        q_src = tl.make_tensor_descriptor(q_head, shape=[seqlen_q, head_dim], strides=[stride_qs, 1],
                                          block_shape=[BLOCK_M, BLOCK_D])
        do_src = tl.make_tensor_descriptor(do_head, shape=[seqlen_q, head_dim], strides=[stride_dos, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
    if ATOMIC_DQ == 2:
        # one bulk reduction per tile (TMA reduce-add on Hopper) instead of BLOCK_M*BLOCK_D scalar atomics;
        # rows past the sequence's end are clipped by the descriptor's shape
        dq_dst = tl.make_tensor_descriptor(dq_head, shape=[seqlen_q, head_dim], strides=[stride_dqs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
    # a bias row is one value per key: the same for every query block, so it is read once here (read per
    # block it went through a shared-memory layout conversion every time)
    TILE_BIAS: tl.constexpr = BIAS_ROW_VALUES if BIAS == BIAS_ROW else BIAS
    if BIAS == BIAS_ROW:
        row_vals = tl.load(bias_head + offs_n * stride_bn, mask=cols < seqlen_k, other=0.0)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        m64 = tl.cast(start_m, tl.int64)
        # [BLOCK_M, BLOCK_D]
        if Q_DESC:
            q = q_src.load([start_m, 0])
            do = do_src.load([start_m, 0])
        else:
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_head + m64 * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask,
                        other=0.0)
            do = tl.load(do_head + m64 * stride_dos + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask,
                         other=0.0)
        lse2, delta = _row_stats(lse_row, delta_row, rows, row_ok, BIAS)
        q_seq = rows
        if HAS_SEQID:
            q_seq = tl.load(seqid_ptr + rows + diag, mask=row_ok, other=0)
        if BIAS == BIAS_ROW:
            bias_ptrs = row_vals
        else:
            bias_ptrs = bias_pointers(bias_head + m64 * stride_bm, 0, offs_m, offs_n, stride_bm, stride_bn, BIAS)
        # [BLOCK_M, BLOCK_N]
        p_dropped, ds = _tile_grads(
            q, k, v, do, lse2, delta, rows, cols, bias_ptrs, kpm_ptr, seqid_ptr, prefix_ptr, q_seq, slope2,
            qk_scale2, seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k,
            IS_CAUSAL, ALIBI, TILE_BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, APPLY_MASK, DOT_PRECISION,
        )
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if BIAS_GRAD == 1:
            dbias_cols += tl.sum(ds, 0)
        if ATOMIC_DQ:
            # [BLOCK_M, BLOCK_D]
            dq_part = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            if ATOMIC_DQ == 2:
                dq_dst.atomic_add([start_m, 0], dq_part)
            else:
                tl.atomic_add(dq_head + m64 * stride_dqs + offs_m[:, None] * stride_dqs + offs_d[None, :], dq_part,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        if BIAS_GRAD == 2:
            if DS_DESC:
                ds_head.store([start_m, 0], ds.to(ds_head.dtype))
            else:
                tl.store(ds_head + m64 * seqlen_k + offs_m[:, None] * seqlen_k + offs_n[None, :],
                         ds.to(ds_head.dtype.element_ty), mask=row_ok[:, None] & (cols < seqlen_k)[None, :])
    return dk, dv, dbias_cols


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DBiasCols, DQAcc, DBias,
    Bias, Slopes, KeyPad, SeqId, Prefix, Seed, KvRange, SeqRange, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, Norms,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_slb, stride_slh,
    stride_kpm, stride_sid, stride_pfx,
    n_heads, n_groups, seqlen_q, seqlen_k, head_dim,
    softmax_scale, qk_scale2, dropout_p,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr, DESC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DS_DESC: tl.constexpr, REACH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``REACH`` (causal ALiBi from slopes, no mask or bias): each head's query rows end past its reach behind the
    block's last key (reach.py; the heads' norm maxima in ``Norms``)."""
    start_n = tl.program_id(0) * BLOCK_N
    bkv = grid_row()
    n_kv = n_heads // n_groups
    b = bkv // n_kv
    kv_h = bkv % n_kv
    b64 = b.to(tl.int64)
    rng_q, rng_k = seqlen_q, seqlen_k
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(b64, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, seqlen_q, seqlen_k,
                                                           VARLEN)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    col_ok = cols < seqlen_k
    d_ok = offs_d < head_dim
    kv_mask = col_ok[:, None] & d_ok[None, :]
    row_start = k_start + start_n
    kpm_ptr = KeyPad + b64 * stride_kpm
    load_mask = live_keys(cols, seqlen_k, kpm_ptr, HAS_KPM)[:, None] & d_ok[None, :]

    # [BLOCK_N, BLOCK_D]
    k = tl.load(K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh + row_start * stride_ks
                + offs_n[:, None] * stride_ks + offs_d[None, :], mask=load_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh + row_start * stride_vs
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=load_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    seqid_ptr = SeqId + b64 * stride_sid
    prefix_ptr = Prefix + b64 * stride_pfx
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    diag = seqlen_k - seqlen_q
    lo = 0
    if IS_CAUSAL and not HAS_PREFIX:
        # rows i with i + diag >= start_n are the first to see this block
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
    m_end = tl.where(start_n < seqlen_k, seqlen_q, 0)  # a block past a short sequence's end (varlen)
    if HAS_KPM:
        # a block of padding keys only (for every query of this batch row) has zero gradients
        all_padding = (start_n >= tl.load(KvRange + b64 * 2 + 1)) | (start_n + BLOCK_N <= tl.load(KvRange + b64 * 2))
        m_end = tl.where(all_padding, 0, seqlen_q)
    if HAS_SEQID:
        # only queries of the sequences this key block spans can see it (launch.py; all when unsorted)
        block = (b64 * tl.cdiv(seqlen_k, BLOCK_N) + start_n // BLOCK_N) * 2
        lo = tl.maximum(lo, tl.load(SeqRange + block) // BLOCK_M * BLOCK_M)
        m_end = tl.minimum(m_end, tl.load(SeqRange + block + 1))
    # Query blocks [q_split, m_end) see every key of this block: no mask arithmetic there.
    q_split = m_end
    if not (HAS_KPM or HAS_SEQID or HAS_PREFIX):
        if start_n + BLOCK_N <= seqlen_k:
            q_split = 0
            if IS_CAUSAL:
                first_full_row = start_n + BLOCK_N - 1 - diag
                q_split = tl.minimum(tl.maximum(first_full_row + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M, m_end)
            q_split = tl.maximum(q_split, lo)

    for g in range(0, n_groups):
        h = kv_h * n_groups + g
        h64 = h.to(tl.int64)
        bh = b * n_heads + h
        slope2 = 0.0
        if ALIBI != 0:
            slope2 = tl.load(Slopes + b64 * stride_slb + h64 * stride_slh).to(tl.float32) * LOG2E
        q_head = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qs
        do_head = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dos
        bias_head = Bias + b64 * stride_bb + h64 * stride_bh + row_start * stride_bn
        stats = b64 * stride_lb + h64 * stride_lh + q_start
        dq_head = DQAcc + b64 * stride_dqb + h64 * stride_dqh + q_start * stride_dqs
        ds_head = DBias + bh.to(tl.int64) * seqlen_q * seqlen_k + start_n  # (B, H, S_q, S_k) dS, BIAS_GRAD == 2
        if DS_DESC:
            ds_head = tl.make_tensor_descriptor(ds_head, shape=[seqlen_q, seqlen_k - start_n], strides=[seqlen_k, 1],
                                                block_shape=[BLOCK_M, BLOCK_N])
        dbias_cols = tl.zeros([BLOCK_N], dtype=tl.float32)
        head_end, head_split = m_end, q_split
        if REACH:
            norm_b, norm_rows = norm_row(b, tl.num_programs(2), VARLEN)
            head_end = tl.minimum(m_end, reach_query_end(Norms, norm_b, h, n_heads, n_kv, norm_rows, slope2,
                                                         qk_scale2, start_n + BLOCK_N - 1, diag, seqlen_q))
            head_split = tl.minimum(q_split, head_end)
        dk, dv, dbias_cols = _dkdv_blocks(
            dk, dv, dbias_cols, k, v, q_head, do_head, bias_head, Lse + stats, Delta + stats, kpm_ptr, seqid_ptr,
            prefix_ptr, dq_head, ds_head, stride_dqs,
            stride_qs, stride_dos, stride_bm, stride_bn, cols, offs_m, offs_n, offs_d, slope2, qk_scale2,
            seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo, head_split,
            IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, BIAS_GRAD, True, DESC, ATOMIC_DQ, DS_DESC,
            DOT_PRECISION, BLOCK_M, BLOCK_D,
        )
        dk, dv, dbias_cols = _dkdv_blocks(
            dk, dv, dbias_cols, k, v, q_head, do_head, bias_head, Lse + stats, Delta + stats, kpm_ptr, seqid_ptr,
            prefix_ptr, dq_head, ds_head, stride_dqs,
            stride_qs, stride_dos, stride_bm, stride_bn, cols, offs_m, offs_n, offs_d, slope2, qk_scale2,
            seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, head_split, head_end,
            IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, BIAS_GRAD, False, DESC, ATOMIC_DQ, DS_DESC,
            DOT_PRECISION, BLOCK_M, BLOCK_D,
        )
        if BIAS_GRAD == 1:
            tl.store(DBiasCols + bh.to(tl.int64) * seqlen_k + cols, dbias_cols, mask=col_ok)

    dk_ptrs = DK + b64 * stride_dkb + kv_h.to(tl.int64) * stride_dkh + row_start * stride_dks
    dv_ptrs = DV + b64 * stride_dvb + kv_h.to(tl.int64) * stride_dvh + row_start * stride_dvs
    tl.store(dk_ptrs + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_ptrs + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, k_base, v_base, bias_base, dbias_base, kpm_ptr, seqid_ptr, prefix_ptr,
    stride_ks, stride_vs, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, q_seq, slope2, qk_scale2,
    seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo, hi,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, APPLY_MASK: tl.constexpr, KV_DESC: tl.constexpr,
    ROW_DESC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi); write dS there for BIAS_GRAD == 2.
    KV_DESC: K/V tiles through tensor descriptors (never with key padding: those rows stay unread).
    ROW_DESC: a bias row through one too; a plain load of it went through a layout conversion in shared
    memory per block (+37% instructions in the loop, 184 -> 234 registers)."""
    d_ok = offs_d < head_dim
    row_ok = rows < seqlen_q
    if KV_DESC:
        k_src = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, head_dim], strides=[stride_ks, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, head_dim], strides=[stride_vs, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
    TILE_BIAS: tl.constexpr = BIAS_ROW_VALUES if ROW_DESC else BIAS
    row_src = bias_row_source(bias_base, seqlen_k, BLOCK_N) if ROW_DESC else bias_base
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        n64 = tl.cast(start_n, tl.int64)
        # [BLOCK_N, BLOCK_D]
        if KV_DESC:
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            kv_mask = live_keys(cols, seqlen_k, kpm_ptr, HAS_KPM)[:, None] & d_ok[None, :]
            k = tl.load(k_base + n64 * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            v = tl.load(v_base + n64 * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
                        other=0.0)
        bias_ptrs = block_bias(row_src, bias_base, start_n, offs_m, offs_n, stride_bm, stride_bn, BIAS, ROW_DESC,
                               BLOCK_N)
        # [BLOCK_M, BLOCK_N]
        _, ds = _tile_grads(
            q, k, v, do, lse2, delta, rows, cols, bias_ptrs, kpm_ptr, seqid_ptr, prefix_ptr, q_seq, slope2,
            qk_scale2, seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k,
            IS_CAUSAL, ALIBI, TILE_BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, APPLY_MASK, DOT_PRECISION,
        )
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if BIAS_GRAD == 2:
            tl.store(dbias_base + n64 + offs_m[:, None] * seqlen_k + offs_n[None, :],
                     ds.to(dbias_base.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DBias,
    Bias, Slopes, KeyPad, SeqId, Prefix, Seed, KvRange, SeqRange, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, Norms,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_slb, stride_slh,
    stride_kpm, stride_sid, stride_pfx,
    n_heads, n_groups, seqlen_q, seqlen_k, head_dim,
    softmax_scale, qk_scale2, dropout_p,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr, DESC: tl.constexpr,
    ROW_DESC: tl.constexpr, REACH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``REACH``: as the forward's (forward.py), key blocks past the head's reach are skipped."""
    # Causal rows near the bottom see the most keys: start those first so they do not finish last.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = grid_row()
    b = bh // n_heads
    h = bh % n_heads
    kv_h = h // n_groups
    b64, h64, kv64 = b.to(tl.int64), h.to(tl.int64), kv_h.to(tl.int64)
    rng_q, rng_k = seqlen_q, seqlen_k
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(b64, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, seqlen_q, seqlen_k,
                                                           VARLEN)
    m64 = q_start + start_m

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    q_mask = row_ok[:, None] & d_ok[None, :]

    # [BLOCK_M, BLOCK_D]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dos + offs_m[:, None] * stride_dos
                 + offs_d[None, :], mask=q_mask, other=0.0)
    stats = b64 * stride_lb + h64 * stride_lh + q_start
    lse2, delta = _row_stats(Lse + stats, Delta + stats, rows, row_ok, BIAS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b64 * stride_kb + kv64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + kv64 * stride_vh + k_start * stride_vs
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh + m64 * stride_bm
    kpm_ptr = KeyPad + b64 * stride_kpm
    seqid_ptr = SeqId + b64 * stride_sid
    prefix_ptr = Prefix + b64 * stride_pfx
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(Slopes + b64 * stride_slb + h64 * stride_slh).to(tl.float32) * LOG2E
    diag = seqlen_k - seqlen_q
    q_seq = rows
    if HAS_SEQID:
        q_seq = tl.load(seqid_ptr + rows + diag, mask=row_ok, other=0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    lo, lo_masked, hi = key_block_range(start_m, b64, KvRange, SeqRange, seqlen_q, seqlen_k,
                                        IS_CAUSAL, HAS_KPM, HAS_SEQID, HAS_PREFIX, BLOCK_M, BLOCK_N)
    if REACH:
        norm_b, norm_rows = norm_row(b, tl.num_programs(2), VARLEN)
        lo = tl.minimum(reach_first_key(Norms, norm_b, h, n_heads, n_heads // n_groups, norm_rows, slope2,
                                        qk_scale2, start_m + diag, BLOCK_N), lo_masked)
    # dS is the bias gradient; a (B, H, S_q, S_k) buffer for BIAS_GRAD == 2 (zero-initialised).
    dbias_base = DBias + bh.to(tl.int64) * seqlen_q * seqlen_k + m64 * seqlen_k
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, dbias_base, kpm_ptr, seqid_ptr, prefix_ptr,
        stride_ks, stride_vs, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, q_seq, slope2, qk_scale2,
        seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo, lo_masked,
        IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, BIAS_GRAD, False, DESC, ROW_DESC,
        DOT_PRECISION, BLOCK_N, BLOCK_D,
    )
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, dbias_base, kpm_ptr, seqid_ptr, prefix_ptr,
        stride_ks, stride_vs, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, q_seq, slope2, qk_scale2,
        seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo_masked, hi,
        IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, BIAS_GRAD, True, DESC, ROW_DESC,
        DOT_PRECISION, BLOCK_N, BLOCK_D,
    )

    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqs
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=q_mask)
