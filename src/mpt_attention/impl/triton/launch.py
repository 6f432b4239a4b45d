"""Host side of the Triton backend: block sizes, strides, grids, the forward's route and launches, and the helpers the
backward (``launch_backward``) shares with it.

Inputs arrive validated (see ``mpt_attention.api``); tensors may have any strides except that the
head dim must be contiguous (copied otherwise, as flash-attn does). Optional inputs are passed as
constexpr flags with a dummy pointer, so a kernel specialisation carries only what it uses.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from mpt_attention.impl.triton import hopper, hopper_views, key_padding, mask_spans, plans
from mpt_attention.impl.triton.common import _dropout_mask_kernel, log2_bias_rows_kernel
from mpt_attention.impl.triton.forward import _attn_fwd_kernel
from mpt_attention.impl.triton.lean_launch import PlannedLaunch, cdiv, launch_kernel, next_power_of_2
from mpt_attention.impl.triton.reach import REACH_SLOPES, norm_launch
from mpt_attention.kept import kept_on
from mpt_attention.masks import sequence_ends
from mpt_attention.ops import alibi_from_diagonal

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
ALIBI_NONE, ALIBI_CAUSAL, ALIBI_SYMMETRIC, ALIBI_CAUSAL_DIAGONAL = 0, 1, 2, 3  # the kernels' ALIBI modes (common.py)


def _config_head_dim(head_dim: int, dtype: torch.dtype) -> int:
    """The head dim whose block configs (``_fwd_config``, ``launch_backward._bwd_config``) fit these tiles: float32
    tiles past 64 columns take as many bytes as bf16's past 128 and take D>128's configs (the 128-column ones need
    263-328 KB of shared memory in float32, more than an sm_90 block has: tools/compile_launches.py)."""
    return 256 if dtype == torch.float32 and head_dim > 64 else head_dim


def _fwd_config(head_dim: int, full_bias: bool = False) -> dict:
    # Measured with benchmarks/tune_blocks.py on an H200 (benchmarks/NOTES.md).
    if _INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128 and full_bias:
        # a (.., S_q, S_k) bias tile per block: 128 rows on 8 warps, 0.55 -> 0.43 ms at B4 H16 S2048
        # (benchmarks/dense_bias.py --sweep)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _on_its_device(fn):
    """Run ``fn`` with torch's current CUDA device set to that of its first tensor argument. Triton
    launches on the current device whatever device the tensors are on, and a model split over GPUs
    (``device_map="auto"``) calls its layers on cuda:1 with the current device left at cuda:0: the kernel
    would run on the wrong GPU with the other's pointers (an illegal access)."""
    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is not None and x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return on_device


def head_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels read it, D innermost (copied where it is not); the backward allocates the
    gradients like these (ops.py's fake kernel follows it)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _dense(cu: torch.Tensor | None) -> torch.Tensor | None:
    """Cumulative lengths as the kernels index them (entry b at ``cu + b``): a strided view is copied."""
    return cu if cu is None or cu.is_contiguous() else cu.contiguous()


def _alibi_mode(slopes, causal, prefix) -> int:
    """MPT's causal form slope * (j - (S_k - 1)) under plain causal masking, the symmetric form otherwise."""
    if slopes is None:
        return ALIBI_NONE
    return ALIBI_CAUSAL if causal and prefix is None else ALIBI_SYMMETRIC


def _kernel_alibi(dtype, slopes, causal, prefix) -> int:
    """The general kernels' ALIBI: MPT's causal form measured from each row's diagonal in float32
    (``ops.alibi_from_diagonal``; their log-sum-exp then differs from MPT's by a constant per row, which
    ``ops.public_lse`` removes), else ``_alibi_mode``."""
    if alibi_from_diagonal(dtype, slopes, causal, prefix):
        return ALIBI_CAUSAL_DIAGONAL
    return _alibi_mode(slopes, causal, prefix)


def _aux_args(q, bias, slopes, kpm, seqid, prefix, causal):
    """Pointers, strides and flags for the optional inputs, in kernel argument order."""
    dummy = q
    if bias is not None:
        bias_strides = [0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride())]
    else:
        bias_strides = [0, 0, 0, 0]
    slope_strides = list(hopper_views.slope_args(slopes, dummy)[1])
    alibi = _kernel_alibi(q.dtype, slopes, causal, prefix)
    # bool masks are read as bytes; (B, S_k) rows with unit stride along keys
    kpm = kpm.contiguous().view(torch.uint8) if kpm is not None else None
    prefix = prefix.contiguous().view(torch.uint8) if prefix is not None else None
    seqid = seqid.contiguous() if seqid is not None else None
    kv_range = mask_spans.live_key_range(kpm) if kpm is not None else None
    pointers = [t if t is not None else dummy for t in (bias, slopes, kpm, seqid, prefix)]
    row_strides = [t.stride(0) if t is not None else 0 for t in (kpm, seqid, prefix)]
    flags = dict(
        IS_CAUSAL=causal, ALIBI=alibi, BIAS=0 if bias is None else (1 if bias.shape[2] == 1 else 2),
        HAS_KPM=kpm is not None, HAS_SEQID=seqid is not None, HAS_PREFIX=prefix is not None,
    )
    return pointers, kv_range if kv_range is not None else dummy, bias_strides + slope_strides + row_strides, flags


