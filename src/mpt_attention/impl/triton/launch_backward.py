"""Host side of the Triton backend's backward: which route forms the gradients (the Hopper dK/dV kernel with dQ
inside it, or the general route's dK/dV and dQ launches), their buffers and launches, and the bias-gradient
reduction. Helpers shared with the forward (strides, geometry, optional inputs as kernel arguments) are in
``launch``, which also holds the forward.
"""

from __future__ import annotations

import torch

from mpt_attention.impl.triton import hopper, hopper_dkdv, key_padding, mask_spans, plans
from mpt_attention.impl.triton.backward import SOFT_BLOCKS, SOFT_EVERY_ROW, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from mpt_attention.impl.triton.launch import (
    _INTERPRET, LOG2E, _alibi_mode, _aux_args, _clear_unused, _config_head_dim, _dense, _descriptors_ok,
    _dot_precision, _ensure_allocator, _general_reach, _Geometry, _kernel_bias, _key_descriptors_ok, _on_its_device,
    _packed_key, _reach_norms, _strides, head_contiguous,
)
from mpt_attention.impl.triton.lean_launch import cdiv, launch_kernel, next_power_of_2

# A full-shape bias gradient in q's dtype: dQ as one GEMM on the stored dS instead of the dQ kernel
# (False keeps the dQ kernel; benchmarks/dense_bias.py compares the two)
DQ_FROM_STORED_DS = True
# dQ in any order on the Hopper path: from a fourth warpgroup of the dK/dV kernel (False: the dQ kernel
# beside it, as in fixed order; A/B switches, the second for grouped heads)
FUSED_DQ = True
FUSED_DQ_GROUPED = True


def _bwd_config(head_dim: int, atomic_dq: bool = False, wide_ds: bool = False) -> tuple[dict, dict]:
    """(dK/dV config, dQ config). With ``atomic_dq`` the dK/dV kernel also holds a dQ tile and its float32
    staging buffer: at D=128 one stage keeps it inside Hopper's 227 KB of shared memory (the fastest of
    six configs in ``benchmarks/tune_dkdv.py --atomic``; two stages need 242 KB). ``wide_ds``: the dQ kernel
    reads a float32 bias matrix and stores dS for its gradient: at D 72-128 three stages of 128 x 64 tiles need
    257 KB of shared memory (tools/compile_launches.py); 32-key tiles keep three stages and measured fastest of
    four configs that fit (``benchmarks/dense_bias.py --wide-ds``, H200: B4 H16 S2048 D128 2.35 ms against 2.46
    for two stages of 64 keys)."""
    if _INTERPRET:
        small = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return small, small
    if head_dim <= 64:
        return (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))
    if head_dim <= 128 and atomic_dq:
        return (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))
    if head_dim <= 128:
        # dK/dV with BLOCK_M=32 and num_stages > 1 raced under Triton 3.6 (dK changed between identical
        # runs, benchmarks/NOTES.md): keep BLOCK_M >= 64 when pipelining.
        return (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                dict(BLOCK_M=128, BLOCK_N=32 if wide_ds else 64, num_warps=8, num_stages=3))
    return (dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),  # unpipelined: see above
            dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1))


