"""How far back causal ALiBi can see: past its reach every probability is below 2^-128, which the kernels'
exponential returns as 0, so they may leave those keys out and compute the same function.

With ``c = softmax_scale * log2(e)`` and ``a = slope * log2(e)`` (both log2 units), query i at position
``p = i + S_k - S_q`` gives key ``j <= p`` the score ``x_j = c * q.k_j - a * (p - j)`` (MPT's causal ALiBi, shifted
by a constant per row). The row's maximum ``m`` is at least the score of its own position, ``x_p = c * q.k_p``, so
by Cauchy-Schwarz, with ``|q|`` and ``|k|`` at most ``Q`` and ``K`` over the head's rows::

    x_j - m  <=  2 |c| Q K - a (p - j)

Every key at least ``reach = (VANISH2 + 2 |c| Q K) / a`` behind the query's position has ``x_j - m <= -128``. The
Hopper kernels' exponential (``ex2.approx.ftz.f32``) flushes results below 2^-126 to zero, so such a key's
probability is exactly 0 whether it is computed or not, and so are its shares of the row's sum, of the output
(whatever its V holds) and of every gradient. A causal tile whose first query sits at ``p0`` needs no key block
that ends at least ``reach`` before ``p0``: results equal those of computing every block up to float32's rounding
(the order of the online softmax's rescales changes; tests/test_gpu_hopper.py compares the two).

The bound needs each head's largest query and key norms: ``row_norm_max_kernel`` reads q and k once before the
kernel (memory-bound) and keeps the maxima as float32 bit patterns, whose integer order is the float order for
non-negative values, so an atomic maximum over int32 takes them. A NaN norm (a NaN or infinite input) is kept as
+inf: the head then reads every key, as without the bound. Slopes <= 0 (no decay) read every key too.

What it saves depends on the data, never what is computed: see benchmarks/NOTES.md session 39 for N(0, 1) and
wider inputs at MPT's slopes, and for the lengths below which reading the norms costs more than the skipped blocks
(``hopper.REACH_MIN_KEYS``).
"""

import triton
import triton.language as tl

# log2 units below a row's maximum past which the kernels' exponential gives 0: its results below 2^-126 are flushed,
# two more for the rounding of the scores and of the ALiBi term (float32), and the norms' product, whose float32
# sums of products round too, is scaled by 1 + 2^-8 where the kernels use it
VANISH2 = tl.constexpr(128.0)
NORM_SLACK = tl.constexpr(1.00390625)  # 1 + 2^-8


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
