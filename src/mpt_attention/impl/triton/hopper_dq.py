"""The Hopper backward's dQ (``hopper_backward.py``'s kernel with ``FUSED_DQ``): the dQ warpgroup, or where the
consumers form dQ themselves the one-warp writer of their reductions; the staging layout and the bulk tensor
reductions both use. dQ^T = K^T dS^T is formed transposed (D as the ``wgmma`` M dimension: K^T and dS^T come
from shared memory as they lie) and added into a float32 (B, S_q, H, D) buffer by ``cp.reduce.async.bulk.tensor``
of [BLOCK_M, DQ_COLS] boxes, in any order (the host converts it to dQ).

Where the consumers form dQ (``FIRST_WRITE``, dense inputs) the buffer is not zeroed beforehand: the first program
to reach a 64-query block stores its part there and the others add theirs after it. Each block has an int32 word
in ``DQSync`` (zeroed by the delta kernel): the writer takes a ticket from it (``_claim_block``) once its step's
first half is staged; ticket 0 stores with the copy engine and, once the stores have completed, sets the word's
ready bit (``_publish_block``); any other ticket waits for that bit before its reductions. The first program
holds its data when it takes the ticket, so it depends on no other program (no cycle of waits) and the others
wait at most for its stores. This spares the zero fill of the float32 buffer (the delta kernel 0.070 -> 0.039 ms
at B8 H16 S2048 D128) for 1.5% more in the dK/dV kernel: the backward 1.013-1.053x (benchmarks/NOTES.md session
30). Tickets taken at the step's start (before the data) made later programs wait up to a step: the kernel +6%.
"""

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from mpt_attention.impl.triton.gluon_compat import partition_arrive, partition_barrier, smem_reinterpret, tma_store
from mpt_attention.impl.triton.gluon_compat import wait_prior_grid

HALF_N = gl.constexpr(64)  # keys per consumer warpgroup
# fused dQ: the dQ warpgroup forms dQ^T = K^T dS^T for DQ_ROWS queries at once (two steps at 32 queries per step,
# one at 64), D in chunks of DQ_CHUNK columns (a [64, 64] float32 accumulator: 32 registers), each staged as tiles of
# DQ_COLS float32 columns, one 128-byte swizzled row (the copy engine's widest swizzle span; also the dQ buffer
# descriptor's box width, hopper_dkdv.backward_dkdv)
DQ_ROWS = gl.constexpr(64)
DQ_CHUNK = gl.constexpr(64)
DQ_COLS = gl.constexpr(32)
DQ_TILE_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=3))


@gluon.constexpr_function
def consumers_dq(block_m, head_dim):
    """64 queries per step at tile width 128 (with the dQ sums only, hopper_dkdv.bwd_block_m): FA3's structure. There
    is no dQ warpgroup: the two consumers (240 registers each) form dQ themselves from both halves of a step's dS,
    a step late (``consumer_dq_step``), and stage it for ``dq_writer_partition``; step t+1's S^T is not issued
    ahead (its 32 registers do not fit beside dK, dV, dP^T and P)."""
    return block_m == 64 and head_dim == 128


@gluon.constexpr_function
def ds_slots(block_m, head_dim):
    """Fused dQ: steps of dS the consumers may run ahead of the dQ warpgroup (even: a product takes two at 32
    queries per step). 6 there: with 4 the consumers could run only a step or two ahead of a product's start;
    the backward at B2 H16 S8192 D128 2.782 ms with 4, 2.765 with 6, 2.724 with 8 (benchmarks/NOTES.md session
    22; 8 does not fit beside a bias matrix)."""
    if consumers_dq(block_m, head_dim):  # a pair of dS halves per step, double-buffered
        return 2
    return 6 if block_m == 32 else 4