_SIDE_STREAMS: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    """The backward's second stream on ``device`` (one per device, made on first use)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@_on_its_device
def backward(dout, q, k, v, out, lse, dlse, bias, slopes, kpm, seqid, prefix, seed, softmax_scale, causal,
             dropout_p, bias_grad, cu_q=None, cu_k=None, max_q=0, max_k=0, deterministic=True, used_q=None,
             used_k=None, bias_rows=None, reach_norms=None, reach_table=None):
    """Returns ``dq, dk, dv`` (shapes of q, k, v) and ``dbias`` (bias's shape, or None without ``bias_grad``).

    ``dlse`` is the gradient reaching the log-sum-exp output (or None): since d lse_i / d s_ij = P_ij,
    it folds into ``delta``: dS = P * (dP - (delta - dlse)).
    ``deterministic``: True sums dQ in a fixed order (bitwise reproducible). None lets the Hopper dK/dV
    kernel form dQ too (in a dQ warpgroup, or at D 72-128 in its consumers) and add it by float32 bulk
    reductions where it applies (D 64 or 72-128: the fastest backward there; dK, dV still in a fixed order),
    and keeps the fixed-order passes elsewhere. False also folds dQ into the general dK/dV kernel with
    float32 atomics (one pass) where neither that kernel's dQ nor
    dQ from a stored full dS (a full bias in q's dtype with its gradient) applies.
    ``bias_rows``: as for ``forward``; ``reach_norms``: the norm maxima ``forward``'s ``reach_norms`` received for
    these q and k, or None (the Hopper dK/dV kernel then reads them itself where the reach applies);
    ``reach_table``: the table of first key blocks ``forward``'s ``reach_norms`` received (``"table"``), or None
    (the fused Hopper route then computes every block at those lengths).
    """
    if key_padding.takes_hopper(q, k, v, bias, slopes, kpm, seqid, prefix, dropout_p, causal, cu_q):  # as forward
        k, v, rows = key_padding.as_bias_row(k, v, kpm, slopes, q.shape[2])
        return backward(dout, q, k, v, out, lse, dlse, rows, None, None, None, None, seed, softmax_scale, causal,
                        dropout_p, False, deterministic=deterministic, bias_rows=rows, reach_norms=reach_norms,
                        reach_table=reach_table)
    bias_in = _kernel_bias(bias, bias_rows)
    key = None  # the plan's key, where this call may take a kept plan (``plans``)
    if plans.ENABLED and kpm is None and seqid is None and prefix is None and not dropout_p and \
            deterministic is not True and q.stride(-1) == k.stride(-1) == v.stride(-1) == dout.stride(-1) == 1:
        sig = plans.signature
        key = ("backward", q.get_device(), sig(dout), sig(q), sig(k), sig(v), sig(out), sig(lse), sig(dlse), sig(bias),
               sig(bias_in), sig(slopes), softmax_scale, causal, bias_grad, deterministic, hopper.ENABLED,
               hopper.BWD_HEAD_DIMS, hopper.FUSED_BWD_HEAD_DIMS, hopper.FUSED_GROUP_HEADS, hopper.FIRST_WRITE_DQ,
               hopper.PDL, hopper.L2_GROUP_BYTES, hopper.REACH_MIN_KEYS, FUSED_DQ, FUSED_DQ_GROUPED,
               _packed_key(cu_q, max_q, max_k, used_q, used_k), reach_table is not None)
        plan = plans.KEPT.get(key, plans.MISSING)
        if plan is not plans.MISSING:
            if plan is not None:
                return plans.run_fused(plan, dout, q, k, v, out, lse, dlse, bias_in, slopes, _dense(cu_q),
                                       _dense(cu_k), reach_norms, used_q, used_k, reach_table)
            key = None  # another route, decided below
    q, k, v, dout = (head_contiguous(x) for x in (q, k, v, dout))
    cu_q, cu_k = _dense(cu_q), _dense(cu_k)
    geo = _Geometry(q, k, cu_q, max_q, max_k)
    plan = _fused_backward_plan(q, k, v, dout, bias, bias_in, slopes, kpm, seqid, prefix, softmax_scale, causal,
                                dropout_p, bias_grad, deterministic, geo)
    if key is not None:
        plans.keep(key, plan)
    if plan is not None:
        return plans.run_fused(plan, dout, q, k, v, out, lse, dlse, bias_in, slopes, cu_q, cu_k, reach_norms, used_q,
                               used_k, reach_table)
    route = _GeneralRoute(q, k, v, dout, bias, bias_in, kpm, seqid, prefix, dropout_p, causal, bias_grad,
                          deterministic, geo, used_q is not None or used_k is not None)
    plans.row_terms(out, dout, lse, dlse, route.delta, route.dout if route.soft_rows else None, route.row_stats,
                    geo.varlen, route.dq_acc if route.atomic else None)
    if geo.batch * geo.n_heads > 0 and geo.s_k > 0:
        _launch_general(route, q, k, v, lse, bias_in, slopes, kpm, seqid, prefix, seed, softmax_scale, causal,
                        dropout_p, geo, cu_q, cu_k, used_q, used_k, reach_norms)
    else:  # nothing to attend to or from: every gradient is zero
        route.dq.zero_(), route.dk.zero_(), route.dv.zero_()
    dbias = None
    if route.bias_mode:
        dbias = _reduce_to_shape(route.dbias_rows if route.bias_mode == 1 else route.dbias_full,
                                 bias.shape).to(bias.dtype)
    return route.dq, route.dk, route.dv, dbias


def _fused_backward_plan(q, k, v, dout, bias, bias_in, slopes, kpm, seqid, prefix, softmax_scale, causal, dropout_p,
                         bias_grad, deterministic, geo):
    """The plan of the Hopper dK/dV kernel forming dQ too (``plans.FusedBackward``), or None where this call takes
    the general route (``_GeneralRoute``).

    Without determinism the Hopper kernel also forms dQ (a fourth warpgroup, float32 bulk reductions):
    1.0-1.19x the reproducible split on an H200 (benchmarks/NOTES.md session 15). Grouped heads: a group's
    query heads split over programs (hopper.FUSED_GROUP_HEADS per program); with all of them in one
    program, its few, long programs left a tail (GQA 32:4: 0.86x the split). With a full-shape bias matrix
    in q's dtype the warpgroup's ring of dS tiles is its gradient: the kernel reads the bias and stores dS from
    the ring (one pass for dK, dV, dQ and dbias) into a contiguous buffer whose rows the copy engine can write."""
    batch, s_q, s_k, n_heads, n_kv, head_dim = geo.batch, geo.s_q, geo.s_k, geo.n_heads, geo.n_kv, geo.head_dim
    full = (batch, n_heads, s_q, s_k)
    ds_from_ring = bias_grad and bias.shape[2] != 1 and tuple(bias.shape) == full and bias.dtype == q.dtype and \
        s_k * bias.element_size() % 16 == 0
    if not (FUSED_DQ and deterministic is not True and (not bias_grad or ds_from_ring) and (
            n_heads == n_kv or FUSED_DQ_GROUPED)):
        return None
    if hopper.unsupported(q, k, v, bias_in, kpm, seqid, prefix, dropout_p, causal, geo.varlen, dout, fused_dq=True,
                          max_q=s_q) is not None:
        return None
    alibi_mode = _alibi_mode(slopes, causal, prefix)
    first_write = hopper_dkdv.first_write_dq(head_dim, bias_in is not None and bias_in.shape[2] != 1, geo.varlen)
    soft_rows = 0  # a bias can soft-mask whole rows: dO scaled for them, every row or the blocks holding one
    if bias is not None:
        soft_rows = SOFT_BLOCKS.value if hopper_dkdv.scaled_dout_blocks(head_dim, bias_in.shape[2] != 1) else \
            SOFT_EVERY_ROW.value
    return plans.FusedBackward(geo.varlen, soft_rows, full if bias_grad else None,
                               (1, n_heads, q.shape[0]) if geo.varlen else (batch, n_heads, s_q),
                               (batch, n_heads, s_q) if first_write else None,
                               (softmax_scale, causal, alibi_mode, s_q, s_k))


class _GeneralRoute:
    """The general backward's decisions for one call and the buffers they need: which kernel writes dQ (the dQ
    kernel, float32 atomics in the dK/dV kernel, or a GEMM on a stored dS), who writes dS for a bias gradient, and
    whether the dK/dV kernel is the Hopper one (reproducible, no bias gradient) or the general one.

    Reproducible, the Hopper dK/dV kernel with the dQ kernel beside it is the fastest; it also serves
    ``deterministic=False`` where the fused route does not apply: dQ folded into the general dK/dV kernel with
    float32 reductions measured 0.61-0.70x of it at D128 on an H200."""

    def __init__(self, q, k, v, dout, bias, bias_in, kpm, seqid, prefix, dropout_p, causal, bias_grad, deterministic,
                 geo, partial):
        batch, s_q, s_k, n_heads = geo.batch, geo.s_q, geo.s_k, geo.n_heads
        full = (batch, n_heads, s_q, s_k)
        # a bias can soft-mask whole rows (common.SOFT_LSE): the delta kernel then writes dO scaled per row
        self.soft_rows = bias is not None
        self.dout = torch.empty_like(dout, memory_format=torch.contiguous_format) if self.soft_rows else dout
        # gradients in their inputs' layout (dense ones keep their strides, e.g. SDPA's (B, H, S, D) passed
        # transposed), so autograd hands them to the caller's tensors without a transposing copy each
        # (rows past a sequence's used ones: zeros from _clear_unused after the kernels)
        self.dq, self.dk, self.dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # the kernels read a bias row converted (float32, log2 units: ``bias_in``); dbias keeps the caller's shape
        # and dtype. bias_mode (the dQ kernel's BIAS_GRAD): 0 none, 1 a bias row's (float32 sums), 2 a matrix's
        self.bias_mode = 0
        self.dbias_rows = self.dbias_full = q  # dummies
        if bias_grad:
            if bias.shape[2] == 1:
                self.bias_mode = 1
                self.dbias_rows = torch.empty((batch, n_heads, 1, s_k), dtype=torch.float32, device=q.device)
            else:
                self.bias_mode = 2
                # dS is the gradient itself when the bias has the full shape: store it in the bias dtype
                # (the one rounding the result gets anyway); a broadcast bias sums it, in float32.
                dtype = bias.dtype if tuple(bias.shape) == full else torch.float32
                self.dbias_full = torch.empty(full, dtype=dtype, device=q.device)
        # A full dS in q's dtype is the input dQ = dS K takes anyway: with it stored by the dK/dV kernel, one
        # batched GEMM replaces the dQ kernel, which would recompute S, P and dP and read the bias again
        # (1.87 vs 3.07 ms for the atomic pass, B4 H16 S2048 D128, H200, benchmarks/dense_bias.py)
        self.ds_gemm = DQ_FROM_STORED_DS and self.bias_mode == 2 and self.dbias_full.dtype == q.dtype and \
            not geo.varlen
        # tiles the general backward skips (causal, padding, other sequences) must read as zero; the Hopper kernel
        # stores zero tiles itself
        if self.bias_mode == 2 and (causal or kpm is not None or seqid is not None):
            self.dbias_full.zero_()
        self.use_hopper = not bias_grad and not partial and hopper.unsupported(
            q, k, v, bias_in, kpm, seqid, prefix, dropout_p, causal, geo.varlen, self.dout, max_q=s_q) is None
        # the Hopper kernel's loader copies each step's row terms (log2-domain LSE offset, delta) beside Q and dO,
        # so the consumers read them from shared memory instead of waiting on global loads every step
        # (packed sequences: one long row per head, as the delta kernel writes them)
        self.row_stats = hopper_dkdv.row_stats_buffer(batch, n_heads, s_q, q.device) if self.use_hopper else None
        self.atomic = deterministic is False and not self.use_hopper and not self.ds_gemm
        # dQ summed in float32 by atomics into zeros the delta kernel writes (in dq's layout, so that the copy into
        # dq at the end is elementwise)
        self.dq_acc = torch.empty_like(q, dtype=torch.float32) if self.atomic else q  # else a never-read dummy
        self.delta = torch.empty(geo.lse_shape, dtype=torch.float32, device=q.device)
        # who writes dS for a full bias gradient: the dK/dV kernel (atomic dQ, or dQ from the stored dS), else
        # the dQ kernel
        self.dkdv_bias_grad = self.bias_mode if self.bias_mode == 1 or self.atomic or self.ds_gemm else 0
        # the dK/dV kernel stores dS tiles through a descriptor where the buffer's rows allow (TMA stores)
        self.ds_desc = self.dkdv_bias_grad == 2 and _descriptors_ok(self.dbias_full)


def _launch_general(route, q, k, v, lse, bias_in, slopes, kpm, seqid, prefix, seed, softmax_scale, causal, dropout_p,
                    geo, cu_q, cu_k, used_q, used_k, reach_norms) -> None:
    """The general backward's launches for ``route`` (B * H > 0, S_k > 0): the dK/dV kernel (general or Hopper)
    and dQ (its kernel, on a side stream where two independent passes fill each other's idle SMs, or the dK/dV
    kernel's atomics, or a GEMM on the stored dS), then zeros into unused packed rows."""
    batch, s_q, s_k, n_heads, n_kv, head_dim = geo.batch, geo.s_q, geo.s_k, geo.n_heads, geo.n_kv, geo.head_dim
    varlen, dout, atomic = geo.varlen, route.dout, route.atomic
    pointers, kv_range, aux_strides, flags = _aux_args(q, bias_in, slopes, kpm, seqid, prefix, causal)
    common = dict(
        DROPOUT=dropout_p > 0.0, VARLEN=varlen, DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_D=max(16, next_power_of_2(head_dim)), **flags,
    )
    sizes = (n_heads, n_heads // n_kv, s_q, s_k, head_dim, softmax_scale, softmax_scale * LOG2E, dropout_p)
    in_strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))
    seed_arg = seed if seed is not None else q
    cu_args = mask_spans.sequence_args(q, cu_q, cu_k, used_q, used_k)
    wide_ds = route.bias_mode == 2 and not route.dkdv_bias_grad and bias_in.element_size() == 4
    kv_cfg, q_cfg = _bwd_config(_config_head_dim(head_dim, q.dtype), atomic_dq=atomic, wide_ds=wide_ds)
    # dK/dV streams query rows (Q, dO), dQ key rows (K, V; never with key padding)
    dkdv_desc = _descriptors_ok(q, dout)
    dq_desc = not atomic and kpm is None and _key_descriptors_ok(s_k, k, v)
    # the dQ kernel reads a bias row through the copy engine too (its plain load costs a conversion)
    dq_row_desc = dq_desc and route.bias_mode != 2 and bias_in is not None and bias_in.shape[2] == 1 and \
        not varlen and _descriptors_ok(bias_in)
    if dkdv_desc or dq_desc or route.ds_desc:
        _ensure_allocator()
    partial = used_q is not None or used_k is not None  # some packed rows unused (``seqused``)
    reach = not partial and _general_reach(bias_in, slopes, kpm, seqid, prefix, causal, varlen, batch, s_k, True)
    norms = _reach_norms(q, k, reach_norms) if reach else q
    kv_spans = q_spans = q
    if seqid is not None:  # one pass over the ids serves both kernels
        spans = mask_spans.sequence_spans(seqid)
        kv_spans = mask_spans.key_block_query_spans(spans, s_q, kv_cfg["BLOCK_N"])
        if not atomic:
            q_spans = mask_spans.query_tile_key_spans(spans, s_q, q_cfg["BLOCK_M"])
    atomic_dq = 0  # 0: the dQ kernel, 1: scalar atomics, 2: bulk (TMA) reductions
    if atomic:
        # the interpreter has no descriptor reductions: CPU tests run the scalar atomics
        atomic_dq = 2 if not _INTERPRET and _descriptors_ok(route.dq_acc) else 1
        if atomic_dq == 2:
            _ensure_allocator()

    def launch_dkdv():
        if route.use_hopper:
            hopper_dkdv.backward_dkdv(q, k, v, dout, route.row_stats, route.dk, route.dv, bias_in, slopes,
                                      softmax_scale, causal, _alibi_mode(slopes, causal, prefix),
                                      reach_norms=reach_norms)
        else:
            launch_kernel(_attn_bwd_dkdv_kernel, (cdiv(s_k, kv_cfg["BLOCK_N"]), n_kv, batch),
                q, k, v, dout, lse, route.delta, route.dk, route.dv, route.dbias_rows, route.dq_acc, route.dbias_full,
                *pointers, seed_arg, kv_range, kv_spans, *cu_args, norms, *in_strides, *_strides(route.dk, varlen),
                *_strides(route.dv, varlen), *_strides(route.dq_acc, varlen), *geo.lse_strides, *aux_strides, *sizes,
                DESC=dkdv_desc, ATOMIC_DQ=atomic_dq, BIAS_GRAD=route.dkdv_bias_grad, DS_DESC=route.ds_desc,
                REACH=reach, **common, **kv_cfg,
            )

    def launch_dq():
        launch_kernel(_attn_bwd_dq_kernel, (cdiv(s_q, q_cfg["BLOCK_M"]), n_heads, batch),
            q, k, v, dout, lse, route.delta, route.dq, route.dbias_full, *pointers, seed_arg, kv_range, q_spans,
            *cu_args, norms, *in_strides, *_strides(route.dq, varlen), *geo.lse_strides, *aux_strides, *sizes,
            DESC=dq_desc, ROW_DESC=dq_row_desc, BIAS_GRAD=route.bias_mode, REACH=reach, **common, **q_cfg,
        )

    if atomic:
        launch_dkdv()
        route.dq.copy_(route.dq_acc.mul_(softmax_scale))
    elif route.ds_gemm:
        launch_dkdv()
        _dq_from_ds(route.dbias_full, k, route.dq, softmax_scale)
    elif s_q > 0 and (route.use_hopper or (q.is_cuda and n_heads > n_kv and not route.bias_mode)):
        # two independent passes: the dQ kernel on a side stream, launched first, fills the SMs the
        # dK/dV kernel's last (short, causal) programs leave idle, and the reverse. Outputs bitwise
        # unchanged. Hopper kernels: B2 H16 S8192 3.56 -> 3.44-3.51 ms, GQA 32:4 S4096 4.26 -> 3.78.
        # General kernels only for grouped heads (few dK/dV programs: D64 32:4 1.32 -> 1.04 ms); with
        # as many KV heads as query heads they gain 0-2% or lose (B8 S2048 D64: 0.63 -> 0.73-0.80)
        main_stream, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            launch_dq()
        launch_dkdv()
        main_stream.wait_stream(side)
    else:
        launch_dkdv()
        if s_q > 0:
            launch_dq()
    _clear_unused(route.dq, cu_q, used_q)
    _clear_unused(route.dk, cu_k, used_k)
    _clear_unused(route.dv, cu_k, used_k)


def _dq_from_ds(ds: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, softmax_scale: float) -> None:
    """``dq = softmax_scale * dS K`` as one batched GEMM: ``ds (B, H, S_q, S_k)`` in k's dtype, ``k (B, S_k,
    H_kv, D)``, ``dq (B, S_q, H, D)``. The query heads of a group are adjacent in ``ds``, so each KV head
    multiplies one ``(G * S_q, S_k)`` block; the scale is applied to the float32 product (``alpha``), as
    the dQ kernel does, before the one rounding to k's dtype."""
    batch, n_heads, s_q, s_k = ds.shape
    n_kv, head_dim = k.shape[2], k.shape[3]
    lhs = ds.view(batch * n_kv, (n_heads // n_kv) * s_q, s_k)
    rhs = k.permute(0, 2, 1, 3).reshape(batch * n_kv, s_k, head_dim)
    prod = torch.baddbmm(lhs.new_empty(()), lhs, rhs, beta=0.0, alpha=softmax_scale)
    dq.copy_(prod.view(batch, n_heads, s_q, head_dim).transpose(1, 2))


def _reduce_to_shape(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sum a ``(B, H, S_q|1, S_k)`` gradient over the dims the bias broadcast along."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad
