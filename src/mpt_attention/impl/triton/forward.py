"""Forward kernel: FlashAttention-2 style online softmax with ALiBi, bias, masks, GQA and dropout.

One program computes a ``[BLOCK_M, D]`` tile of the output for one (batch, query head) and
streams the key/value blocks it can see. Under plain causal masking the stream is split in two:
blocks fully below the diagonal run without any mask arithmetic, the diagonal blocks with it.
"""

import triton
import triton.language as tl

from mpt_attention.impl.triton.common import (
    BIAS_ROW_VALUES, LOG2E, bias_row_source, block_bias, dropout_keep, encode_lse, grid_row, key_block_range,
    live_keys, score_tile, sequence_bounds,
)
from mpt_attention.impl.triton.reach import norm_row, reach_first_key


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q,
    k_base, v_base, bias_base, kpm_ptr, seqid_ptr, prefix_ptr,
    stride_ks, stride_vs, stride_bm, stride_bn,
    rows, offs_m, offs_n, offs_d, q_seq, slope2, qk_scale2,
    seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo, hi,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, APPLY_MASK: tl.constexpr, KV_DESC: tl.constexpr, ROW_DESC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Stream key blocks [lo, hi). KV_DESC: K/V tiles come through tensor descriptors (TMA on Hopper:
    asynchronous bulk copies, rows past the sequence and columns past D arrive as zeros); never with
    key padding, whose rows must not be read at all. ROW_DESC: a bias row through one too (a plain load
    of it goes through a layout conversion in shared memory per block)."""
    d_ok = offs_d < head_dim
    if KV_DESC:
        k_src = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, head_dim], strides=[stride_ks, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, head_dim], strides=[stride_vs, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
    TILE_BIAS: tl.constexpr = BIAS_ROW_VALUES if ROW_DESC else BIAS
    row_src = bias_row_source(bias_base, seqlen_k, BLOCK_N) if ROW_DESC else bias_base
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = live_keys(cols, seqlen_k, kpm_ptr, HAS_KPM)
        # [BLOCK_N, BLOCK_D]
        if KV_DESC:
            k = k_src.load([start_n, 0])
        else:
            kv_tile = offs_n[:, None] * stride_ks + offs_d[None, :]
            k = tl.load(k_base + tl.cast(start_n, tl.int64) * stride_ks + kv_tile, mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
        # [BLOCK_M, BLOCK_N]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        bias_ptrs = block_bias(row_src, bias_base, start_n, offs_m, offs_n, stride_bm, stride_bn, BIAS, ROW_DESC,
                               BLOCK_N)
        s = score_tile(
            qk, rows, cols, bias_ptrs, kpm_ptr, seqid_ptr, prefix_ptr, q_seq, slope2, qk_scale2,
            seqlen_q, seqlen_k, IS_CAUSAL, ALIBI, TILE_BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, APPLY_MASK,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, cols, rng_q, rng_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if KV_DESC:
            v = v_src.load([start_n, 0])
        else:
            v = tl.load(v_base + tl.cast(start_n, tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    Bias, Slopes, KeyPad, SeqId, Prefix, Seed, KvRange, SeqRange, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, Norms,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_slb, stride_slh,
    stride_kpm, stride_sid, stride_pfx,
    n_heads, n_groups, seqlen_q, seqlen_k, head_dim,
    qk_scale2, dropout_p,
    IS_CAUSAL: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEQID: tl.constexpr, HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr, VARLEN: tl.constexpr, KV_DESC: tl.constexpr, ROW_DESC: tl.constexpr,
    REACH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``seqlen_q, seqlen_k``: the lengths of every batch row, or under VARLEN the longest sequence's
    (the grid's extent and the dropout counter's dims); each sequence's own from its first row ``CuSeqQ/K`` and
    its end ``EndSeqQ/K`` (common.sequence_bounds).
    ``REACH`` (causal ALiBi from slopes, no mask or bias): key blocks past the head's reach are skipped
    (reach.py), from the heads' norm maxima in ``Norms`` (``reach.norm_launch``'s words)."""
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

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim

    q_base = Q + b64 * stride_qb + h64 * stride_qh + (q_start + start_m) * stride_qs
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + kv64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + kv64 * stride_vh + k_start * stride_vs
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh + tl.cast(start_m, tl.int64) * stride_bm
    kpm_ptr = KeyPad + b64 * stride_kpm
    seqid_ptr = SeqId + b64 * stride_sid
    prefix_ptr = Prefix + b64 * stride_pfx

    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(Slopes + b64 * stride_slb + h64 * stride_slh).to(tl.float32) * LOG2E
    q_seq = rows
    if HAS_SEQID:
        # queries carry the ids of the last S_q key positions (bottom-right alignment)
        q_seq = tl.load(seqid_ptr + rows + (seqlen_k - seqlen_q), mask=row_ok, other=0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, lo_masked, hi = key_block_range(start_m, b64, KvRange, SeqRange, seqlen_q, seqlen_k,
                                        IS_CAUSAL, HAS_KPM, HAS_SEQID, HAS_PREFIX, BLOCK_M, BLOCK_N)
    if REACH:
        norm_b, norm_rows = norm_row(b, tl.num_programs(2), VARLEN)
        lo = tl.minimum(reach_first_key(Norms, norm_b, h, n_heads, n_heads // n_groups, norm_rows, slope2,
                                        qk_scale2, start_m + seqlen_k - seqlen_q, BLOCK_N), lo_masked)
    if not (HAS_KPM or HAS_SEQID or HAS_PREFIX):
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_ptr, seqid_ptr, prefix_ptr,
            stride_ks, stride_vs, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, q_seq, slope2, qk_scale2,
            seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo, lo_masked,
            IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, False, KV_DESC, ROW_DESC,
            DOT_PRECISION, BLOCK_N, BLOCK_D,
        )
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_ptr, seqid_ptr, prefix_ptr,
        stride_ks, stride_vs, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, q_seq, slope2, qk_scale2,
        seed, bh, dropout_p, rng_q, rng_k, seqlen_q, seqlen_k, head_dim, lo_masked, hi,
        IS_CAUSAL, ALIBI, BIAS, HAS_KPM, HAS_SEQID, HAS_PREFIX, DROPOUT, True, KV_DESC, ROW_DESC, DOT_PRECISION,
        BLOCK_N, BLOCK_D,
    )

    # Rows that saw no key (l = 0) are defined as 0 with a log-sum-exp of -inf.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    lse = encode_lse(m_i, l_i, BIAS)
    o_base = Out + b64 * stride_ob + h64 * stride_oh + (q_start + start_m) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + q_start + rows, lse, mask=row_ok)