def _log2_bias_rows(bias: torch.Tensor) -> torch.Tensor:
    """A bias row ``(B|1, H|1, 1, S_k)`` (any strides, dtype) as the kernels read it: float32 log2 units
    (common.log2_bias_rows_kernel), broadcast dims kept at size 1, rows padded to 16 bytes so the copy
    engine can read them. O(B' * H' * S_k); its launch planned per signature (``plans``). Kept on ``bias`` until
    ``bias`` is modified (``kept.kept_on``): MPT hands one bias row to all of a model's layers, which convert it
    once, not once per layer and again in each backward."""
    def convert_row():
        key = ("bias rows", bias.get_device(), plans.signature(bias)) if plans.ENABLED else None
        plan = plans.KEPT.get(key) if key is not None else None
        if plan is None:
            plan = _bias_rows_plan(bias)
            if key is not None:
                plans.keep(key, plan)
        shape, s_k, convert = plan
        padded = torch.empty(shape, dtype=torch.float32, device=bias.device)
        if convert is not None:
            convert[0](bias, padded, *convert[1])
        return padded[..., :s_k]
    return kept_on(bias, "_mpt_attention_bias_rows", convert_row, on_device=True)


def _bias_rows_plan(bias: torch.Tensor):
    """``_log2_bias_rows``' buffer shape, S_k, and its launch with the launch's scalar arguments (None: nothing to
    convert) for a bias of this signature."""
    n_b, n_h, _, s_k = bias.shape
    b_on, h_on = hopper_views.bias_dims_on(bias)
    rows_b, rows_h = (n_b if b_on else 1), (n_h if h_on else 1)
    row = hopper_views.aligned_row(s_k, 4)
    convert = None
    if rows_b * rows_h and s_k:
        block = min(1024, max(16, next_power_of_2(s_k)))
        convert = (PlannedLaunch(log2_bias_rows_kernel, (cdiv(s_k, block), rows_h, rows_b), dict(BLOCK=block)),
                   (bias.stride(0) * b_on, bias.stride(1) * h_on, bias.stride(3), rows_h * row, row, rows_h, s_k))
    return (rows_b, rows_h, 1, row), s_k, convert


