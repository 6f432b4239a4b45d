"""Launch plans: what the host decides before a launch, made once per signature of a call's inputs.

A call's route (which kernels), grids, groups, the copy-engine descriptors' static parts and the compiled kernels
are functions of its inputs' shapes, strides, dtypes and addresses modulo 16, its scalars and the module switches
the route reads, never of the data. ``launch.forward`` and ``launch_backward`` key their Hopper routes by exactly
those (``signature``) and keep the plan (``keep``), so a repeated call skips the decisions and Triton's per-launch
argument handling (``lean_launch.PlannedLaunch``). A B8 S2048 training step spent ~1 ms of host time on the H200
machine's CPU, as long as its GPU work, before plans (benchmarks/NOTES.md sessions 33-34). ``ENABLED = False``:
every call decides afresh (the same functions of the same inputs; tests/test_launch_plans.py compares the two).

Also here: the backward's row terms (the delta kernel, both routes) and its fused Hopper route as a plan.
"""

from __future__ import annotations

import torch

from mpt_attention.impl.triton import hopper, hopper_dkdv
from mpt_attention.impl.triton.backward import SOFT_BLOCK_ROWS, SOFT_BLOCKS, SOFT_EVERY_ROW, _attn_bwd_delta_kernel
from mpt_attention.impl.triton.common import dq_from_sums_kernel
from mpt_attention.impl.triton.lean_launch import _INTERPRET, PlannedLaunch, cdiv, next_power_of_2
from mpt_attention.masks import sequence_ends

ENABLED = True
KEPT: dict = {}  # key -> plan, or None for a signature that takes a route without one
_MAX_KEPT = 256
MISSING = object()


