"""Hopper (sm_90) dK/dV kernel in Gluon, the backward counterpart of ``hopper_forward.py``.

A program owns 128 keys of one (batch, KV head): each of two consumer warpgroups keeps 64 keys and
their dK, dV accumulators in registers, while a loader warp (``hopper_loaders.backward_loader``) streams the
(Q, dO) tiles of every query block of every query head in the group through three TMA stages (``bwd_stages``),
each with the block's row terms (LSE offset and delta, written side by side by the delta kernel:
``hopper_dkdv.row_stats_buffer``), so no step waits on a global load (that wait was ~20% of the consumers' warp samples
at D128; reading them from shared memory made forward+backward 1.10x faster at D64, benchmarks/NOTES.md session
21). Tiles are computed transposed, keys as rows (the ``wgmma`` M dimension):

    S^T  = K Q^T                      (K from registers, loaded once: see below)
    P^T  = exp2(S^T * scale * log2e + (ALiBi + bias row) * log2e - lse * log2e)   (lse per query: per column)
    dP^T = V dO^T, dV += P^T dO       (issued together, asynchronously; dV in flight while dS is computed)
    dS^T = P^T * (dP^T - delta)       (the next step's S^T issued first: its latency hides behind this)
    dK  += dS^T Q

The bias row, (B|1, H|1, 1, S_k) as MPT passes it, is one value per key, i.e. per tile row; a row that
needs its gradient keeps the general backward (dbias sums over queries). With the dQ warpgroup (below) a
bias matrix in q's dtype is read too: the loader brings each step's [BLOCK_M, 64] box per consumer with Q
and dO, read transposed into the S^T layout (``ldmatrix.trans``). A full-shape one's gradient is dS itself:
the ring keeps it queries-as-rows and the dQ warpgroup bulk-stores it from there (``STORE_DS``): one kernel
for dQ, dK, dV and dbias, 3.0x SDPA memory-efficient forward+backward on an H200 (benchmarks/NOTES.md
session 17, against 2.2x for the general dK/dV kernel plus a dQ GEMM on the stored dS).

At 32 queries per step (D128) the two narrow products (S^T, dP^T: N=32) read 1.5x more shared memory per
FLOP than the tensor cores' rate allows when both operands come from there (3 KB per 16-cycle m64n32k16
against 128 bytes per cycle). K therefore stays in registers as the A operand of S^T: 32 registers per
thread, no spills under Triton 3.6; ncu's L1/shared throughput 62.6% -> 50.9%, dK/dV 4% faster (2.05
vs 2.14 ms, B2 H16 S8192). V in registers as well spills 268 bytes and makes ptxas serialise every
``wgmma``, so dP^T = V dO^T keeps both operands in shared memory.

The program owns the dK, dV rows it writes: no atomics there. dQ comes one of two ways:
- ``FUSED_DQ`` (dQ in any order: the default unless reproducibility is asked for; tiles of 64 or 128): a fourth
  warpgroup. Each consumer stores its dS half, transposed back to queries as rows ([BLOCK_M, 64 keys]), in a
  ring of ``ds_slots`` steps under its dK product and signals; the dQ warpgroup forms dQ^T = K^T dS^T over all
  128 keys for 64 queries at a time (two steps at D128: an m64n64 product reads 4 KB of shared memory per 32
  tensor-core cycles where m64n32 read 3 KB per 16; the backward 1.02-1.04x, benchmarks/NOTES.md session 22),
  D in chunks of 64, K from shared memory, and adds it into a float32 buffer by bulk tensor reductions of
  [BLOCK_M, 32] boxes: each [64, 32] staging tile is one 128-byte swizzled row per query, so the transposed store
  from the accumulator layout has no bank conflicts (one unswizzled [BLOCK_M, D] tile had 4-way conflicts, and
  its stores kept the load/store pipe 86% busy: the kernel 2.90 -> 2.56 ms at B2 H16 S8192, benchmarks/NOTES.md
  session 20). The consumers wait on nothing of it unless it falls a whole ring behind; they give K's
  registers to it (K is read from shared memory then). Five GEMMs per step instead of the split's seven: the backward
  1.07-1.19x the split on an H200 with as many KV heads as query heads (benchmarks/NOTES.md, session 15).
  Grouped heads: a program takes ``n_groups / n_splits`` of its group's query heads (two: 1.05x the split
  at GQA 32:4 S8192, against 0.86x with the whole group in one program, whose few, long programs left a
  tail); with ``PARTIAL_DKV`` each writes float32 dK, dV partial sums that the host adds in a fixed order.
  An earlier fused version with the consumers themselves forming dQ in turns lost (0.93x at 32 queries per
  step): every step made one consumer wait for the other.
- ``FUSED_DQ`` at 64 queries per step and tile width 128 (``consumers_dq``; without a bias matrix: FA3's
  structure; D 72-96 too, their products 64 + ``TAIL`` columns): no dQ warpgroup, the consumers at 240
  registers. Each stores step t's dS half into a double-buffered pair, then forms step t-1's dQ: its 64
  columns of dQ^T over all 128 keys from both halves of that step (stored a step ago, so the consumers rarely
  wait for each other), staged for a one-warp writer that issues their bulk reductions; the last step's dQ
  after the loop. S^T and dP^T are m64n64 products (a third less shared-memory operand traffic per query than
  at 32); step t+1's S^T is not issued ahead (no registers left for it). The D128 backward 1.03-1.05x the dQ
  warpgroup's at 32 queries per step, the writer (the consumers had issued the reductions) 1.04-1.09x more
  (benchmarks/NOTES.md session 24), dQ a step late another 1.02x; D80 and D96 1.08-1.09x the dQ warpgroup's
  (session 25).
The dQ partitions and their staging: ``hopper_dq.py``; the consumers' per-step pieces (row terms, bias keys, dK and dV
stored): ``hopper_dkdv_steps.py``.
- Otherwise the general Triton dQ kernel, on a second stream beside this one (a Gluon dQ kernel in this
  layout measured 1.3x slower than it, branch ``wip/hopper-dq``). Dispatched at tiles of 128 only there, where
  it was already 12% faster than the general dK/dV kernel before K moved to registers (2.15 vs 2.44 ms,
  B2 H16 S8192; at D=64 it is slower, 0.84x the general kernel when measured in session 3).
Queries per step (``BLOCK_M``, ``hopper_dkdv.bwd_block_m``): 64 at D64, and at tile width 128 where the consumers
form dQ; otherwise 32 there, where the registers hold no more beside a dQ warpgroup or K. D 72-96 run in tiles
of 128 whose consumer products take 64 + ``TAIL`` columns (``hopper.product_tail``): D80 forward+backward
1.12x against all 128 (benchmarks/NOTES.md session 18).
With causal ALiBi from slopes over at least ``hopper.REACH_MIN_KEYS`` / 2 keys (a training step's length:
``hopper.reach_applies``; ``REACH``) a key block's queries end
at its heads' reach (``reach.py``, ``hopper_tiles.reach_query_end``): past it every probability, and so every
gradient term, is 0. A causal bias row (``REACH == REACH_ROW``) ends them where ``reach.row_reach_kernel``'s table
says, from the row's prefix maxima. A shorter training step (``REACH == REACH_TABLE``, ``hopper.forward_table_applies``)
ends them where its forward's table says, from the forward's own scores (``hopper_tiles.table_query_end``).
Scope otherwise as the Hopper forward (``hopper.py``).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from mpt_attention.impl.triton.backward import SOFT_BLOCK_ROWS
from mpt_attention.impl.triton.common import LOG2E, _log2_bias
from mpt_attention.impl.triton.gluon_compat import partition_arrive, smem_reinterpret
from mpt_attention.impl.triton.hopper_dq import DQ_CHUNK, DQ_COLS, DQ_ROWS, DQ_TILE_LAYOUT
from mpt_attention.impl.triton.hopper_dq import HALF_N as _HALF_N
from mpt_attention.impl.triton.hopper_dq import consumer_dq_step, consumers_dq, dq_partition, dqt_layout, ds_slots
from mpt_attention.impl.triton.hopper_dq import dq_warps, fused_regs
from mpt_attention.impl.triton.hopper_dkdv_steps import ROWS_LAYOUT, bias_keys, clear_step, row_offsets, store_dkdv
from mpt_attention.impl.triton.hopper_forward import store_rows
from mpt_attention.impl.triton.hopper_loaders import backward_loader, bwd_stages, clear_rows
from mpt_attention.impl.triton.hopper_scores import contracted_cols, issue_over_d, main_cols
from mpt_attention.impl.triton.hopper_tiles import PACKED_USED, packed_tile, reach_query_end, row_reach_query_end
from mpt_attention.impl.triton.hopper_tiles import sequence_of, table_query_end
from mpt_attention.impl.triton.hopper_tiles import tile_order
from mpt_attention.impl.triton.reach import KERNEL_REACH_ROW, KERNEL_REACH_TABLE

@gluon.jit
def _bwd_consumer_partition(half, k_smem, v_smem, q_smem, do_smem, bias_smem, kv_bar, ready, empty, dk_desc, dv_desc,
                            ds_smem, ds_ready, ds_free, dq_bars, dq_smem, dq_desc, stats_smem, Slopes, Bias,
                            DKVPart, part_base, part_dv, part_row, b64, b, kv_h, h0, n_g, start_n, lo,
                            stride_slb, stride_slh, stride_bb, stride_bh, stride_bk,
                            bias_b_on, bias_h_on, seqlen_q, seqlen_k, qk_scale2, softmax_scale,
                            DK, DV, k_off, cap_k, stride_dks, stride_dkh, stride_dvs, stride_dvh, head_dim, q_end,
                            zero,
                            IS_CAUSAL: gl.constexpr, ALIBI: gl.constexpr, HEAD_DIM: gl.constexpr,
                            BIAS_ROW: gl.constexpr, FUSED_DQ: gl.constexpr, PARTIAL_DKV: gl.constexpr,
                            BLOCK_M: gl.constexpr, BIAS_FULL: gl.constexpr, TAIL: gl.constexpr,
                            VARLEN: gl.constexpr, KV_IN_STEP: gl.constexpr):
    """One warpgroup: keys ``start_n + 64 * half`` onwards; accumulates and writes their dK, dV. With
    ``FUSED_DQ`` it also leaves each step's dS in a shared ring for the dQ warpgroup, transposed back to queries
    as rows (the layout of the bias gradient the dQ warpgroup stores from there, and in which two steps' tiles
    are adjacent: one B operand of its product); at 64 queries per step and tile width 128 (``consumers_dq``)
    it forms dQ with the other consumer instead, each its 64 of the 128 columns.
    ``TAIL`` (with ``FUSED_DQ``, D 72-96): the products take 64 + ``TAIL`` of the tile's columns, dK and dV
    two accumulators each. ``VARLEN`` (packed sequences): keys past the sequence (its neighbour's, in the same
    boxes) are masked; dK, dV of keys wholly inside the sequence leave through the copy engine as dense (from
    the sequence's row ``k_off``), those of its last keys by masked plain stores into ``DK``, ``DV`` ((T_k, H_kv,
    D), ``head_dim`` columns), since a box would overwrite the next sequence's rows. ``PACKED_USED`` (unused rows
    past each sequence's used ones, which may hold anything): this warpgroup's keys past the used ones, and each
    partial step's Q and dO rows outside them, are cleared before a product reads them (``clear_rows``), and dS is 0
    wherever P is (those rows' delta may be NaN); dK, dV are stored up to ``cap_k``, the sequence's keys used or not
    (zeros past the used ones). Query blocks run from ``lo`` to ``q_end`` (``seqlen_q``, or less past causal ALiBi's
    reach: ``hopper_tiles.reach_query_end``)."""
    dtype: gl.constexpr = q_smem.dtype
    STAGES: gl.constexpr = bwd_stages(BLOCK_M, BIAS_FULL)
    SLOTS: gl.constexpr = ds_slots(BLOCK_M, HEAD_DIM)
    MAIN: gl.constexpr = main_cols(HEAD_DIM, TAIL)
    D_COLS: gl.constexpr = contracted_cols(HEAD_DIM, TAIL, 0)  # S^T's and dP^T's: the output's pieces
    N_G: gl.constexpr = 1 if TAIL == 0 else 2  # async groups per product
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, MAIN, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    st_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2)
    key_layout: gl.constexpr = gl.SliceLayout(1, st_layout)
    query_layout: gl.constexpr = gl.SliceLayout(0, st_layout)

    k3 = k_smem.index(half)
    v3 = v_smem.index(half)
    k = k3.reshape([_HALF_N, HEAD_DIM])
    v = v3.reshape([_HALF_N, HEAD_DIM])
    row0 = start_n + half * _HALF_N
    keys = row0 + gl.arange(0, _HALF_N, layout=key_layout)
    offs_m = gl.arange(0, BLOCK_M, layout=query_layout)
    diag = seqlen_k - seqlen_q
    last_key = row0 + _HALF_N - 1
    st_zero = gl.zeros([_HALF_N, BLOCK_M], gl.float32, st_layout)
    dk = gl.zeros([_HALF_N, MAIN], gl.float32, acc_layout)
    dv = gl.zeros([_HALF_N, MAIN], gl.float32, acc_layout)
    if TAIL > 0:
        tail_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                              instr_shape=[16, TAIL, 16])
        dk_t = gl.zeros([_HALF_N, TAIL], gl.float32, tail_layout)
        dv_t = gl.zeros([_HALF_N, TAIL], gl.float32, tail_layout)

    # Steps run query block after query block, head after head of the group (the loader's order); the
    # head's per-key score terms (causal ALiBi column, bias row) are read once per head, not per step.
    # Step t+1's S^T is issued before step t's dK product, also across heads, so its latency hides
    # behind the dS arithmetic instead of opening every step (not where the consumers form dQ: no registers).
    n_mblocks = gl.cdiv(q_end - lo, BLOCK_M)
    total = n_g * n_mblocks
    mbarrier.wait(kv_bar, 0)
    if VARLEN == PACKED_USED:  # this warpgroup's keys past the used ones, before any product reads them
        clear_rows(k, 0, seqlen_k - row0, _HALF_N, HEAD_DIM)
        clear_rows(v, 0, seqlen_k - row0, _HALF_N, HEAD_DIM)
    CONSUMER_DQ: gl.constexpr = consumers_dq(BLOCK_M, HEAD_DIM)
    gl.static_assert(FUSED_DQ or not CONSUMER_DQ, "64 queries per step at tile width 128 only with the dQ sums")
    gl.static_assert(not (CONSUMER_DQ and BIAS_FULL), "a bias matrix takes the dQ warpgroup (no room for its tiles)")
    PREFETCH: gl.constexpr = not CONSUMER_DQ  # step t+1's S^T issued during step t
    if FUSED_DQ:  # K from shared memory: with it in registers ptxas spills more
        k_a = k
    else:
        k_a = k.load(st_op_layout)
    if CONSUMER_DQ:
        dqt_zero = gl.zeros([DQ_CHUNK, DQ_ROWS], gl.float32, dqt_layout())
    if PREFETCH:
        if VARLEN:  # a packed program may have no step (a sequence without queries): nothing to wait for
            st = st_zero
            if total > 0:
                mbarrier.wait(ready.index(0), 0)
                if VARLEN == PACKED_USED:
                    clear_step(q_smem, do_smem, 0, lo, seqlen_q, BLOCK_M, HEAD_DIM)
                st_tok = issue_over_d(k_a, q_smem.index(0).reshape([BLOCK_M, HEAD_DIM]), st_zero, D_COLS)
                st = warpgroup_mma_wait(0, deps=[st_tok])
        else:
            mbarrier.wait(ready.index(0), 0)
            st_tok = issue_over_d(k_a, q_smem.index(0).reshape([BLOCK_M, HEAD_DIM]), st_zero, D_COLS)
            st = warpgroup_mma_wait(0, deps=[st_tok])
    else:
        st = st_zero
    t = 0
    for g in range(n_g):
        h = h0 + g
        h64 = h.to(gl.int64)
        slope2 = 0.0
        key_terms = gl.zeros([_HALF_N], gl.float32, key_layout)
        if ALIBI != 0:
            slope2 = gl.load(Slopes + b64 * stride_slb + h64 * stride_slh).to(gl.float32) * LOG2E
        if ALIBI == 1:  # MPT's causal form: slope * (key - (S_k - 1)), one value per row here
            key_terms = slope2 * (keys - (seqlen_k - 1)).to(gl.float32)
        if BIAS_ROW:  # a row over the keys: one value per key, i.e. per row of this tile
            key_terms = key_terms + bias_keys(Bias, b, h, bias_b_on, bias_h_on, stride_bb, stride_bh, stride_bk,
                                              keys, seqlen_k)
        if VARLEN:  # keys past the sequence are its neighbour's (dense inputs read zeros there)
            key_terms = gl.where(keys < seqlen_k, key_terms, float("-inf"))
        for mb in range(n_mblocks):
            stage = t % STAGES
            k_step = k_a
            v_step = v
            kv_zero = 0
            if CONSUMER_DQ and KV_IN_STEP:  # K's and V's operand descriptors formed in the step (kernel docstring)
                kv_zero = t * zero
                k_step = k_smem.index(half + kv_zero).reshape([_HALF_N, HEAD_DIM])
                v_step = v_smem.index(half + kv_zero).reshape([_HALF_N, HEAD_DIM])
            start_m = lo + mb * BLOCK_M
            queries = start_m + offs_m
            if VARLEN:  # the previous sequence's last rows (``lo``) are negative: past any length as unsigned
                q_ok = queries.to(gl.uint32, bitcast=True) < seqlen_q.to(gl.uint32)
            else:
                q_ok = queries < seqlen_q
            # the offsets come decoded (common.decode_lse2: +inf for a row that saw no key); +inf past S_q
            # (``row_offsets``) makes those rows' P (and so dS) zero
            row_terms = smem_reinterpret(stats_smem.index(stage), gl.float32, [2 * BLOCK_M], ROWS_LAYOUT)
            q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            if PREFETCH:  # the previous step waited for this stage
                lse2 = row_offsets(row_terms, q_ok, query_layout, BLOCK_M, HEAD_DIM, VARLEN)
                delta = row_terms.slice(BLOCK_M, BLOCK_M).load(query_layout)
            else:  # the row terms only after the stage's ready wait
                mbarrier.wait(ready.index(stage), (t // STAGES) % 2)
                if VARLEN == PACKED_USED:
                    clear_step(q_smem, do_smem, stage, start_m, seqlen_q, BLOCK_M, HEAD_DIM)
                st_tok = issue_over_d(k_step, q, st_zero, D_COLS)
                st = warpgroup_mma_wait(0, deps=[st_tok])
                lse2 = row_offsets(row_terms, q_ok, query_layout, BLOCK_M, HEAD_DIM, VARLEN)
            s2 = st * qk_scale2
            if ALIBI == 1 or BIAS_ROW or VARLEN:
                s2 = s2 + key_terms[:, None]
            if ALIBI == 2:  # symmetric: -slope * |query + diag - key|
                dist = queries[None, :] + diag - keys[:, None]
                s2 = s2 - slope2 * gl.where(dist < 0, -dist, dist).to(gl.float32)
            if BIAS_FULL:  # this warpgroup's [BLOCK_M, 64] box of the bias, read transposed: keys as rows
                raw = bias_smem.index(2 * stage + half).reshape([BLOCK_M, _HALF_N]).permute((1, 0)).load(st_layout)
                s2 = s2 + _log2_bias(raw)
            if IS_CAUSAL:
                if start_m + diag < last_key:  # a block on the diagonal: key <= query + diag
                    s2 = gl.where(keys[:, None] <= queries[None, :] + diag, s2, float("-inf"))
            p = gl.exp2(s2 - lse2[None, :])
            p_op = gl.convert_layout(p.to(dtype), op_layout)
            dpt_tok = issue_over_d(v_step, do, st_zero, D_COLS)
            if TAIL == 0:
                dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
            else:
                dv_tok = warpgroup_mma(p_op, do.slice(0, MAIN, dim=1), dv, is_async=True)
                dv_t_tok = warpgroup_mma(p_op, do.slice(MAIN, TAIL, dim=1), dv_t, is_async=True)
            if PREFETCH:
                # step t+1's scores; on the last step a discarded product of this stage's (still valid) tiles
                nxt = (t + 1) % STAGES
                if t + 1 < total:
                    mbarrier.wait(ready.index(nxt), ((t + 1) // STAGES) % 2)
                    if VARLEN == PACKED_USED:  # step t + 1's first query: the next block's, or the next head's lo
                        next_m = start_m + BLOCK_M
                        if mb + 1 == n_mblocks:
                            next_m = lo
                        clear_step(q_smem, do_smem, nxt, next_m, seqlen_q, BLOCK_M, HEAD_DIM)
                else:
                    nxt = stage
                q_next = q_smem.index(nxt).reshape([BLOCK_M, HEAD_DIM])
                st_tok = issue_over_d(k_step, q_next, st_zero, D_COLS)
                # in issue order dP^T, dV, S^T_{t+1}: the first is done
                dpt = warpgroup_mma_wait(2 * N_G, deps=[dpt_tok])
            elif TAIL == 0:  # dV's product done as well: P^T's operand registers free before dS is formed
                dpt, dv, p_op = warpgroup_mma_wait(0, deps=[dpt_tok, dv_tok, p_op])
            else:
                dpt, dv, dv_t, p_op = warpgroup_mma_wait(0, deps=[dpt_tok, dv_tok, dv_t_tok, p_op])
            if not PREFETCH:  # loaded where it is used: ptxas spills less (at 32 queries the split ran 3% slower)
                delta = row_terms.slice(BLOCK_M, BLOCK_M).load(query_layout)
            ds = p * (dpt - delta[None, :])
            if VARLEN == PACKED_USED:  # rows outside the used ones may bring NaN in delta: P is 0 there, 0 * NaN not
                ds = gl.where(p == 0.0, 0.0, ds)  # (p is live here; q_ok kept this far made ptxas spill more)
            ds_op = gl.convert_layout(ds.to(dtype), op_layout)
            if TAIL == 0:
                dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
            else:
                dk_tok = warpgroup_mma(ds_op, q.slice(0, MAIN, dim=1), dk, is_async=True)
                dk_t_tok = warpgroup_mma(ds_op, q.slice(MAIN, TAIL, dim=1), dk_t, is_async=True)
            if CONSUMER_DQ:
                # this half of dS beside the other consumer's (queries as rows), then step t - 1's dQ: its other
                # half was stored a step ago, so the consumers rarely wait for each other (at step t they did)
                buf = t % SLOTS
                # both consumers' products of step t - SLOTS done (a fresh barrier counts as free)
                mbarrier.wait(ds_free.index(buf), (t // SLOTS) % 2 ^ 1)
                ds_smem.index(2 * buf + half).reshape([BLOCK_M, _HALF_N]).store(gl.permute(ds.to(dtype), (1, 0)))
                fence_async_shared()
                partition_arrive(ds_ready, buf)
                if t > 0:
                    consumer_dq_step(t - 1, half, k_smem, ds_smem, ds_ready, ds_free, dq_smem, dq_bars, dqt_zero,
                                     softmax_scale, SLOTS, HEAD_DIM, kv_zero)
                if TAIL == 0:
                    dk, ds_op = warpgroup_mma_wait(0, deps=[dk_tok, ds_op])
                else:
                    dk, dk_t, ds_op = warpgroup_mma_wait(0, deps=[dk_tok, dk_t_tok, ds_op])
            elif FUSED_DQ:  # under the dK product: this half of dS into the ring, queries as rows, once its slot's free
                slot = t % SLOTS
                mbarrier.wait(ds_free.index(slot), (t // SLOTS) % 2 ^ 1)  # a fresh barrier counts as free
                ring = ds_smem.index(half * SLOTS + slot).reshape([BLOCK_M, _HALF_N])
                ring.store(gl.permute(ds.to(dtype), (1, 0)))
                fence_async_shared()
                partition_arrive(ds_ready, slot)  # every warp's part stored
            if PREFETCH:  # (without it dV was waited before dS, and dK above)
                if TAIL == 0:
                    dv, st, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, st_tok, dk_tok, p_op, ds_op])
                else:
                    dv, dv_t, st, dk, dk_t, p_op, ds_op = warpgroup_mma_wait(
                        0, deps=[dv_tok, dv_t_tok, st_tok, dk_tok, dk_t_tok, p_op, ds_op])
            mbarrier.arrive(empty.index(stage))
            t += 1

    if CONSUMER_DQ:  # the last step's dQ
        if total > 0:
            consumer_dq_step(total - 1, half, k_smem, ds_smem, ds_ready, ds_free, dq_smem, dq_bars, dqt_zero,
                             softmax_scale, SLOTS, HEAD_DIM)
    if TAIL == 0:  # (the store helper's tail arguments, never read)
        dk_t = dk
        dv_t = dv
    if PARTIAL_DKV:
        # this program's share of the group's sums, float32, into its split's slice of the partials (rows of
        # H_kv * D), which the host adds in a fixed order; 32-byte row segments per warp store
        rows = row0 + gl.arange(0, _HALF_N, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, MAIN, layout=gl.SliceLayout(0, acc_layout))
        dst = DKVPart + part_base + rows.to(gl.int64)[:, None] * part_row + cols[None, :]
        keep = (rows < seqlen_k)[:, None]
        gl.store(dst, dk * softmax_scale, mask=keep)
        gl.store(dst + part_dv, dv, mask=keep)
        if TAIL > 0:  # columns past 64 + TAIL stay unwritten: the host keeps the first D
            rows_t = row0 + gl.arange(0, _HALF_N, layout=gl.SliceLayout(1, tail_layout))
            cols_t = MAIN + gl.arange(0, TAIL, layout=gl.SliceLayout(0, tail_layout))
            dst_t = DKVPart + part_base + rows_t.to(gl.int64)[:, None] * part_row + cols_t[None, :]
            keep_t = (rows_t < seqlen_k)[:, None]
            gl.store(dst_t, dk_t * softmax_scale, mask=keep_t)
            gl.store(dst_t + part_dv, dv_t, mask=keep_t)
    elif VARLEN:
        n_keys = cap_k - row0  # (past the used keys: zeros, as every gradient term there is 0)
        if n_keys >= _HALF_N:  # keys wholly inside the sequence: the copy engine's stores, as dense
            store_dkdv(k, v, k3, v3, dk, dv, dk_t, dv_t, dk_desc, dv_desc, 0, k_off + row0, kv_h, softmax_scale,
                       ds_free, dq_bars, total, SLOTS, CONSUMER_DQ, FUSED_DQ, MAIN, TAIL)
        else:  # the sequence's last keys, from registers: a box would overwrite the next sequence's rows
            store_rows(DK, (dk * softmax_scale).to(dtype), k_off + row0, n_keys, kv_h, stride_dks, stride_dkh, 0,
                       head_dim, acc_layout)
            store_rows(DV, dv.to(dtype), k_off + row0, n_keys, kv_h, stride_dvs, stride_dvh, 0, head_dim, acc_layout)
            if TAIL > 0:
                store_rows(DK, (dk_t * softmax_scale).to(dtype), k_off + row0, n_keys, kv_h, stride_dks, stride_dkh,
                           MAIN, head_dim, tail_layout)
                store_rows(DV, dv_t.to(dtype), k_off + row0, n_keys, kv_h, stride_dvs, stride_dvh, MAIN, head_dim,
                           tail_layout)
    else:
        store_dkdv(k, v, k3, v3, dk, dv, dk_t, dv_t, dk_desc, dv_desc, b, row0, kv_h, softmax_scale, ds_free,
                   dq_bars, total, SLOTS, CONSUMER_DQ, FUSED_DQ, MAIN, TAIL)


@gluon.jit
def _hopper_bwd_dkdv_kernel(
    k_desc, v_desc, q_desc, do_desc, dos_desc, dk_desc, dv_desc, dq_desc, bias_desc, dbias_desc, stats_desc, Slopes,
    Bias, DKVPart, stride_slb, stride_slh, stride_bb, stride_bh, stride_bk, bias_b_on, bias_h_on,
    n_kv, n_groups, n_splits, n_rows, rows_per_group, seqlen_q, seqlen_k, qk_scale2, softmax_scale,
    DK, DV, CuSeqQ, CuSeqK, EndSeqQ, EndSeqK, CuKTiles, DQSync, Norms, SoftBlocks, stride_dks, stride_dkh, stride_dvs,
    stride_dvh, n_seq, head_dim, zero,
    IS_CAUSAL: gl.constexpr, ALIBI: gl.constexpr, HEAD_DIM: gl.constexpr, BIAS_ROW: gl.constexpr,
    FUSED_DQ: gl.constexpr, PARTIAL_DKV: gl.constexpr, BLOCK_M: gl.constexpr, BIAS_FULL: gl.constexpr,
    STORE_DS: gl.constexpr, TAIL: gl.constexpr = 0, VARLEN: gl.constexpr = False, FIRST_WRITE: gl.constexpr = False,
    REACH: gl.constexpr = False, SOFT_BLOCKS: gl.constexpr = False, KV_IN_STEP: gl.constexpr = False,
    PDL: gl.constexpr = False,
):
    """Program: (key block of 128, row = (batch, KV head, split)), ``n_rows`` rows, in ``tile_order``: the
    key blocks of a group of ``rows_per_group`` rows interleaved, first (longest, when causal) first, so that
    the grid's last programs are short ones. Launched with num_warps=4. Descriptors as in
    the forward: (B, S, H, D) with their strides, boxes [1, 64 or BLOCK_M, 1, HEAD_DIM] (the tile width:
    columns past D read as zeros, dropped on stores); ``dq_desc`` (``FUSED_DQ``) a float32 (B, S_q, H, D)
    buffer, boxes [1, BLOCK_M, 1, 32], 128-byte swizzled. A program takes the ``n_groups / n_splits`` query
    heads of its split; with ``PARTIAL_DKV`` (more than one split) it writes its float32 dK, dV sums into
    ``DKVPart``, (2, n_splits, B, S_k, H_kv, HEAD_DIM), instead of dK and dV.
    ``BIAS_FULL`` (with ``FUSED_DQ``): a bias matrix in q's dtype through ``bias_desc``, a (B' * H', S_q, S_k)
    view with boxes [1, BLOCK_M, 64], row ``b * bias_b_on + h * bias_h_on`` (the host's multipliers: 0
    where it broadcasts); ``STORE_DS``: its gradient dS stored through ``dbias_desc``, (B * H, S_q, S_k).
    ``VARLEN`` (with ``FUSED_DQ``, one split, no bias): packed sequences, the descriptors over (1, T, H, D) views,
    programs over each sequence's key blocks (``CuKTiles``: cumulative counts of 128-key blocks, ``n_seq``
    sequences; each one's rows up to ``EndSeqQ[b]``, ``EndSeqK[b]``, with ``PACKED_USED`` its used rows only, its key
    blocks still covering every row: those wholly past the used keys take no step and store zeros) in
    ``hopper_tiles.packed_tile``'s order, ``rows_per_group`` KV heads innermost (the grid may run past the last:
    those programs have no keys and no queries), the row terms (H, 2, T_q), a sequence's last keys'
    dK and dV stored into ``DK``, ``DV`` by plain stores. ``FIRST_WRITE`` (dense, where the consumers form dQ): the
    dQ sums unzeroed, each 64-query block's first program storing into it (``hopper_dq``; ``DQSync`` the blocks'
    (B, H, S_q / 64) int32 words, zeroed). ``REACH`` (dense, causal ALiBi from slopes or a bias row; with or without
    ``FIRST_WRITE``): each key block visits only the query blocks within its heads' reach (``reach.py``; ``Norms``:
    the heads' q then k norm maxima, float32 bit patterns, (B * H) + (B * H_kv); with ``REACH_ROW`` then the bias
    row's table, (B, H, key blocks) query ends; with ``REACH_TABLE`` ``Norms`` is the forward's table instead,
    (B, H, cdiv(S_q, 64)) first key blocks). ``SOFT_BLOCKS`` (a bias that may soft-mask whole rows; dense): the
    loader reads a 64-query block's dO through ``dos_desc`` (the delta kernel's scaled copy) where its word in
    ``SoftBlocks``, (B, H, cdiv(S_q, 64)) int32, is 1. ``zero`` is 0: with ``KV_IN_STEP`` (``gluon_compat``),
    where the consumers form dQ, they index K's and V's tiles with ``half + t * zero``, which the compiler cannot
    fold, so that the tiles' 24 operand descriptors are formed in each step. Formed once before the loop, Triton
    3.7's code (and, compiled, 3.8's and 3.9's) keeps them in vector registers, where ptxas spills them: 12% slower
    than under 3.6 (benchmarks/NOTES.md session 54). ``PDL`` (``FUSED_DQ``, dense, no ``REACH`` but the forward's
    table, written before the delta kernel started): launched as the
    delta kernel's programmatic dependent (``hopper.PDL``), so a program may start before that kernel has finished:
    the loader issues K's and V's loads, then waits for it (``wait_prior_grid``) before the first row terms (and
    dO's scaled blocks), the dQ partition before its first dQ sums or sync word; nothing else here reads what that
    kernel writes."""
    dtype: gl.constexpr = q_desc.dtype
    STAGES: gl.constexpr = bwd_stages(BLOCK_M, BIAS_FULL)
    SLOTS: gl.constexpr = ds_slots(BLOCK_M, HEAD_DIM)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    # bias matrix, its gradient and the zero tile: (B' * H', S_q, S_k) boxes
    mat_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    if PDL:
        gl.static_assert(FUSED_DQ and not VARLEN and (not REACH or REACH == KERNEL_REACH_TABLE),
                         "the dK/dV kernel waits for the delta kernel late")

    if VARLEN:
        total_kb = gl.load(CuKTiles + n_seq)
        kv_h, r = packed_tile(gl.program_id(0), total_kb, rows_per_group)
        b = sequence_of(r, n_seq, CuKTiles)
        start_n = (r - gl.load(CuKTiles + b)) * 2 * _HALF_N
        q_off = gl.load(CuSeqQ + b)
        seqlen_q = gl.load(EndSeqQ + b) - q_off
        k_off = gl.load(CuSeqK + b)
        seqlen_k = gl.load(EndSeqK + b) - k_off
        cap_k = seqlen_k  # the sequence's keys, used or not: PACKED_USED's blocks cover them all
        if VARLEN == PACKED_USED:
            cap_k = gl.load(CuSeqK + b + 1) - k_off
        if kv_h >= n_kv:  # past the grid's last key block
            kv_h = 0
            seqlen_q = 0
            seqlen_k = 0
            cap_k = 0
        split = 0
        tb = 0  # the descriptors' batch coordinate in the (1, T, H, D) views
    else:
        n_kb = gl.cdiv(seqlen_k, 2 * _HALF_N)
        last_kb, row = tile_order(gl.program_id(0), n_kb, n_rows, rows_per_group)
        start_n = (n_kb - 1 - last_kb) * 2 * _HALF_N
        split = row % n_splits
        bkv = row // n_splits
        b = bkv // n_kv
        kv_h = bkv % n_kv
        q_off = 0
        k_off = 0
        cap_k = seqlen_k
        tb = b
    b64 = b.to(gl.int64)
    n_g = n_groups // n_splits  # this program's query heads: h0, h0 + 1, ...
    h0 = kv_h * n_groups + split * n_g
    if PARTIAL_DKV:
        part_row = n_kv * HEAD_DIM
        batch = n_rows // (n_splits * n_kv)
        part_base = (split * batch + b).to(gl.int64) * seqlen_k * part_row + kv_h * HEAD_DIM
        part_dv = gl.to_tensor(n_rows).to(gl.int64) * seqlen_k * HEAD_DIM  # n_splits * B * H_kv rows of S_k * D
    else:  # constants: no registers for them in the consumers
        part_row = 0
        part_base = 0
        part_dv = 0
    lo = 0
    if IS_CAUSAL:  # queries i with i + diag >= start_n are the first to see this block
        lo = gl.maximum(start_n - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    q_end = seqlen_q
    if REACH:
        batch = n_rows // (n_splits * n_kv)  # (packed sequences: 1, one row of norm maxima, reach.norm_row)
        if REACH == KERNEL_REACH_ROW:  # the table past the norm maxima
            q_end = row_reach_query_end(Norms + batch * n_kv * (n_groups + 1), b, h0, n_g, n_kv * n_groups,
                                        start_n // (2 * _HALF_N), gl.cdiv(seqlen_k, 2 * _HALF_N))
        elif REACH == KERNEL_REACH_TABLE:  # (the forward's blocks are this kernel's: 128 keys from key 0)
            q_end = table_query_end(Norms, b, h0, n_g, n_kv * n_groups, start_n // (2 * _HALF_N), seqlen_q, 32)
        else:
            norm_b = b
            if VARLEN:
                norm_b = 0
            q_end = reach_query_end(Norms, Slopes, stride_slb, stride_slh, b, norm_b, h0, n_g, kv_h, n_kv * n_groups,
                                    n_kv, batch, start_n + 2 * _HALF_N - 1, seqlen_k - seqlen_q, seqlen_q, qk_scale2)
        if not VARLEN:
            # at least one step: the consumers wait for the first stage unconditionally (with a cache longer than the
            # reach, S_k - S_q past it, no query reaches the first key blocks: one step of zero probabilities); a
            # packed program may have none
            q_end = gl.maximum(q_end, lo + 1)
    if SOFT_BLOCKS:  # the delta kernel's word per SOFT_BLOCK_ROWS queries
        gl.static_assert(not VARLEN and BLOCK_M <= SOFT_BLOCK_ROWS, "a step's queries within one flagged block")
    if VARLEN and lo < seqlen_q:
        # the row terms' boxes run along their innermost dimension, where the copy engine takes only 16-byte
        # aligned starts (others raised an illegal instruction on an H200): query blocks start on a packed row
        # that is a multiple of 4, the rows before the sequence's first masked like those past its last
        lo = lo - q_off % 4
    if VARLEN == PACKED_USED:
        if start_n >= seqlen_k:  # a block wholly past the used keys: no step, its dK, dV stored as zeros
            q_end = lo

    k_smem = gl.allocate_shared_memory(dtype, [2, 1, _HALF_N, 1, HEAD_DIM], tile_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, _HALF_N, 1, HEAD_DIM], tile_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_DIM], tile_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_DIM], tile_layout)
    stats_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 2, BLOCK_M], stats_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup

    if FUSED_DQ:
        if consumers_dq(BLOCK_M, HEAD_DIM):
            # the consumers form dQ: dS halves [slot, half]; each consumer's [2 tiles of 32 columns] of float32 dQ
            # staged for the writer's bulk reductions
            bias_smem = q_smem  # never read (a bias matrix takes the dQ warpgroup)
            ds_smem = gl.allocate_shared_memory(dtype, [2 * SLOTS, 1, BLOCK_M, _HALF_N], mat_layout)
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, DQ_CHUNK // DQ_COLS, DQ_ROWS, DQ_COLS], DQ_TILE_LAYOUT)
            ds_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], bar_layout)
            ds_free = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], bar_layout)
            for i in gl.static_range(SLOTS):
                mbarrier.init(ds_ready.index(i), count=2)  # one arrival per consumer warpgroup
                mbarrier.init(ds_free.index(i), count=2)
            dq_bars = gl.allocate_shared_memory(gl.int64, [4, 1], bar_layout)
            for i in gl.static_range(4):
                mbarrier.init(dq_bars.index(i), count=1)
            zero_smem = ds_smem  # never read
        else:
            # [half, slot]: queries as rows, keys contiguous (the bias gradient's layout, stored from here); a half's
            # adjacent slots form one [DQ_ROWS, 64] tile (the swizzle repeats every 8 rows)
            ds_smem = gl.allocate_shared_memory(dtype, [2 * SLOTS, 1, BLOCK_M, _HALF_N], mat_layout)
            zero_smem = ds_smem  # never read
            if STORE_DS and IS_CAUSAL:  # a zero tile for the skipped tiles of the bias gradient
                zero_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, _HALF_N], mat_layout)
            if BIAS_FULL:  # [stage, half]
                bias_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, 1, BLOCK_M, _HALF_N], mat_layout)
            else:
                bias_smem = q_smem  # never read
            # [chunk, tile]: each DQ_CHUNK-column chunk of dQ as DQ_COLS-column tiles, 128-byte swizzled
            dq_smem = gl.allocate_shared_memory(gl.float32,
                                                [HEAD_DIM // DQ_CHUNK, DQ_CHUNK // DQ_COLS, DQ_ROWS, DQ_COLS],
                                                DQ_TILE_LAYOUT)
            ds_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], bar_layout)
            ds_free = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], bar_layout)
            dq_bars = gl.allocate_shared_memory(gl.int64, [1], bar_layout)  # the dQ warpgroup done with K
            mbarrier.init(dq_bars, count=1)
            for i in gl.static_range(SLOTS):
                mbarrier.init(ds_ready.index(i), count=2)  # one arrival per consumer warpgroup
                mbarrier.init(ds_free.index(i), count=1)
        gl.warp_specialize(
            [
                (_bwd_consumer_partition, (0, k_smem, v_smem, q_smem, do_smem, bias_smem, kv_bar, ready, empty,
                                           dk_desc, dv_desc, ds_smem, ds_ready, ds_free, dq_bars, dq_smem, dq_desc,
                                           stats_smem, Slopes, Bias, DKVPart, part_base, part_dv, part_row, b64, b,
                                           kv_h, h0, n_g, start_n, lo, stride_slb, stride_slh,
                                           stride_bb, stride_bh, stride_bk, bias_b_on, bias_h_on, seqlen_q, seqlen_k,
                                           qk_scale2, softmax_scale, DK, DV, k_off, cap_k, stride_dks, stride_dkh,
                                           stride_dvs, stride_dvh, head_dim, q_end, zero, IS_CAUSAL, ALIBI, HEAD_DIM,
                                           BIAS_ROW, FUSED_DQ, PARTIAL_DKV, BLOCK_M, BIAS_FULL, TAIL, VARLEN,
                                           KV_IN_STEP)),
                (_bwd_consumer_partition, (1, k_smem, v_smem, q_smem, do_smem, bias_smem, kv_bar, ready, empty,
                                           dk_desc, dv_desc, ds_smem, ds_ready, ds_free, dq_bars, dq_smem, dq_desc,
                                           stats_smem, Slopes, Bias, DKVPart, part_base, part_dv, part_row, b64, b,
                                           kv_h, h0, n_g, start_n, lo, stride_slb, stride_slh,
                                           stride_bb, stride_bh, stride_bk, bias_b_on, bias_h_on, seqlen_q, seqlen_k,
                                           qk_scale2, softmax_scale, DK, DV, k_off, cap_k, stride_dks, stride_dkh,
                                           stride_dvs, stride_dvh, head_dim, q_end, zero, IS_CAUSAL, ALIBI, HEAD_DIM,
                                           BIAS_ROW, FUSED_DQ, PARTIAL_DKV, BLOCK_M, BIAS_FULL, TAIL, VARLEN,
                                           KV_IN_STEP)),
                (backward_loader, (k_desc, v_desc, q_desc, do_desc, bias_desc, stats_desc, k_smem, v_smem, q_smem,
                                       do_smem, bias_smem, stats_smem, kv_bar, ready, empty, tb, kv_h, h0, n_g,
                                       n_kv * n_groups, start_n, lo, q_end, bias_b_on, bias_h_on, q_off, k_off,
                                       dos_desc, SoftBlocks, seqlen_q, HEAD_DIM, BLOCK_M, BIAS_FULL, SOFT_BLOCKS,
                                       PDL)),
                (dq_partition, (k_smem, ds_smem, zero_smem, dq_smem, kv_bar, ds_ready, ds_free, dq_bars, dq_desc,
                                dbias_desc, DQSync, tb, h0, n_g, n_kv * n_groups, start_n, lo, q_end, seqlen_q,
                                softmax_scale, q_off, HEAD_DIM, BLOCK_M, STORE_DS, IS_CAUSAL, FIRST_WRITE, PDL)),
            ],
            [4, 1, dq_warps(BLOCK_M, HEAD_DIM)],
            [fused_regs(BLOCK_M, HEAD_DIM, 0), 24, fused_regs(BLOCK_M, HEAD_DIM, 1)],
        )
    else:  # the ring's arguments are never read: any of the right kinds will do
        bias_smem = q_smem
        gl.warp_specialize(
            [
                (_bwd_consumer_partition, (0, k_smem, v_smem, q_smem, do_smem, bias_smem, kv_bar, ready, empty,
                                           dk_desc, dv_desc, q_smem, ready, empty, kv_bar, q_smem, dq_desc,
                                           stats_smem, Slopes, Bias, DKVPart, part_base, part_dv, part_row, b64, b,
                                           kv_h, h0, n_g, start_n, lo, stride_slb, stride_slh,
                                           stride_bb, stride_bh, stride_bk, bias_b_on, bias_h_on, seqlen_q, seqlen_k,
                                           qk_scale2, softmax_scale, DK, DV, k_off, cap_k, stride_dks, stride_dkh,
                                           stride_dvs, stride_dvh, head_dim, q_end, zero, IS_CAUSAL, ALIBI, HEAD_DIM,
                                           BIAS_ROW, FUSED_DQ, PARTIAL_DKV, BLOCK_M, BIAS_FULL, TAIL, VARLEN,
                                           KV_IN_STEP)),
                (_bwd_consumer_partition, (1, k_smem, v_smem, q_smem, do_smem, bias_smem, kv_bar, ready, empty,
                                           dk_desc, dv_desc, q_smem, ready, empty, kv_bar, q_smem, dq_desc,
                                           stats_smem, Slopes, Bias, DKVPart, part_base, part_dv, part_row, b64, b,
                                           kv_h, h0, n_g, start_n, lo, stride_slb, stride_slh,
                                           stride_bb, stride_bh, stride_bk, bias_b_on, bias_h_on, seqlen_q, seqlen_k,
                                           qk_scale2, softmax_scale, DK, DV, k_off, cap_k, stride_dks, stride_dkh,
                                           stride_dvs, stride_dvh, head_dim, q_end, zero, IS_CAUSAL, ALIBI, HEAD_DIM,
                                           BIAS_ROW, FUSED_DQ, PARTIAL_DKV, BLOCK_M, BIAS_FULL, TAIL, VARLEN,
                                           KV_IN_STEP)),
                (backward_loader, (k_desc, v_desc, q_desc, do_desc, bias_desc, stats_desc, k_smem, v_smem, q_smem,
                                       do_smem, bias_smem, stats_smem, kv_bar, ready, empty, tb, kv_h, h0, n_g,
                                       n_kv * n_groups, start_n, lo, q_end, bias_b_on, bias_h_on, q_off, k_off,
                                       dos_desc, SoftBlocks, seqlen_q, HEAD_DIM, BLOCK_M, BIAS_FULL, SOFT_BLOCKS,
                                       PDL)),
            ],
            [4, 1], [240, 24],
        )