@_on_its_device
def log2_bias_row(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias row (``bias.shape[2] == 1``) converted as the kernels read it (``_log2_bias_rows``), None for
    any other bias or none: computed once per training step by the eager autograd path (ops.py) and handed
    to ``forward`` and ``backward`` as ``bias_rows``, instead of converted in each."""
    return _log2_bias_rows(bias) if bias is not None and bias.shape[2] == 1 else None


def _kernel_bias(bias: torch.Tensor | None, bias_rows: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the kernels read it: a bias row converted (``bias_rows`` where the caller has it), any
    other bias as it is."""
    if bias is None or bias.shape[2] != 1:
        return bias
    return bias_rows if bias_rows is not None else _log2_bias_rows(bias)


def _descriptors_ok(*tensors: torch.Tensor) -> bool:
    """Whether tiles of these tensors may be loaded through tensor descriptors: Hopper or newer (or the
    interpreter, which emulates them, so CPU tests cover the path), a 16-byte aligned base and 16-byte
    multiples for every stride but the unit one (the copy engine's rules)."""
    device = tensors[0].device
    if not _INTERPRET and (device.type != "cuda" or hopper.sm_major(device.index) < 9):
        return False
    return all(hopper_views.tma_aligned(t) for t in tensors)


def _key_descriptors_ok(s_k: int, *tensors: torch.Tensor) -> bool:
    """``_descriptors_ok`` for the tensors a kernel's key loop reads through descriptors (K, V, a bias row),
    and never at one key: Triton turns an int argument equal to 1 into a constant, and with the key count a
    constant the pipelined descriptor loads crash ptxas (CUDA 12.8, Triton 3.6: SIGSEGV compiling the
    forward at head dims 136-256 or with a bias matrix, and the dQ kernel with a bias row). Plain loads
    compile, and one key is one tile either way."""
    return s_k != 1 and _descriptors_ok(*tensors)


def _ensure_allocator() -> None:
    """In-kernel descriptors need Triton's scratch allocator; install one only if none is set (a user's stays)."""
    if _INTERPRET:
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        # on the current device, which is where Triton launches
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x: torch.Tensor, varlen: bool) -> tuple:
    """(batch, seq, head) strides of a (B, S, H, D) tensor, or of a packed (T, H, D) one whose
    sequences all start at row 0 of their own (the kernel adds each sequence's start)."""
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


class _Geometry:
    """Sizes the kernels are launched with. Dense: (B, S, H, D) tensors, LSE (B, H, S_q). Varlen:
    packed (T, H, D) tensors with ``cu_seqlens``, LSE (H, T_q), the grid sized by the longest sequence."""

    def __init__(self, q, k, cu_q, max_q, max_k):
        self.varlen = cu_q is not None
        if self.varlen:
            total_q, self.n_heads, self.head_dim = q.shape
            self.batch, self.s_q, self.s_k, self.n_kv = cu_q.shape[0] - 1, max_q, max_k, k.shape[1]
            self.lse_shape, self.lse_strides = (self.n_heads, total_q), (0, total_q)
        else:
            self.batch, self.s_q, self.n_heads, self.head_dim = q.shape
            self.s_k, self.n_kv = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.n_heads, self.s_q)
            self.lse_strides = (self.n_heads * self.s_q, self.s_q)


def _packed_key(cu_q, max_q, max_k, used_q, used_k) -> tuple | None:
    """What a plan reads of packed sequences beyond the tensors' signatures (None for dense inputs): the number of
    sequences, the longest lengths (grids, groups, the reach), whether some rows are unused (``seqused``, queries and
    keys apart: the backward's delta kernel and dQ read the queries' alone) and
    ``hopper.PACKED_CLEARS`` (the kernels' ``VARLEN``); never the lengths themselves, which the kernels read on the
    device."""
    if cu_q is None:
        return None
    return cu_q.numel(), max_q, max_k, used_q is not None, used_k is not None, hopper.PACKED_CLEARS


def _forward_plan(q, k, v, bias, slopes, softmax_scale, causal, cu_q=None, max_q=0, max_k=0, seqused=False,
                  training=False, row_table=True):
    """The Hopper forward's plan for inputs without masks or dropout (dense, or packed sequences as ``_packed_key``
    describes them), or None where they take another route (``forward`` then decides as for any input).
    ``training``, ``row_table``: as ``hopper.forward_plan`` takes them."""
    varlen = cu_q is not None
    if hopper.unsupported(q, k, v, bias, None, None, None, 0.0, causal, varlen,
                          max_q=max_q if varlen else q.shape[1]) is not None:
        return None
    return hopper.forward_plan(q, k, v, bias, slopes, softmax_scale, causal, _alibi_mode(slopes, causal, None),
                               cu_q, max_q, max_k, seqused, training, row_table)


