"""Per-step pieces of the Hopper dK/dV kernel's consumers (``hopper_backward.py``): a step's row terms read from
shared memory, the bias row at a warpgroup's keys, the rows of a packed step cleared, and dK, dV stored at the end."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from mpt_attention.impl.triton.hopper_forward import store_through_buffer
from mpt_attention.impl.triton.hopper_loaders import clear_rows

# a stage of the row terms ([1, 2, BLOCK_M] unswizzled, as the copy engine writes it) seen as one vector
ROWS_LAYOUT = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, order=[0]))


@gluon.jit
def bias_keys(Bias, b, h, bias_b_on, bias_h_on, stride_bb, stride_bh, stride_bk, keys, seqlen_k):
    """The bias row at this warpgroup's keys for (batch b, query head h): float32 in log2 units already
    (launch._log2_bias_rows), 0 past S_k."""
    row = Bias + (b * bias_b_on).to(gl.int64) * stride_bb + (h * bias_h_on).to(gl.int64) * stride_bh
    return gl.load(row + keys.to(gl.int64) * stride_bk, mask=keys < seqlen_k, other=0.0)


@gluon.jit
def row_offsets(row_terms, q_ok, query_layout: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                VARLEN: gl.constexpr):
    """A step's log2-domain LSE offsets from its row terms, +inf past S_q. At tile width 64 for dense inputs as
    stored (``hopper_dkdv.row_stats_buffer``'s padding): the select after the shared-memory load was the
    consumers' most-sampled stall under Triton 3.8 (benchmarks/NOTES.md session 58); without it the D64 kernel
    takes 4.7% less time under 3.8, 4.1% less under 3.7.1 and as long as before under 3.6 (sessions 61-62). Selected
    for packed sequences (a sequence's rows past its end are the next one's) and at width 128, where dropping it
    cost 0.5% (3.6) and 2% (3.8) at D128 (session 61)."""
    lse2 = row_terms.slice(0, BLOCK_M).load(query_layout)
    if VARLEN or HEAD_DIM > 64:
        lse2 = gl.where(q_ok, lse2, float("inf"))
    return lse2


@gluon.jit
def clear_step(q_smem, do_smem, stage, start_m, seqlen_q, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A step's Q and dO rows outside the sequence's used queries cleared (``PACKED_USED``, ``clear_rows``): its
    first block may start before the sequence (``lo``'s alignment), its last run past the used rows."""
    clear_rows(q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM]), -start_m, seqlen_q - start_m, BLOCK_M, HEAD_DIM)
    clear_rows(do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM]), -start_m, seqlen_q - start_m, BLOCK_M, HEAD_DIM)


@gluon.jit
def store_dkdv(k, v, k3, v3, dk, dv, dk_t, dv_t, dk_desc, dv_desc, b, row, kv_h, softmax_scale, ds_free, dq_bars,
               total, SLOTS: gl.constexpr, CONSUMER_DQ: gl.constexpr, FUSED_DQ: gl.constexpr, MAIN: gl.constexpr,
               TAIL: gl.constexpr):
    """This warpgroup's dK, dV staged in its K and V buffers and bulk-stored from there at ``[b, row, kv_h, 0]``
    (as the forward stores its output through Q's), once nothing reads K any more."""
    if CONSUMER_DQ:  # the other consumer reads both halves of K until its last step
        if total > 0:
            mbarrier.wait(ds_free.index((total - 1) % SLOTS), ((total - 1) // SLOTS) % 2)
    elif FUSED_DQ:  # the dQ warpgroup reads both halves of K until its last step
        mbarrier.wait(dq_bars, 0)
    store_through_buffer(k, k3, dk * softmax_scale, dk_t * softmax_scale, dk_desc, b, row, kv_h, MAIN, TAIL)
    store_through_buffer(v, v3, dv, dv_t, dv_desc, b, row, kv_h, MAIN, TAIL)
    tma.store_wait(0)