def signature(t: torch.Tensor | None):
    """What a plan may read of a tensor (never its data): shape, strides, dtype and address modulo 16."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15)


def keep(key, plan):
    """Keeps ``plan`` (or None) under ``key``; all are dropped when the store is full (keys come from the shapes a
    program uses: a handful in training)."""
    if len(KEPT) >= _MAX_KEPT:
        KEPT.clear()
    KEPT[key] = plan
    return plan


def row_terms(out, dout, lse, dlse, delta, dout_scaled=None, row_stats=None, varlen=False, dq_zero=None,
              dq_sync=None, owner=None, soft_blocks=None, used_rows=None, release=False) -> None:
    """The backward's per-query terms, one pass over O and dO: ``delta`` (the LSE's shape; None where no kernel reads
    it) = rowsum(dO * O) - dlse; with ``dout_scaled`` (a bias is present, so rows may be soft-masked: common.SOFT_LSE)
    dO scaled per row into it, every row, or with ``soft_blocks`` (``soft_blocks_buffer``) only the 64-row blocks
    holding a soft-masked row, the buffer's word per block saying which; with ``row_stats``
    (``hopper_dkdv.row_stats_buffer``) the Hopper dK/dV kernel's copy of the log2-domain LSE offsets and delta;
    with ``dq_zero`` (float32, q's shape and strides) zeros written into it; with ``dq_sync``
    (``hopper_dkdv.dq_sync_buffer``) zeros there. Varlen: packed rows are one long batch row for this row-wise
    kernel; ``used_rows``: (``cu_seqlens``, ``masks.sequence_ends``) of packed queries with unused rows, which then
    read nothing and get no zeros in ``dq_zero`` (``USED_ROWS``). ``owner``: a plan (``FusedBackward``) that keeps
    this launch's plan for inputs of its signature. ``release``: the launch after this one is its programmatic
    dependent (``hopper.PDL``), which each program lets start (``RELEASE``; not in the interpreter)."""
    o4, do4 = (out.unsqueeze(0), dout.unsqueeze(0)) if varlen else (out, dout)
    dq4 = dq_zero.unsqueeze(0) if varlen and dq_zero is not None else dq_zero
    plan = owner.row_terms if owner is not None else None
    if plan is None:
        plan = row_terms_plan(o4, do4, dlse, delta, dout_scaled, row_stats, dq4, dq_sync, soft_blocks is not None,
                              None if used_rows is None else used_rows[0].numel() - 1, release)
        if owner is not None:
            owner.row_terms = plan
    if plan is None:
        return
    dummy = lse
    plan[0](o4, do4, lse, dummy if dlse is None else dlse.float().contiguous(), dummy if delta is None else delta,
            dummy if dout_scaled is None else dout_scaled, dummy if row_stats is None else row_stats,
            dummy if dq4 is None else dq4, dummy if dq_sync is None else dq_sync,
            dummy if soft_blocks is None else soft_blocks, *((dummy, dummy) if used_rows is None else used_rows),
            *plan[1])


def soft_blocks_buffer(batch, n_heads, s_q, device) -> torch.Tensor:
    """``row_terms``' word per (batch, head, 64-query block): 1 where the block's dO was written scaled (it holds a
    soft-masked row), else 0; every word written by the delta kernel."""
    return torch.empty(batch * n_heads * cdiv(s_q, SOFT_BLOCK_ROWS.value), dtype=torch.int32, device=device)


def scaled_dout_buffer(dout) -> torch.Tensor:
    """Where ``row_terms`` writes dO's soft-masked blocks scaled (the other blocks are never written or read)."""
    return torch.empty_like(dout, memory_format=torch.contiguous_format)


def row_terms_plan(o4, do4, dlse, delta, dout_scaled, row_stats, dq4, dq_sync, soft_blocks=False, used_of=None,
                   release=False):
    """``row_terms``' launch (the delta kernel's) and its scalar arguments for inputs of this signature, or None
    where there are no rows; ``used_of``: the number of packed sequences with unused query rows, or None."""
    d_batch, d_rows, n_heads, head_dim = o4.shape
    if d_batch * n_heads == 0 or d_rows == 0:
        return None
    # one program per flagged block where the words are written (the interpreter's tiles are smaller otherwise)
    block = SOFT_BLOCK_ROWS.value if soft_blocks or not _INTERPRET else 32
    soft_rows = 0 if dout_scaled is None else SOFT_BLOCKS.value if soft_blocks else SOFT_EVERY_ROW.value

    def strides3(t):
        return t.stride()[:3] if t is not None else (0, 0, 0)

    n_seq = used_of or 0
    scalars = (*strides3(o4), *strides3(do4), *strides3(dout_scaled), *strides3(dq4), n_heads, d_rows, head_dim,
               0 if row_stats is None else row_stats.shape[2], n_seq, hopper.bisection_steps(n_seq))
    rows = d_rows if row_stats is None else max(d_rows, row_stats.shape[2])  # (the row terms' padding)
    return PlannedLaunch(_attn_bwd_delta_kernel, (cdiv(rows, block), n_heads, d_batch), dict(
        HAS_DLSE=dlse is not None, SOFT_ROWS=soft_rows, ROW_STATS=row_stats is not None,
        STORE_DELTA=delta is not None, ZERO_DQ=dq4 is not None, ZERO_SYNC=dq_sync is not None, BLOCK_M=block,
        BLOCK_D=max(16, next_power_of_2(head_dim)), USED_ROWS=used_of is not None,
        RELEASE=release and not _INTERPRET)), scalars


class FusedBackward:
    """The backward's fused Hopper route (the dK/dV kernel forms dQ too) for one signature of its inputs: what
    ``launch_backward.backward`` decided, and the plans of its delta and dK/dV launches (``row_terms_plan``,
    ``hopper_dkdv.dkdv_plan``), made by the first run. ``dbias``: the full bias gradient's shape (the kernel stores
    dS), or None; ``soft_rows``: 0 without a bias, else where dO is read scaled for soft-masked rows:
    ``SOFT_EVERY_ROW`` a copy of every row, ``SOFT_BLOCKS`` only the 64-query blocks holding one
    (``hopper_dkdv.scaled_dout_blocks``); ``row_stats``: ``hopper_dkdv.row_stats_buffer``'s sizes; ``dq_sync``:
    ``hopper_dkdv.dq_sync_buffer``'s where each dQ block's first program stores its sums, or None; ``dkdv_args``:
    (softmax scale, causal, ALiBi mode, S_q, S_k) (packed: the longest sequence's)."""

    __slots__ = ("varlen", "soft_rows", "dbias", "row_stats", "dq_sync", "dkdv_args", "dkdv", "row_terms", "dq_cast")

    def __init__(self, varlen, soft_rows, dbias, row_stats, dq_sync, dkdv_args):
        self.varlen, self.soft_rows, self.dbias, self.row_stats = varlen, soft_rows, dbias, row_stats
        self.dq_sync, self.dkdv_args, self.dkdv, self.row_terms, self.dq_cast = dq_sync, dkdv_args, None, None, None


def run_fused(plan: FusedBackward, dout, q, k, v, out, lse, dlse, bias_in, slopes, cu_q=None, cu_k=None,
              reach_norms=None, used_q=None, used_k=None, reach_table=None):
    """``launch_backward``'s gradients by ``plan``'s route for inputs of its signature (D innermost in q, k, v and
    dout); ``reach_norms``, ``used_q``, ``used_k``, ``reach_table`` as ``hopper_dkdv.run_dkdv`` takes them (the
    plan's key says whether a table comes: ``launch_backward.backward``)."""
    device = q.device
    # a bias can soft-mask whole rows: the delta kernel writes dO scaled per row, for every row or (``SOFT_BLOCKS``)
    # for the 64-query blocks holding one, which the kernel's loader then reads from there
    dout_in, dout_scaled, soft_blocks = dout, None, None
    if plan.soft_rows:
        dout_scaled = scaled_dout_buffer(dout)
    if plan.soft_rows == SOFT_BLOCKS.value:
        soft_blocks = soft_blocks_buffer(*plan.row_stats, device)
    elif plan.soft_rows:
        dout = dout_scaled
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # (unused rows: the kernel's zeros)
    dbias = None if plan.dbias is None else torch.empty(plan.dbias, dtype=q.dtype, device=device)
    row_stats = hopper_dkdv.row_stats_buffer(*plan.row_stats, device)
    # dQ summed in float32 by the kernel's bulk reductions, into zeros the delta kernel writes or, with ``dq_sync``,
    # into what each 64-query block's first program stores (the delta kernel zeroes a word per block instead)
    dq_acc = torch.empty_like(q, dtype=torch.float32)
    dq_sync = None if plan.dq_sync is None else hopper_dkdv.dq_sync_buffer(*plan.dq_sync, device)
    # packed queries with unused rows: those rows' O and dO are not read and their sums neither zeroed nor read (dQ
    # zeros there from dq_from_sums_kernel); half the bytes of both passes in a half-padded batch read in place
    used_rows = None if used_q is None else (cu_q, sequence_ends(cu_q, used_q))
    dout_blocks = dout_scaled if soft_blocks is not None else None
    if plan.dkdv is None:
        scale, causal, alibi_mode, s_q, s_k = plan.dkdv_args
        plan.dkdv = hopper_dkdv.dkdv_plan(q, k, v, dout, row_stats, dk, dv, bias_in, slopes, scale, causal,
                                          alibi_mode, dq_acc, dbias, cu_q, s_q, dq_sync is not None, dout_blocks, s_k,
                                          used_q is not None or used_k is not None, reach_table is not None)
    pdl = plan.dkdv.launch.kwargs.get("PDL", False)  # the dK/dV kernel a programmatic dependent of the delta kernel
    # the kernel reads delta from the row terms: no (B, H, S_q) copy
    row_terms(out, dout_in, lse, dlse, None, dout_scaled, row_stats, plan.varlen,
              dq_acc if dq_sync is None else None, dq_sync, owner=plan, soft_blocks=soft_blocks, used_rows=used_rows,
              release=pdl)
    hopper_dkdv.run_dkdv(plan.dkdv, q, k, v, dout, row_stats, dk, dv, bias_in, slopes, dq_acc, dbias, cu_q, cu_k,
                         dq_sync, reach_norms, dout_blocks, soft_blocks, used_q, used_k, reach_table)
    if used_rows is None:
        dq.copy_(dq_acc)  # the kernel scales its own
    else:
        if plan.dq_cast is None:
            plan.dq_cast = hopper.packed_rows_launch(dq_from_sums_kernel, q.shape, cu_q.numel() - 1)
        cast, scalars = plan.dq_cast
        cast(dq, dq_acc, *used_rows, dq.stride(0), dq.stride(1), dq_acc.stride(0), dq_acc.stride(1), *scalars)
    return dq, dk, dv, dbias
