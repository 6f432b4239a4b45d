"""The Hopper forward's score tile (``hopper_forward.py``): the terms added to it, the tensor-core product that adds
per-key terms to the unscaled scores, and the online-softmax step.

Two forms (``RAW``, chosen by ``hopper.raw_scores``):

* scaled: s * c + col (the ALiBi column slope * (j - first key of the block) plus a bias row's slice, one fused
  multiply-add per score), the row maximum over those, then exp2(s' - m);
* raw (a positive scale; no bias, causal ALiBi, or a bias row without ALiBi): the per-key terms t_j divided by the
  scale join Q K^T in the tensor core, through a k=16 product of an A operand with rows ``[a0, a1, a2, 0, ...]``
  against a B operand with rows ``[b0, b1, b2, 0, ...]`` per key (``issue_scores``): ALiBi as ``c`` = slope / scale
  in three bfloat16 parts against each key's place in its block (``alibi_operand``, ``write_key_positions``), a bias
  row as ones against its terms in three parts (``write_ones_operand``, ``common.row_keys_kernel``). The row maximum
  is then taken over the unscaled scores and the scale enters each exponential's fused multiply-add,
  exp2(fma(s, c, -m)) (FA3's form): 64 instructions fewer per thread and block.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from mpt_attention.impl.triton.common import _log2_bias
from mpt_attention.impl.triton.gluon_compat import partition_barrier, smem_reinterpret

HALF_M = gl.constexpr(64)  # query rows per consumer warpgroup
# the extension product's operands in shared memory: A [64, 16] per consumer, B [BLOCK_N, 16] bfloat16 rows of 32 bytes
# (hopper._ROW_KEYS_LAYOUT's boxes)
EXT_A_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2))
EXT_B_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=4))
# a bias row's slice, unswizzled: a plain row of BLOCK_N values
ROW_LAYOUT = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))


@gluon.jit
def score_terms(s, rows, cols, col_terms, tile_terms, qk_scale2, slope2, diag, seqlen_k, IS_CAUSAL: gl.constexpr,
                ALIBI: gl.constexpr, HAS_COLS: gl.constexpr, BIAS_FULL: gl.constexpr, APPLY_MASK: gl.constexpr,
                RAW: gl.constexpr = False):
    """Log2-domain scores of one ``[64, BLOCK_N]`` tile, the formula of common.score_tile except that
    the per-key terms arrive as one vector ``col_terms`` (``HAS_COLS``): the bias row, and MPT's causal
    ALiBi slope * (j - (S_k - 1)) as slope * (j - first key of the block), so one fused multiply-add per
    score; the ALiBi block's constant rides on the row maximum. ``tile_terms`` (``BIAS_FULL``): the block's
    bias tile in log2 units. ``RAW``: the masks alone, the scores left unscaled."""
    if not RAW:
        if HAS_COLS:
            s = s * qk_scale2 + col_terms[None, :]
        else:
            s = s * qk_scale2
    if BIAS_FULL:
        s = s + tile_terms
    if ALIBI == 2:  # symmetric: -slope * |i - j|, query i at absolute position i + diag
        dist = rows[:, None] + diag - cols[None, :]
        s = s - slope2 * gl.where(dist < 0, -dist, dist).to(gl.float32)
    if APPLY_MASK:  # one comparison per score: against each row's last visible key
        if IS_CAUSAL:
            s = gl.where(cols[None, :] <= gl.minimum(rows + diag, seqlen_k - 1)[:, None], s, float("-inf"))
        else:
            s = gl.where((cols < seqlen_k)[None, :], s, float("-inf"))
    return s


@gluon.jit
def _add_f32(a, b):
    # a float32 add that LLVM's SLP vectorizer cannot pack: Triton 3.9 runs it on sm_90 again (3.8 had turned it off
    # for such kernels), and its <4 x float> row sums lengthen the D64 forward's key loops by ~30 instructions and
    # spill: raw forward D64 1.024x under 3.9, unchanged under 3.6 (benchmarks/NOTES.md sessions 55-56)
    return gl.inline_asm_elementwise("add.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def softmax_step(s, m_i, l_i, rows, start_n, offs_n, col_terms, alibi_cols, side, tile_terms, qk_scale2, slope2, diag,
                 seqlen_k, masked, IS_CAUSAL: gl.constexpr, ALIBI: gl.constexpr, HAS_COLS: gl.constexpr,
                 BIAS_ROW: gl.constexpr, BIAS_FULL: gl.constexpr, RAW: gl.constexpr):
    """Online-softmax update for the score tile of key block ``start_n``: ``(p, alpha, m_new, l_new, top)``.
    Scores stay relative to the block's ALiBi ``shift`` (causal: one constant; symmetric: one per row);
    ``m`` is absolute. ``top``: each row's largest score of the block before its shift (``RAW``: unscaled), the
    maximum the step takes anyway (``hopper_forward``'s ``TABLE`` keeps it).

    Symmetric ALiBi, -slope * |i + diag - j|, on a block wholly on one ``side`` of the rows' positions (``alibi_side``)
    is side * slope * (j - start_n) + side * slope * (start_n - i - diag): a column term and a per-row shift, one
    fused multiply-add per score as in the causal form. Per score (an integer distance, its absolute value and its
    conversion to float: three more instructions) a block cost 41% more than with causal ALiBi (session 11); only
    blocks across the diagonal and the last partial block take that form now: the non-causal ALiBi forward 1.15-1.28x
    (benchmarks/NOTES.md session 27). Not beside a bias matrix, whose tile left no registers for the split."""
    cols = start_n + offs_n
    shift = 0.0
    if RAW:
        # unscaled scores (their per-key terms already added by the extension product, ``issue_scores``): the
        # maximum is taken before scaling, and the scale enters each exponential's fused multiply-add
        if masked:
            s = score_terms(s, rows, cols, col_terms, tile_terms, qk_scale2, slope2, diag, seqlen_k, IS_CAUSAL, 0,
                            False, False, True, RAW)
        if ALIBI == 1:
            shift = slope2 * (start_n - (seqlen_k - 1)).to(gl.float32)
        top = gl.max(s, 1)
        m_new = gl.maximum(m_i, top * qk_scale2 + shift)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_ref)
        p = gl.exp2(gl.fma(s, qk_scale2, (shift - m_ref)[:, None]))
        return p, alpha, m_new, l_i * alpha + gl.reduce(p, 1, _add_f32), top
    if ALIBI == 2 and not BIAS_FULL:
        if masked:  # the last partial block takes the per-score form whatever its side
            side = 0.0
        shift = side * slope2 * (start_n - diag - rows).to(gl.float32)
        if side == 0.0:
            s = score_terms(s, rows, cols, col_terms, tile_terms, qk_scale2, slope2, diag, seqlen_k, IS_CAUSAL, ALIBI,
                            HAS_COLS, BIAS_FULL, True)
        else:
            if BIAS_ROW:
                side_cols = col_terms + side * alibi_cols
            else:
                side_cols = side * alibi_cols
            s = score_terms(s, rows, cols, side_cols, tile_terms, qk_scale2, slope2, diag, seqlen_k, IS_CAUSAL, 0,
                            True, BIAS_FULL, False)
    else:
        if masked:
            s = score_terms(s, rows, cols, col_terms, tile_terms, qk_scale2, slope2, diag, seqlen_k, IS_CAUSAL, ALIBI,
                            HAS_COLS, BIAS_FULL, True)
        else:
            s = score_terms(s, rows, cols, col_terms, tile_terms, qk_scale2, slope2, diag, seqlen_k, IS_CAUSAL, ALIBI,
                            HAS_COLS, BIAS_FULL, False)
        if ALIBI == 1:
            shift = slope2 * (start_n - (seqlen_k - 1)).to(gl.float32)
    top = gl.max(s, 1)
    m_new = gl.maximum(m_i, top + shift)
    # A row that has seen only masked keys (or -inf bias) keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_ref)
    p = gl.exp2(s - (m_ref - shift)[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1), top


@gluon.jit
def alibi_side(start_n, first_row, BLOCK_N: gl.constexpr):
    """Where key block ``start_n`` lies against a consumer's query positions ``[first_row, first_row + 64)``
    (absolute: row + S_k - S_q), for symmetric ALiBi: 1.0 if every key is at or before every position, -1.0 if at
    or after, 0.0 across (at most two blocks per consumer and tile)."""
    side = 0.0
    if start_n + BLOCK_N - 1 <= first_row:
        side = 1.0
    elif start_n >= first_row + HALF_M - 1:
        side = -1.0
    return side


@gluon.jit
def read_col_terms(alibi_cols, bias_smem, slot, col_layout: gl.constexpr, ALIBI: gl.constexpr, BIAS_ROW: gl.constexpr,
                   BLOCK_N: gl.constexpr):
    """The per-key vector of a block's scores (log2 units): its bias slice, read from ``slot`` (landed:
    the caller has waited for the barrier it came under), plus the block-relative causal ALiBi columns."""
    terms = alibi_cols
    if BIAS_ROW:
        # unswizzled (swizzle_byte_width=0), so the [1, 1, BLOCK_N] box is a plain row of BLOCK_N values
        row = smem_reinterpret(bias_smem.index(slot), bias_smem.dtype, [BLOCK_N], ROW_LAYOUT)
        bias2 = row.load(col_layout)  # float32, log2 units already (launch._log2_bias_rows)
        if ALIBI == 1:
            terms = alibi_cols + bias2
        else:
            terms = bias2
    return terms


@gluon.jit
def read_tile_terms(bias_smem, slot, s_layout: gl.constexpr, none, BIAS_FULL: gl.constexpr):
    """The bias tile of a block in log2 units, read from ``slot`` (landed: it came with K), in the score
    tile's layout; ``none`` without ``BIAS_FULL``."""
    if BIAS_FULL:
        raw = bias_smem.index(slot).reshape([HALF_M, bias_smem.shape[-1]]).load(s_layout)
        return _log2_bias(raw)  # -inf stays, MPT's finfo.min becomes the soft mask (common.py)
    else:
        return none


@gluon.constexpr_function
def main_cols(head_dim, tail):
    """Columns of the tile in the products' first piece: all of them, or 64 with a ``tail`` of 16 or 32 after
    (also hopper_backward's)."""
    return head_dim if tail == 0 else 64


@gluon.constexpr_function
def contracted_cols(head_dim, tail, qk_cols):
    """The columns a product contracting D takes (``Q K^T``; the backward's S^T and dP^T): ``qk_cols`` where the
    launcher gives them (the forward's ``hopper.qk_cols``: D rounded up to 16), else those of the products' pieces
    (``main_cols`` and the ``tail``)."""
    if qk_cols:
        return qk_cols
    return head_dim if tail == 0 else 64 + tail


@gluon.jit
def issue_over_d(a, b_rows, zero, COLS: gl.constexpr, ONTO: gl.constexpr = False):
    """Issue ``a @ b_rows^T`` (async), contracting the tiles' first ``COLS`` columns: all of them, or pieces of 64,
    32 and 16 chained (80 = 64 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16), where the rest are the copy engine's zeros
    (D 72-112: they take no tensor-core time; Gluon's shapes are powers of 2); ``ONTO``: added to ``zero``'s values
    instead (``issue_alibi_ext``). Also hopper_backward's S^T and dP^T."""
    if COLS == a.shape[1]:
        tok = warpgroup_mma(a, b_rows.permute((1, 0)), zero, use_acc=ONTO, is_async=True)
    else:
        tok = warpgroup_mma(a.slice(0, 64, dim=1), b_rows.slice(0, 64, dim=1).permute((1, 0)), zero,
                            use_acc=ONTO, is_async=True)
        if (COLS - 64) >= 32:
            tok = warpgroup_mma(a.slice(64, 32, dim=1), b_rows.slice(64, 32, dim=1).permute((1, 0)), tok,
                                is_async=True)
        if (COLS - 64) % 32 == 16:
            tok = warpgroup_mma(a.slice(COLS - 16, 16, dim=1), b_rows.slice(COLS - 16, 16, dim=1).permute((1, 0)),
                                tok, is_async=True)
    return tok