@gluon.constexpr_function
def dqt_layout():
    """The dQ warpgroup's accumulator: a [DQ_CHUNK columns of D, DQ_ROWS queries] chunk of dQ^T."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DQ_ROWS, 16])


@gluon.jit
def dq_chunk_tiles(dqt):
    """A [DQ_CHUNK, DQ_ROWS] chunk of dQ^T as its staging tiles, [DQ_CHUNK // DQ_COLS, DQ_ROWS, DQ_COLS] (queries
    as rows: dQ's layout). Stored into ``DQ_TILE_LAYOUT`` tiles without bank conflicts (tools/compile_kernels.py
    checks it; dQ itself from an m64n64 product, queries as its rows, would not be: each phase of its 8-byte
    stores puts two rows' 32 bytes on the same banks of the 128-byte swizzle)."""
    dq = gl.permute(dqt, (1, 0))  # [DQ_ROWS, DQ_CHUNK]
    return gl.permute(gl.reshape(dq, [DQ_ROWS, DQ_CHUNK // DQ_COLS, DQ_COLS]), (1, 0, 2))


def _lane0_asm(access):
    """PTX for one warp: lane 0 runs ``access`` (a memory instruction on the word at ``$1``, its old value into
    ``old``), the warp gets ``old`` by a shuffle into ``$0``."""
    return ("{\n\t.reg .pred p;\n\t.reg .b32 lane, old;\n\tmov.u32 lane, %laneid;\n\tsetp.eq.u32 p, lane, 0;\n\t"
            f"mov.u32 old, 0;\n\t@p {access};\n\tshfl.sync.idx.b32 $0, old, 0, 0x1f, 0xffffffff;\n\t}}")


_READY = gl.constexpr(1 << 30)  # a DQSync word: the first program's stores have completed
_TICKETS = gl.constexpr((1 << 30) - 1)  # the tickets taken
# One warp's access to a DQSync word, as PTX: lane 0 reads or adds, the warp gets the old value by a shuffle.
# (Gluon's scalar atomics broadcast their result through shared memory and a barrier.) The ticket is relaxed and
# a later ticket acquires with a load (LDG.STRONG + CCTL.IVALL in SASS): an acq_rel atomic or fence is MEMBAR.GPU
# with ERRBAR, which waits for the warp's bulk reductions still in flight; on every step that cost the dK/dV
# kernel 7-10% (benchmarks/NOTES.md session 30).
_WARP_ADD = gl.constexpr(_lane0_asm("atom.relaxed.gpu.global.add.u32 old, [$1], $2"))
_WARP_ACQUIRE = gl.constexpr(_lane0_asm("ld.acquire.gpu.global.u32 old, [$1]"))
# the warp's generic accesses (the acquire) ordered before its later bulk copies (the async proxy)
_PROXY_FENCE = gl.constexpr("fence.proxy.async.global;\n\tmov.b32 $0, $1;")
# the warp's bulk copies complete (their writes, not only their reads: tma.store_wait is the .read form) and
# ordered before its generic accesses; every lane's before lane 0's release of the word's ready bit
_WARP_PUBLISH = gl.constexpr("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tbar.warp.sync 0xffffffff;"
                             "\n\t" + _lane0_asm("atom.release.gpu.global.add.u32 old, [$1], $2"))


@gluon.jit
def _claim_block(sync):
    """One warp takes a ticket for a 64-query block of the dQ sums (its ``DQSync`` word at ``sync``): True for the
    first, which stores; any other returns once the first's stores have completed (acquired), ready to add."""
    addr = sync.to(gl.int64, bitcast=True)
    old = gl.inline_asm_elementwise(_WARP_ADD, "=r,l,r", [addr, 1], dtype=gl.int32, is_pure=False, pack=1)
    first = (old & _TICKETS) == 0
    if not first:
        old = 0  # the ticket's read is relaxed: the bit counts once an acquiring load has seen it
        while (old & _READY) == 0:
            old = gl.inline_asm_elementwise(_WARP_ACQUIRE, "=r,l", [addr], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise(_PROXY_FENCE, "=r,r", [old], dtype=gl.int32, is_pure=False, pack=1)
    return first


@gluon.jit
def _publish_block(sync):
    """One warp, the block's first program, right after its stores into the block: once they have completed,
    let the others add theirs (release)."""
    addr = sync.to(gl.int64, bitcast=True)
    gl.inline_asm_elementwise(_WARP_PUBLISH, "=r,l,r", [addr, _READY], dtype=gl.int32, is_pure=False, pack=1)


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared tile ``src`` into global memory at ``coord`` (``cp.reduce.async.bulk.tensor``,
    completion tracked like a bulk store: ``tma.store_wait``). Gluon's builder has the op in Triton 3.6
    and 3.7; its Python layer does not expose it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def step_origin(step, lo, n_mblocks, BLOCK_M: gl.constexpr):
    """A program's step as (query head of the program's group, first query row): query blocks from ``lo``, head
    after head, as the loader runs them."""
    g = step // n_mblocks
    return g, lo + (step - g * n_mblocks) * BLOCK_M


@gluon.constexpr_function
def _staging_pending(dc, steps, pair, n_chunks, tiles, ds_boxes):
    """Bulk groups the dQ warpgroup may leave in flight before it stores chunk ``dc`` of a product of ``steps``
    steps into that chunk's staging tiles: those issued after the previous product's reductions from the same
    tiles (its later chunks, whole: only a program's last product can be short; this product's bias-gradient
    stores and its earlier chunks). Before the last chunk with a bias gradient, none issued before this product's
    own bias-gradient stores either, since the ring slots they read are released there. Bulk groups complete
    in issue order."""
    if ds_boxes and dc == n_chunks - 1:
        return dc * tiles * steps
    return (n_chunks - 1 - dc) * tiles * pair + (ds_boxes + dc * tiles) * steps


@gluon.jit
def dq_warpgroup_partition(k_smem, ds_smem, zero_smem, dq_smem, kv_bar, ds_ready, ds_free, dq_done, dq_desc,
                           dbias_desc, b, h0, n_g, n_heads, start_n, lo, seqlen_q, softmax_scale, q_off,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STORE_DS: gl.constexpr,
                           IS_CAUSAL: gl.constexpr):
    """One warpgroup (``FUSED_DQ``): dQ^T = K^T dS^T over the program's 128 keys for ``DQ_ROWS`` queries at a time,
    D in chunks of ``DQ_CHUNK``, added into the float32 dQ buffer by bulk reductions of [BLOCK_M, DQ_COLS] boxes.
    At 32 queries per step a product takes two steps: a half's adjacent ring slots are one [64 queries, 64 keys]
    tile, read transposed as the B operand. Each step's rows go to its own head and queries (the two steps may
    belong to two heads); a program's odd last step runs the product on whatever the other slot holds and reduces
    only its own rows (the product's rows do not mix). The consumers never wait for it unless it falls
    ``ds_slots`` steps behind. ``STORE_DS``: dS is the bias gradient too (a full-shape bias in q's dtype),
    bulk-stored from the ring into ``dbias_desc``; causal, the tiles above the diagonal that the program skips are
    stored as zeros from ``zero_smem`` (no memset of the whole gradient before the kernel).

    Why two steps: one step's product, m64n32k16, reads 3 KB of shared operands per 16 tensor-core cycles, where
    the load/store pipe moves 128 bytes per cycle (it bound the kernel: ~80% busy, mostly with these operands,
    benchmarks/NOTES.md session 21); m64n64k16 reads 4 KB per 32 cycles."""
    PAIR: gl.constexpr = DQ_ROWS // BLOCK_M  # steps per product
    SLOTS: gl.constexpr = ds_slots(BLOCK_M, HEAD_DIM)
    N_CHUNKS: gl.constexpr = HEAD_DIM // DQ_CHUNK
    TILES: gl.constexpr = DQ_CHUNK // DQ_COLS  # staging tiles per chunk
    DS_BOXES: gl.constexpr = 2 if STORE_DS else 0  # bias-gradient stores per step (one per half)
    dqt_zero = gl.zeros([DQ_CHUNK, DQ_ROWS], gl.float32, dqt_layout())
    # the ring ([half * SLOTS + slot] of [BLOCK_M, 64]) seen as [half * SLOTS / PAIR + pair] of [DQ_ROWS, 64]
    pairs = smem_reinterpret(ds_smem, ds_smem.dtype, [2 * SLOTS // PAIR, 1, DQ_ROWS, HALF_N], ds_smem.layout)
    if STORE_DS and IS_CAUSAL:
        if lo > 0:  # queries [0, lo) see none of these keys; issued before the first step, drained by its wait
            fill: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            zero_smem.reshape([BLOCK_M, HALF_N]).store(gl.zeros([BLOCK_M, HALF_N], zero_smem.dtype, fill))
            fence_async_shared()
            partition_barrier()
            for g in range(n_g):
                for start_m in range(0, lo, BLOCK_M):
                    for half in gl.static_range(2):
                        tma_store(dbias_desc, [b * n_heads + h0 + g, start_m,
                                               start_n + half * HALF_N], zero_smem)
    mbarrier.wait(kv_bar, 0)
    n_mblocks = gl.cdiv(seqlen_q - lo, BLOCK_M)
    total = n_g * n_mblocks
    for t in range(0, total, PAIR):
        slot = t % SLOTS  # even with pairs: slots slot and slot + 1 hold steps t and t + 1
        steps = gl.minimum(total - t, PAIR)
        mbarrier.wait(ds_ready.index(slot), (t // SLOTS) % 2)
        if PAIR == 2:
            if steps == 2:
                mbarrier.wait(ds_ready.index(slot + 1), (t // SLOTS) % 2)
        if STORE_DS:
            for i in gl.static_range(PAIR):
                if i < steps:
                    g, start_m = step_origin(t + i, lo, n_mblocks, BLOCK_M)
                    for half in gl.static_range(2):
                        tma_store(dbias_desc, [b * n_heads + h0 + g, start_m,
                                               start_n + half * HALF_N],
                                  ds_smem.index(half * SLOTS + slot + i))
        for dc in gl.static_range(N_CHUNKS):
            ds0 = pairs.index(slot // PAIR).reshape([DQ_ROWS, HALF_N]).permute((1, 0))
            ds1 = pairs.index((SLOTS + slot) // PAIR).reshape([DQ_ROWS, HALF_N]).permute((1, 0))
            k0t = k_smem.index(0).reshape([HALF_N, HEAD_DIM]).slice(dc * DQ_CHUNK, DQ_CHUNK, dim=1).permute((1, 0))
            k1t = k_smem.index(1).reshape([HALF_N, HEAD_DIM]).slice(dc * DQ_CHUNK, DQ_CHUNK, dim=1).permute((1, 0))
            dqt = warpgroup_mma(k0t, ds0, dqt_zero, use_acc=False, is_async=True)
            dqt = warpgroup_mma(k1t, ds1, dqt, is_async=True)
            dqt = warpgroup_mma_wait(0, deps=[dqt])
            # the staging tiles (and, on the last chunk, the ring slots) free of earlier bulk groups' reads
            if steps == PAIR:
                tma.store_wait(_staging_pending(dc, PAIR, PAIR, N_CHUNKS, TILES, DS_BOXES))
            else:
                tma.store_wait(_staging_pending(dc, 1, PAIR, N_CHUNKS, TILES, DS_BOXES))
            partition_barrier()  # every warp's products done; the issuing thread's waits above hold the others
            if dc == N_CHUNKS - 1:
                for i in gl.static_range(PAIR):
                    if i < steps:
                        mbarrier.arrive(ds_free.index(slot + i))
            dq_smem.index(dc).store(dq_chunk_tiles(dqt * softmax_scale))
            fence_async_shared()
            partition_barrier()  # every warp's part of the tiles stored
            # the chunk's tiles as the descriptor's [1, BLOCK_M, 1, DQ_COLS] boxes (the same bytes and swizzle)
            boxes = smem_reinterpret(dq_smem.index(dc), gl.float32, [TILES * PAIR, 1, BLOCK_M, 1, DQ_COLS],
                                     dq_desc.layout)
            for i in gl.static_range(PAIR):
                if i < steps:
                    g, start_m = step_origin(t + i, lo, n_mblocks, BLOCK_M)
                    for ti in gl.static_range(TILES):
                        tma_reduce_add(dq_desc, [b, q_off + start_m, h0 + g, (dc * TILES + ti) * DQ_COLS],
                                       boxes.index(ti * PAIR + i))
    partition_arrive(dq_done)
    tma.store_wait(0)


@gluon.jit
def consumer_dq_step(u, half, k_smem, ds_smem, ds_ready, ds_free, dq_smem, dq_bars, dqt_zero, softmax_scale,
                     SLOTS: gl.constexpr, HEAD_DIM: gl.constexpr, zero=0):
    """A consumer's share of step ``u``'s dQ where the consumers form it (``consumers_dq``): once both halves of
    the step's dS are in slot ``u % SLOTS``, its 64 columns of dQ^T = K^T dS^T over all 128 keys, staged for
    ``dq_writer_partition`` once the writer has read its staging tiles of step ``u - 1``. Waits for every
    ``wgmma`` in flight (the caller's dK product too). ``zero``: 0, in the caller's unfoldable form (the dK/dV
    kernel's ``zero``), so that K's descriptors are formed here."""
    buf = u % SLOTS
    mbarrier.wait(ds_ready.index(buf), (u // SLOTS) % 2)  # both halves stored
    k0t = k_smem.index(zero).reshape([HALF_N, HEAD_DIM]).slice(half * DQ_CHUNK, DQ_CHUNK, dim=1)
    k1t = k_smem.index(zero + 1).reshape([HALF_N, HEAD_DIM]).slice(half * DQ_CHUNK, DQ_CHUNK, dim=1)
    ds0 = ds_smem.index(2 * buf).reshape([DQ_ROWS, HALF_N]).permute((1, 0))
    ds1 = ds_smem.index(2 * buf + 1).reshape([DQ_ROWS, HALF_N]).permute((1, 0))
    dqt = warpgroup_mma(k0t.permute((1, 0)), ds0, dqt_zero, use_acc=False, is_async=True)
    dqt = warpgroup_mma(k1t.permute((1, 0)), ds1, dqt, is_async=True)
    dqt = warpgroup_mma_wait(0, deps=[dqt])
    partition_arrive(ds_free, buf)  # every warp's reads of the two halves done
    mbarrier.wait(dq_bars.index(2 + half), u % 2 ^ 1)
    dq_smem.index(half).store(dq_chunk_tiles(dqt * softmax_scale))
    fence_async_shared()
    partition_arrive(dq_bars, half)


@gluon.jit
def dq_writer_partition(dq_desc, dq_smem, dq_bars, DQSync, b, h0, n_g, n_heads, lo, q_end, seqlen_q, q_off,
                        BLOCK_M: gl.constexpr, FIRST_WRITE: gl.constexpr):
    """One warp where the consumers form dQ (``consumers_dq``): each step's two staged halves of dQ (a consumer's
    64 columns each, ``dq_bars`` [full 0, full 1, empty 0, empty 1]) added into the float32 dQ sums by bulk
    tensor reductions, each half released once the copy engine has read it; with ``FIRST_WRITE`` stored instead
    by the block's first program (module docstring). Issued from the consumers, the reductions and the waits for
    their reads held them for 7-13% of their stall samples (benchmarks/NOTES.md session 24). Query blocks from ``lo``
    to ``q_end`` (less than ``seqlen_q`` past causal ALiBi's reach), their words among ``seqlen_q``'s."""
    TILES: gl.constexpr = DQ_CHUNK // DQ_COLS
    n_mblocks = gl.cdiv(q_end - lo, BLOCK_M)
    n_sync = gl.cdiv(seqlen_q, BLOCK_M)  # DQSync words per (batch, head): (B, H, n_sync), whatever the reach
    for t in range(n_g * n_mblocks):
        g, start_m = step_origin(t, lo, n_mblocks, BLOCK_M)
        first = False
        for half in gl.static_range(2):
            mbarrier.wait(dq_bars.index(half), t % 2)
            if FIRST_WRITE:
                if half == 0:  # claimed once the step's first half is staged: its first stores follow at once
                    sync = DQSync + ((b * n_heads + h0 + g) * n_sync + start_m // BLOCK_M)  # lo % 64 == 0 here
                    first = _claim_block(sync)
            boxes = smem_reinterpret(dq_smem.index(half), gl.float32, [TILES, 1, BLOCK_M, 1, DQ_COLS], dq_desc.layout)
            for ti in gl.static_range(TILES):
                coord = [b, q_off + start_m, h0 + g, (half * TILES + ti) * DQ_COLS]
                if first:
                    tma_store(dq_desc, coord, boxes.index(ti))
                else:
                    tma_reduce_add(dq_desc, coord, boxes.index(ti))
        tma.store_wait(TILES)  # bulk groups complete in issue order: the first half's are read
        partition_arrive(dq_bars, 2)  # (the issuing thread's wait holds the others)
        tma.store_wait(0)
        partition_arrive(dq_bars, 3)
        if FIRST_WRITE:
            if first:
                _publish_block(sync)


@gluon.jit
def dq_partition(k_smem, ds_smem, zero_smem, dq_smem, kv_bar, ds_ready, ds_free, dq_bars, dq_desc, dbias_desc, DQSync,
                 b, h0, n_g, n_heads, start_n, lo, q_end, seqlen_q, softmax_scale, q_off, HEAD_DIM: gl.constexpr,
                 BLOCK_M: gl.constexpr, STORE_DS: gl.constexpr, IS_CAUSAL: gl.constexpr, FIRST_WRITE: gl.constexpr,
                 WAIT: gl.constexpr = False):
    """The dK/dV kernel's dQ partition: the writer where the consumers form dQ (``consumers_dq``; ``FIRST_WRITE``
    there only), else the dQ warpgroup (``dq_bars`` its done barrier). ``b`` is the dQ sums' batch coordinate,
    ``q_off`` a packed sequence's first row (0 for dense inputs); query blocks from ``lo`` to ``q_end`` of
    ``seqlen_q``. ``WAIT``: the delta kernel, which zeroes the sums or the sync words, may still run
    (``hopper_backward``'s ``PDL``)."""
    if WAIT:
        wait_prior_grid()
    if consumers_dq(BLOCK_M, HEAD_DIM):
        dq_writer_partition(dq_desc, dq_smem, dq_bars, DQSync, b, h0, n_g, n_heads, lo, q_end, seqlen_q, q_off,
                            BLOCK_M, FIRST_WRITE)
    else:
        dq_warpgroup_partition(k_smem, ds_smem, zero_smem, dq_smem, kv_bar, ds_ready, ds_free, dq_bars, dq_desc,
                               dbias_desc, b, h0, n_g, n_heads, start_n, lo, q_end, softmax_scale, q_off, HEAD_DIM,
                               BLOCK_M, STORE_DS, IS_CAUSAL)


@gluon.constexpr_function
def fused_regs(block_m, head_dim, which):
    """Registers per thread with the dQ sums: ``which`` 0 the second consumer, 1 the dQ partition (the first
    consumer, the default partition, gets what the others leave of 64K; the loader's and the writer's warps
    count as a warpgroup of 24). Where the consumers form dQ: 240 each, the writer 24. With the dQ warpgroup,
    the fewest spills in the consumers' loops under Triton 3.6's ptxas beside its [64, 64] float32 accumulator:
    at D128 216 and 64 (the first consumer 208; at 56 the dQ warpgroup spills ~2 KB), at D64 208 and 72."""
    if consumers_dq(block_m, head_dim):
        return (240, 24)[which]
    return (216, 64)[which] if head_dim == 128 else (208, 72)[which]


@gluon.constexpr_function
def dq_warps(block_m, head_dim):
    """Warps of the dQ partition: the writer's one where the consumers form dQ, else the dQ warpgroup's four."""
    return 1 if consumers_dq(block_m, head_dim) else 4