@_on_its_device
def forward(q, k, v, bias, slopes, kpm, seqid, prefix, seed, softmax_scale, causal, dropout_p,
            cu_q=None, cu_k=None, max_q=0, max_k=0, used_q=None, used_k=None, bias_rows=None, reach_norms=None,
            row_table=True):
    """Returns ``out`` (q's shape, contiguous) and ``lse`` float32: ``(B, H, S_q)``, or ``(H, T_q)``
    for packed varlen inputs (``cu_q``/``cu_k`` int32 cumulative lengths, ``max_q``/``max_k``; ``used_q``/``used_k``
    the rows of each sequence that take part, ``masks.sequence_ends``: the other rows'
    output is 0 and their log-sum-exp -inf). ``lse`` is the kernels' own, which ``backward`` takes: for float32
    causal ALiBi measured from each row's diagonal (``_kernel_alibi``); ``ops.public_lse`` turns it into MPT's.
    ``bias_rows``: ``log2_bias_row(bias)`` if the caller has it already. ``reach_norms``: a dict that receives
    the heads' norm maxima where the forward reads them for causal ALiBi's reach (``hopper.run_forward``), or the
    table of first key blocks where the Hopper forward writes one (``hopper.forward_table_applies``), for
    ``backward`` of the same q and k; given, the call is a training step's, which takes the reach from fewer keys
    (``hopper.reach_applies``' ``training``). ``row_table``: as ``hopper.forward_table_applies`` takes it (False
    for a key padding mask's row: without ALiBi it never decays, and with it the table is not yet tested on a GPU)."""
    if key_padding.takes_hopper(q, k, v, bias, slopes, kpm, seqid, prefix, dropout_p, causal, cu_q):
        k, v, rows = key_padding.as_bias_row(k, v, kpm, slopes, q.shape[2])
        return forward(q, k, v, rows, None, None, None, None, seed, softmax_scale, causal, dropout_p, bias_rows=rows,
                       reach_norms=reach_norms, row_table=False)
    bias = _kernel_bias(bias, bias_rows)
    training = reach_norms is not None
    if plans.ENABLED and kpm is None and seqid is None and prefix is None and not dropout_p:
        sig, packed = plans.signature, _packed_key(cu_q, max_q, max_k, used_q, used_k)
        key = ("forward", q.get_device(), sig(q), sig(k), sig(v), sig(bias), sig(slopes), softmax_scale, causal,
               hopper.ENABLED, hopper.L2_GROUP_BYTES, hopper.REACH_MIN_KEYS, hopper.FORWARD_TABLE, training, packed,
               row_table)
        plan = plans.KEPT.get(key, plans.MISSING)
        if plan is plans.MISSING:
            plan = plans.keep(key, _forward_plan(q, k, v, bias, slopes, softmax_scale, causal, cu_q, max_q, max_k,
                                                 packed is not None and (packed[3] or packed[4]), training, row_table))
        if plan is not None:
            return hopper.run_forward(plan, q, k, v, bias, slopes, _dense(cu_q), _dense(cu_k), reach_norms, used_q,
                                      used_k)
    q, k, v = (head_contiguous(x) for x in (q, k, v))
    cu_q, cu_k = _dense(cu_q), _dense(cu_k)
    geo = _Geometry(q, k, cu_q, max_q, max_k)
    partial = used_q is not None or used_k is not None
    if hopper.unsupported(q, k, v, bias, kpm, seqid, prefix, dropout_p, causal, geo.varlen, max_q=geo.s_q) is None:
        return hopper.forward(q, k, v, bias, slopes, softmax_scale, causal, _alibi_mode(slopes, causal, prefix),
                              cu_q, cu_k, geo.s_q, geo.s_k, reach_norms, used_q, used_k, row_table)
    batch, s_q, s_k, n_heads, n_kv, head_dim = geo.batch, geo.s_q, geo.s_k, geo.n_heads, geo.n_kv, geo.head_dim
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if used_q is None:
        lse = torch.empty(geo.lse_shape, dtype=torch.float32, device=q.device)
    else:  # rows past a sequence's used ones are not written (their output: _clear_unused below)
        lse = torch.full(geo.lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    pointers, kv_range, aux_strides, flags = _aux_args(q, bias, slopes, kpm, seqid, prefix, causal)
    cfg = _fwd_config(_config_head_dim(head_dim, q.dtype), full_bias=bias is not None and bias.shape[2] != 1)
    grid = (cdiv(s_q, cfg["BLOCK_M"]), n_heads, batch)  # common.grid_row
    if s_q == 0 or batch * n_heads == 0:
        return out.zero_(), lse
    seq_range = q
    if seqid is not None and s_k > 0:
        seq_range = mask_spans.query_tile_key_spans(mask_spans.sequence_spans(seqid), s_q, cfg["BLOCK_M"])
    varlen = geo.varlen
    kv_desc = kpm is None and _key_descriptors_ok(s_k, k, v)
    # a bias row through the copy engine as well (launch._log2_bias_rows pads its rows to 16 bytes)
    row_desc = bias is not None and bias.shape[2] == 1 and not varlen and _key_descriptors_ok(s_k, bias)
    if kv_desc or row_desc:
        _ensure_allocator()
    # (the reach's norm maxima span every row: not with unused ones, which may hold anything)
    reach = not partial and _general_reach(bias, slopes, kpm, seqid, prefix, causal, varlen, batch, s_k, training)
    norms = _reach_norms(q, k, None) if reach else q
    if reach and reach_norms is not None:
        reach_norms["norms"] = norms
    launch_kernel(_attn_fwd_kernel, grid,
        q, k, v, out, lse, *pointers, seed if seed is not None else q, kv_range, seq_range,
        *mask_spans.sequence_args(q, cu_q, cu_k, used_q, used_k), norms,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen), *geo.lse_strides,
        *aux_strides,
        n_heads, n_heads // n_kv, s_q, s_k, head_dim,
        softmax_scale * LOG2E, dropout_p,
        DROPOUT=dropout_p > 0.0, VARLEN=varlen, KV_DESC=kv_desc, ROW_DESC=row_desc, REACH=reach,
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_D=max(16, next_power_of_2(head_dim)), **flags, **cfg,
    )
    _clear_unused(out, cu_q, used_q)
    return out, lse