@gluon.jit
def issue_scores(q, k_rows, ext_a, ext_b, half, stage, zero, COLS: gl.constexpr, EXT: gl.constexpr,
                 ROW_KEYS: gl.constexpr, BLOCK_N: gl.constexpr):
    """Issue a block's scores (``issue_over_d``), then with ``EXT`` the extension product ``ext_a @ keys^T``
    (``ext_keys``) that adds per-key terms (ALiBi's block-relative columns, ``alibi_operand``, or a bias row's,
    ``write_ones_operand``) into the same accumulator."""
    tok = issue_over_d(q, k_rows, zero, COLS)
    if EXT:
        tok = warpgroup_mma(ext_a, ext_keys(ext_b, half, stage, BLOCK_N, ROW_KEYS).permute((1, 0)), tok,
                                            is_async=True)
    return tok


@gluon.jit
def issue_alibi_ext(ext_a, ext_b, half, zero, BLOCK_N: gl.constexpr):
    """Issue causal ALiBi's extension product alone (async, onto nothing): it reads no K, so the forward issues a
    block's at the end of the block before and lets Q K^T accumulate onto it (``issue_over_d``'s ``ONTO``), keeping
    it off the scores' path."""
    return warpgroup_mma(ext_a, ext_keys(ext_b, half, 0, BLOCK_N, False).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def ext_keys(ext_b, half, stage, BLOCK_N: gl.constexpr, ROW_KEYS: gl.constexpr):
    """The [BLOCK_N, 16] B operand of a block's extension product: the bias row's key terms in K's ``stage``
    (``ROW_KEYS``), else this consumer's key positions (``write_key_positions``)."""
    if ROW_KEYS:
        return ext_b.index(stage).reshape([BLOCK_N, 16])
    else:
        return ext_b.index(half).reshape([BLOCK_N, 16])


@gluon.jit
def alibi_operand(c):
    """The [64, 16] A operand of the scores' extension product (``RAW`` with causal ALiBi; each consumer writes it
    to shared memory once per tile): every row ``[c_hi, c_mid, c_lo, 0, ...]``, ``c`` (ALiBi's slope over the
    scale, per key) split into three bfloat16 parts whose sum is ``c`` to float32's precision (bfloat16 whatever
    q's dtype: float32's range; the product is one of its own, accumulating in float32 like the main one). Against
    ``write_key_positions``' rows ``[n, n, n, 0, ...]`` (exact small integers) it adds ``c * n`` to the raw score of the
    block's key ``n``: the tensor core adds ALiBi's column term instead of a fused multiply-add per score. Held in
    registers through the key loop instead, its 4 registers made the D128 loop spill (benchmarks/NOTES.md
    session 35)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
    hi = c.to(gl.bfloat16).to(gl.float32)
    rest = c - hi
    mid = rest.to(gl.bfloat16).to(gl.float32)
    lo = rest - mid
    k = gl.arange(0, 16, layout=gl.SliceLayout(0, layout))[None, :] + gl.zeros([HALF_M, 16], gl.int32, layout)
    return gl.where(k == 0, hi, gl.where(k == 1, mid, gl.where(k == 2, lo, 0.0))).to(gl.bfloat16)


@gluon.jit
def write_key_positions(kx, BLOCK_N: gl.constexpr):
    """Fill ``kx`` ([BLOCK_N, 16] in shared memory) with rows ``[n, n, n, 0, ...]``, n the key's place in its block
    (``alibi_operand``), for this warpgroup's products to read."""
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [4, 1], [1, 0])
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))[:, None] + gl.zeros([BLOCK_N, 16], gl.int32, layout)
    k = gl.arange(0, 16, layout=gl.SliceLayout(0, layout))[None, :] + gl.zeros([BLOCK_N, 16], gl.int32, layout)
    kx.store(gl.where(k < 3, n, 0).to(kx.dtype))
    fence_async_shared()
    partition_barrier()


@gluon.jit
def write_ones_operand(ext_a):
    """Fill ``ext_a`` ([64, 16] in shared memory) with rows ``[1, 1, 1, 0, ...]``: against a bias row's key terms
    ``[t_hi, t_mid, t_lo, 0, ...]`` (``common.row_keys_kernel``) the extension product adds each key's term."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
    k = gl.arange(0, 16, layout=gl.SliceLayout(0, layout))[None, :] + gl.zeros([HALF_M, 16], gl.int32, layout)
    ext_a.store(gl.where(k < 3, 1.0, 0.0).to(ext_a.dtype))
    fence_async_shared()
    partition_barrier()