def _clear_unused(x, cu, used) -> None:
    """Zeros into the rows of packed ``x`` past each sequence's used ones, which the general kernels do not write:
    only those rows' bytes, where zeroing the whole tensor first wrote all of them."""
    if used is not None:
        hopper.clear_unused_rows(x, cu, sequence_ends(cu, used))


def _general_reach(bias, slopes, kpm, seqid, prefix, causal, varlen, batch, s_k, training) -> bool:
    """Whether the general kernels skip key blocks past causal ALiBi's reach (their ``REACH``; reach.py): causal
    ALiBi from slopes without a bias or mask, as the Hopper kernels' ``REACH_SLOPES``; packed sequences too (``s_k``
    their longest), whose norm maxima are one row over every token (``_reach_norms``). ``training``: as
    ``hopper.reach_applies`` takes it."""
    if kpm is not None or seqid is not None or prefix is not None:
        return False
    alibi_mode = _alibi_mode(slopes, causal, prefix)
    norm_rows = 1 if varlen else batch
    return hopper.reach_applies(bias, slopes, causal, alibi_mode, norm_rows, s_k, training) == REACH_SLOPES


def _reach_norms(q, k, kept):
    """The heads' norm maxima the reach reads (``reach.norm_launch``'s words: q's (B, H), then k's (B, H_kv)):
    ``kept`` (the forward's, handed to the backward) where it has their size, else one pass over q and k. Packed
    (T, H, D) q and k give one row, each head's maxima over all their sequences' tokens (``reach.norm_row``)."""
    rows = 1 if q.dim() == 3 else q.shape[0]
    if kept is not None and kept.numel() == rows * (q.shape[-2] + k.shape[-2]):
        return kept
    norm_pass, args, n_words = norm_launch(q, k, 0)
    norms = torch.zeros(n_words, dtype=torch.int32, device=q.device)
    norm_pass(q, k, norms, *args)
    return norms


@_on_its_device
def dropout_keep_mask(batch, n_heads, s_q, s_k, seed, dropout_p, device) -> torch.Tensor:
    """The bool keep-mask ``(B, H, S_q, S_k)`` the kernels draw for ``seed`` (testing aid)."""
    mask = torch.empty((batch * n_heads, s_q, s_k), dtype=torch.uint8, device=device)
    block = 32 if _INTERPRET else 64
    launch_kernel(_dropout_mask_kernel, (cdiv(s_q, block), n_heads, batch),
        mask, seed, mask.stride(0), mask.stride(1), s_q, s_k, dropout_p, BLOCK_M=block, BLOCK_N=block,
    )
    return mask.view(batch, n_heads, s_q, s_k).bool()
