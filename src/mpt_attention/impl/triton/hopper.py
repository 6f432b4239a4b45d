"""Host side of the Hopper kernels (Gluon: ``hopper_forward.py``, and the dK/dV kernel of
``hopper_backward.py``): when they apply, and the forward's launch; the dK/dV kernel's is ``hopper_dkdv.py``'s.

The general kernels (``forward.py``, ``backward.py``) compute the same functions for every input; these
are faster on sm_90 for the common case and are chosen automatically where they apply. ``ENABLED =
False`` (or the environment variable ``MPT_ATTENTION_HOPPER_KERNEL=0`` at import) keeps the general
kernels everywhere: tests and benchmarks compare the two that way. The descriptors these launches build, and the
views of tensors they describe, are ``hopper_views.py``'s.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from mpt_attention.impl.device import sm_count, sm_major
from mpt_attention.impl.triton.common import clear_unused_rows_kernel, row_keys_kernel
from mpt_attention.impl.triton.hopper_views import bias_dims_on, bias_matrix_view, bias_row_view, descriptor, rows_view
from mpt_attention.impl.triton.hopper_views import slope_args, tma_aligned
from mpt_attention.impl.triton.lean_launch import PlannedLaunch, cdiv, next_power_of_2, sm90_ptxas_is_cuda13
from mpt_attention.impl.triton.reach import REACH_ROW, REACH_SLOPES, norm_launch, row_ends, row_prefix_max
from mpt_attention.impl.triton.reach import row_block_terms, row_reach_launch
from mpt_attention.kept import kept_on
from mpt_attention.masks import sequence_ends

try:
    from triton.experimental.gluon import language as gl

    from mpt_attention.impl.triton.hopper_backward import _hopper_bwd_dkdv_kernel  # (launched by hopper_dkdv)
    from mpt_attention.impl.triton.hopper_forward import _hopper_fwd_kernel
    _IMPORT_ERROR = None
    # the kernels' shared-memory layouts (hopper_forward/hopper_backward), built once: frozen. Tiles of q, k, v
    # and their outputs are (B, S, H, D) boxes; a bias matrix and its gradient (B' * H', S_q, S_k) boxes
    TILE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    MATRIX_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    # the forward's (B', H', S_k) bias rows, by element bits; one object each, as lean_launch keys a layout by id
    _BIAS_ROW_LAYOUTS = {bits: gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=3)
                         for bits in (16, 32)}
    # a bias row's per-key terms (row_keys): [1, 1, BLOCK_N, 16] boxes of a (B', H', S_k, 16) bfloat16 tensor
    _ROW_KEYS_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=4)
except Exception as exc:  # a Triton without Gluon's Hopper module
    _hopper_fwd_kernel = _hopper_bwd_dkdv_kernel = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

ENABLED = os.environ.get("MPT_ATTENTION_HOPPER_KERNEL", "1") != "0"
# tile widths (``tile_dim``) the backward sends to the Hopper dK/dV kernel: at 64 the general one is faster
# (benchmarks/NOTES.md); benchmarks/bwd_kernels.py widens it to time the whole backward both ways
BWD_HEAD_DIMS = (128,)
# with dQ in any order the Hopper kernel forms dQ too (its dQ warpgroup, or at D 72-128 its consumers), replacing
# the dQ kernel: D64 as well
FUSED_BWD_HEAD_DIMS = (64, 128)
# query heads per program with the fused dQ and grouped heads (a group's heads split over programs, their
# dK, dV partials summed after; 1 when the group size is not a multiple); launch.py decides whether grouped
# heads take the fused dQ at all
FUSED_GROUP_HEADS = 2
# where the consumers form dQ, each 64-query block's first program stores its part of the dQ sums and the others add
# after it, so the delta kernel writes no zeros there (``first_write_dq``; past causal ALiBi's reach too)
FIRST_WRITE_DQ = True
# the fused backward's dK/dV kernel launched as the delta kernel's programmatic dependent (``launch_pdl``): its programs
# start on the SMs the delta kernel's last ones leave, load K and V, and wait for the row terms in-kernel
# (``hopper_backward``'s ``PDL``; ``hopper_dkdv.dkdv_plan`` says where). The training step 1.0069x at B16 H16 S1024
# D128, 1.003x at D64, at S2048 and with a bias row (H200, CUDA graphs, paired; benchmarks/NOTES.md session 70)
PDL = True
PROGRAM_WORDS = 32  # the forward's ``Tiles`` words per program (hopper_tiles.PROGRAM_WORDS)
BLOCK_M, BLOCK_N, HALF_M = 128, 128, 64  # 64 query rows per consumer, two per tile (or three: forward_consumers)
# causal ALiBi forwards over at least this many keys skip the key blocks past every query's reach (``reach.py``).
# Shorter ones would spend about what the skipped blocks save on reading q's and k's norms: at S 2048 the kernel
# took 12% less but the norms cost as much (0.98-0.99x), at 4096 1.16-1.30x (H200, benchmarks/NOTES.md session 39).
# A training step reads the norms once for its forward and backward, and skips in both: it takes the reach from half
# as many keys (``reach_applies``' ``training``; session 64: at S 2048 forward+backward 1.06-1.13x with q, k ~ N(0, 1),
# 1.01-1.10x at twice those norms; at 1024 0.78-1.05x). Session 65's shorter reach (reach.VANISH2 48): a forward alone
# at 2048 would read 1.06-1.07x with q, k ~ N(0, 1) but 0.96x at D128 with twice those norms, so it keeps 4096; a
# training step at 1024 read 1.02-1.25x, host-bound there, not taken. Benchmarks set it past any length to time the
# kernels on every visible block
REACH_MIN_KEYS = 4096
# A training step over REACH_MIN_KEYS // 4 to 3 * REACH_MIN_KEYS // 4 keys has its forward read every block and find
# each 64 query rows' first key block within reach from its own scores (``hopper_forward``'s ``TABLE``,
# ``forward_table_applies``), and its backward end each key block's queries there (``reach.REACH_TABLE``): no pass
# over q and k, a bound from the scores themselves. Against every block (S 1024) and against the norms' reach in
# forward and backward (S 2048-3072), H100, CUDA graphs, paired (benchmarks/NOTES.md session 72): S1024 1.09x (D128,
# D64), S2048 1.06x (D128) and 1.03x (D64), at twice N(0, 1)'s norms 1.15x and 1.10x; S3072 1.035x (D128) but 0.974x
# (D64), and at S4096, where the norms' forward skips more, 0.94x
FORWARD_TABLE = True
# Packed sequences without unused rows on the kernels that clear rows past each sequence's end (``PACKED_USED``, as
# ``seqused`` calls take): a sequence's last blocks then read its neighbour's rows as zeros, so a NaN in one sequence
# stays there. Off: the neighbour's rows are masked out of the scores but enter P V with weight 0 (docs/errors.md).
PACKED_CLEARS = False
LOG2E = 1.4426950408889634


def unsupported(q, k, v, bias, kpm, seqid, prefix, dropout_p, causal, varlen, dout=None,
                fused_dq=False, max_q=0) -> str | None:
    """Why the Hopper kernels do not apply to these inputs (None: they do); ``dout`` for the backward,
    ``fused_dq`` for its dQ sums (the dK/dV kernel forming dQ too); ``varlen``: packed (T, H, D) sequences, the
    longest ``max_q`` queries long (the forward only)."""
    if not ENABLED:
        return "disabled"
    if _hopper_fwd_kernel is None:
        return f"Gluon unavailable ({_IMPORT_ERROR})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if tile_dim(q.shape[-1]) is None:
        return f"head dim {q.shape[-1]}"
    if dout is not None and tile_dim(q.shape[-1]) not in (FUSED_BWD_HEAD_DIMS if fused_dq else BWD_HEAD_DIMS):
        return f"head dim {q.shape[-1]} in the backward (the general dK/dV kernel is faster there, benchmarks/NOTES.md)"
    if kpm is not None or seqid is not None or prefix is not None or dropout_p > 0:
        return "masks or dropout"
    if varlen and bias is not None:
        return "packed sequences with a bias"  # (attention_varlen takes none)
    if varlen and dout is not None and not fused_dq:
        return "packed sequences in the reproducible backward"
    if bias is not None and bias.shape[2] != 1 and (dout is None or fused_dq):
        # the forward (its [64, 128] tiles ride with K; at tile width 128 it keeps one Q buffer instead of two to
        # make room: hopper_loaders.q_buffers) and the backward with the dQ warpgroup read a bias matrix through
        # the copy engine
        if bias.shape[2:] != (q.shape[1], k.shape[1]):
            return f"bias of shape {tuple(bias.shape)}: a matrix must span (S_q, S_k) = {(q.shape[1], k.shape[1])}"
        if bias.dtype != q.dtype:
            return f"bias matrix of dtype {bias.dtype} (the Hopper kernels read one in q's dtype, {q.dtype})"
        if bias_matrix_view(bias) is None:
            return "bias matrix strides: not a (B' * H', S_q, S_k) view with 16-byte aligned rows"
    elif bias is not None:
        if bias.shape[2] != 1 or bias.shape[3] != k.shape[1]:
            return f"bias of shape {tuple(bias.shape)}: only rows over the keys, (B|1, H|1, 1, S_k)"
        if bias.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"bias dtype {bias.dtype}"
    if varlen:  # (T, H, D): a packed tile with no key runs one fully masked block (hopper_tiles.forward_tile)
        s_q = max_q
        if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[0] == 0:
            return "no rows, keys or query heads"
    else:
        s_q, s_k = q.shape[1], k.shape[1]
        if q.shape[0] == 0 or q.shape[2] == 0:
            return "no batch rows or no query heads"  # the general launchers return at once; descriptors need dims > 0
        if s_q == 0 or s_k == 0 or (causal and s_q > s_k):
            return "rows without keys"  # the kernel assumes every row sees a key
    if s_q < BLOCK_M:
        # decode and short chunks: most of a 128-row tile would be idle, and the per-launch host work
        # (four copy-engine descriptors encoded) is not hidden behind so short a kernel
        return f"fewer than {BLOCK_M} query rows"
    tensors = (q, k, v) if dout is None else (q, k, v, dout)
    for t in tensors:
        if not tma_aligned(t):
            return "strides not 16-byte aligned"
    if any(0 in t.stride() and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)) for t in tensors):
        # e.g. K, V expanded over the query heads: the general kernels read them; a copy-engine descriptor
        # with a zero stride is untried on the hardware
        return "a dim expanded with stride 0"
    if q.device.type != "cuda" or sm_major(q.device.index) != 9:
        return "not an sm_90 GPU"  # checked last, so CPU tests see the reasons above
    return None


def tile_dim(head_dim: int) -> int | None:
    """The width of the Hopper kernels' tiles for head dim D: 64, or 128 for D 72-120 (MPT-30B's 112): the
    copy engine reads the columns past D as zeros and drops them on stores, so they add nothing to any
    product and nothing is written there. None where the kernels do not apply."""
    if head_dim == 64:
        return 64
    return 128 if 64 < head_dim <= 128 and head_dim % 8 == 0 else None


def product_tail(head_dim: int) -> int:
    """Columns the kernels' products take past the first 64 of a 128-wide tile: 16 for D 72-80, 32 for
    D 88-96 (the rest of the tile holds the copy engine's zeros, so the products skip them; in the backward
    with the dQ warpgroup, whose own product still spans the tile); 0: the products span the whole tile
    (D 64, and 104-128, where 64 + 32 + 16 pieces would be needed: Gluon's shapes are powers of 2)."""
    return 16 if 64 < head_dim <= 80 else 32 if 80 < head_dim <= 96 else 0


def forward_tail(head_dim: int) -> int:
    """The forward's ``TAIL``: ``product_tail``'s pieces for P V, except where Triton assembles sm_90 kernels with a
    ptxas of CUDA 13 (Triton 3.9's): there P V spans the whole tile at D 72-96 as well (Q K^T still contracts
    ``qk_cols``). Triton 3.8 on copies a register A operand before each tensor-core product (triton-lang/triton#9514);
    ptxas 12.x folds the copies for both pieces' products, 13.4 keeps the second's (D96: 32 moves per key block).
    Under Triton 3.9 the whole tile runs D80 1.05x and D96 1.10x faster; under 3.6 the pieces win by 1.13x and
    1.07x (benchmarks/NOTES.md sessions 18, 56)."""
    return 0 if _ptxas13_on_hopper() else product_tail(head_dim)


@functools.cache
def _ptxas13_on_hopper() -> bool:  # read once: forward_tail is on every forward's planning path
    return sm90_ptxas_is_cuda13()


def qk_cols(head_dim: int) -> int:
    """Columns the forward's ``Q K^T`` contracts: D rounded up to 16 (the products' k step), the rest of the tile
    being the copy engine's zeros. Past ``product_tail``'s pieces this also trims D 104-112 (MPT-30B's 112) to 64 +
    32 + 16 columns of 128, 7 of the 8 k steps (``hopper_scores.issue_over_d``), where ``P V``, whose output columns
    are D's, still spans the tile: forward 1.01-1.02x at D112 (benchmarks/NOTES.md session 52). The same for the dK/dV
    kernel's S^T and dP^T measured nothing and spilled more; it keeps ``product_tail``'s pieces."""
    return -(-head_dim // 16) * 16


L2_GROUP_BYTES = 24 << 20  # what a group of grid rows shares (forward: K, V; backward: Q, dO, dQ sums)


def heads_per_group(k, n_heads, n_bh):
    """How many (batch, head) rows the grid runs side by side: as many as keep their K and V (read by every
    query tile of the head) within ``L2_GROUP_BYTES``, so that running tiles longest first across heads
    does not stream K and V from memory once per tile."""
    per_head = 2 * k.shape[1] * k.shape[3] * k.element_size() * k.shape[2] / n_heads
    return max(1, min(n_bh, int(L2_GROUP_BYTES // max(per_head, 1))))


def packed_heads_per_group(n_heads: int, bytes_per_head: float) -> int:
    """Packed sequences: how many heads' tiles (``hopper_tiles.packed_tile``) run side by side, the largest divisor
    of ``n_heads`` whose heads share at most ``L2_GROUP_BYTES`` over the longest sequence (``bytes_per_head``)."""
    fit = max(1, int(L2_GROUP_BYTES // max(bytes_per_head, 1)))
    return max(d for d in range(1, min(n_heads, fit) + 1) if n_heads % d == 0)


def packed_tiles(cu: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """(B + 1,) int32: tiles of 128 rows before each packed sequence, the total last (``hopper_tiles``; the
    forward's query tiles, the backward's key blocks), on the device: no host sync; with ``used`` (``seqused``)
    over each sequence's used rows (the forward's tiles; the dK/dV kernel's key blocks cover every row and write
    zeros past the used ones). Kept on ``cu`` (or ``used``) until it is modified (``kept.kept_on``, as
    ``varlen._length_stats`` keeps its lengths): the forward and the backward, and a model's layers, share one
    ``cu_seqlens``, and these four small kernels cost more host time than they take on the GPU. Not while a CUDA
    graph is captured: the graph must recompute them from the lengths a replay finds (updated in place)."""
    def tiles():
        lengths = cu[1:] - cu[:-1] if used is None else used
        counts = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
        torch.cumsum(torch.div(lengths + BLOCK_M - 1, BLOCK_M, rounding_mode="floor"), 0, dtype=torch.int32,
                     out=counts[1:])
        return counts
    return kept_on(cu if used is None else used, "_mpt_attention_packed_tiles", tiles, on_device=True)


_UNPLANNED = object()


def packed_rows_launch(kernel, shape, n_seq: int):
    """The launch of a kernel over a packed ``(T, H, D)`` tensor's rows in ``n_seq`` sequences, 64 rows per program,
    each row's sequence found by bisection (``common.clear_unused_rows_kernel``, ``common.dq_from_sums_kernel``), and
    its scalar arguments after the strides."""
    n_rows, n_heads, head_dim = shape
    return (PlannedLaunch(kernel, (cdiv(n_rows, 64),), dict(BLOCK_ROWS=64, BLOCK_D=next_power_of_2(head_dim))),
            (n_rows, n_seq, n_heads, head_dim, bisection_steps(n_seq)))


def clear_unused_rows_launch(shape, n_seq: int):
    """``clear_unused_rows``' launch (``packed_rows_launch``) for a packed tensor of ``shape`` in ``n_seq`` sequences,
    or None where there is nothing to clear (a forward plan keeps it)."""
    return None if shape[0] == 0 or n_seq == 0 else packed_rows_launch(clear_unused_rows_kernel, shape, n_seq)


def bisection_steps(n_seq: int) -> int:
    """Halvings that find a packed row's sequence among ``n_seq`` (``common.packed_rows_used``)."""
    return max(1, math.ceil(math.log2(n_seq + 1)))


def clear_unused_rows(x: torch.Tensor, cu: torch.Tensor, ends: torch.Tensor, planned=_UNPLANNED) -> None:
    """Zeros into the rows of a packed ``(T, H, D)`` tensor past each sequence's used ones (``ends``:
    ``masks.sequence_ends``), in place (``common.clear_unused_rows_kernel``); ``planned``:
    ``clear_unused_rows_launch`` for x's shape where the caller keeps it."""
    if planned is _UNPLANNED:
        planned = clear_unused_rows_launch(x.shape, cu.numel() - 1)
    if planned is not None:
        launch, scalars = planned
        launch(x, cu, ends, x.stride(0), x.stride(1), *scalars)


def packed_kind(varlen: bool, seqused: bool) -> int:
    """The kernels' ``VARLEN``: 0 dense, ``hopper_tiles.PACKED``, or ``PACKED_USED`` with unused rows (or with
    ``PACKED_CLEARS``)."""
    return (2 if seqused or PACKED_CLEARS else 1) if varlen else 0


def raw_scores(softmax_scale, bias, alibi_mode) -> bool:
    """Whether the Hopper forward takes each row's maximum over unscaled scores and folds the scale into the
    exponentials' fused multiply-adds (``hopper_forward``'s ``RAW``): a positive scale (the maximum of the scaled
    scores is then the scaled maximum; a zero scale would make masked scores NaN), and per-key terms that a
    tensor-core product can add to the unscaled scores (``hopper_scores``): none, causal ALiBi, or a bias row without
    ALiBi (its terms from ``common.row_keys_kernel``; for scales above 2^-26, so that its soft mask's power of 2,
    ``soft_row_key``, fits bfloat16)."""
    if not softmax_scale > 0 or alibi_mode == 2:
        return False
    if bias is None:
        return True
    return bias.shape[2] == 1 and alibi_mode == 0 and softmax_scale * LOG2E > 2.0 ** -26


def forward_consumers(width: int, varlen: bool, raw: bool) -> int:
    """Consumer warpgroups of the Hopper forward, each of 64 query rows of a tile (``hopper_forward``'s ``CONSUMERS``):
    three at tile width 64 with maxima over unscaled scores (``raw_scores``), FA3's 192-row tiles there: one more warp
    per scheduler hides more of the softmax's latency (a dense D64 forward 1.02-1.11x against two, benchmarks/NOTES.md
    session 36). Otherwise two: at width 128 a third would not fit the register file; the scaled form holds per-key
    terms in registers (a bias row, symmetric ALiBi) and spills at three's 160 registers per thread (symmetric ALiBi
    ran 0.76x); a bias matrix's boxes fill shared memory; packed sequences count their tiles in 128 rows."""
    return 3 if width == 64 and raw and not varlen else 2


def soft_row_key(qk_scale2: float) -> float:
    """What a soft-masked key's term becomes in ``common.row_keys_kernel`` (unscaled units): -2^100 over the largest
    power of 2 not above the scale, a power of 2 whose product with the scale (the row's maximum if every key it sees
    is soft-masked, in [-2^101, -2^100)) is exact; ``hopper_forward`` reads such a maximum as SOFT_SCORE."""
    return -math.ldexp(1.0, 100 - math.floor(math.log2(qk_scale2)))


class ForwardPlan(NamedTuple):
    """What the Hopper forward's launch takes from its inputs' signature (``forward_plan``). ``descs``: the static
    part (shape, strides, box, layout) of the descriptors of q, k, v and out, then the bias's (None without one);
    ``scalars``: the launch's arguments after its tensors."""
    out_shape: tuple
    lse_shape: tuple
    counters: int
    descs: tuple
    scalars: tuple
    launch: PlannedLaunch
    row_keys: tuple | None = None
    norms: tuple | None = None  # (PlannedLaunch, its scalars) of ``row_norm_max_kernel`` (``reach_applies``)
    row_table: tuple | None = None  # the same of ``row_reach_kernel`` (``REACH_ROW``)
    clear: tuple | None = None  # ``clear_unused_rows_launch`` of the output (packed sequences with unused rows)
    table: tuple | None = None  # (first word, words) of the table the kernel writes (``TABLE``) in ``Tiles``
    row_terms: tuple | None = None  # (qk_scale2, soft term) of ``reach.row_block_terms`` (``TABLE`` from a bias row)


def reach_applies(bias, slopes, causal, alibi_mode, norm_rows, s_k, training: bool = False) -> int:
    """Whether the Hopper kernels skip key blocks past causal ALiBi's reach (``reach.py``), and from what: 0 (no),
    ``REACH_SLOPES`` (MPT's causal ALiBi from slopes alone) or ``REACH_ROW`` (a bias row over the keys without
    slopes, e.g. MPT's (1, H, 1, S_k) ALiBi tensor; a bias matrix could raise any key of any row). Causal inputs, at
    least ``REACH_MIN_KEYS`` keys (packed sequences: in the longest; half as many in a ``training`` step: the
    backward, and a forward whose norms the backward takes), and ``norm_rows`` rows of norm maxima that the
    norms' grid takes (its third axis): the batch, or 1 for packed sequences (``reach.norm_row``)."""
    if not causal or s_k < (REACH_MIN_KEYS // 2 if training else REACH_MIN_KEYS) or norm_rows > 65535:
        return 0
    if alibi_mode == 1 and slopes is not None and bias is None:
        return REACH_SLOPES
    if alibi_mode == 0 and bias is not None and bias.shape[2] == 1:
        return REACH_ROW
    return 0


def forward_table_applies(bias, slopes, causal, alibi_mode, raw, s_k, training, varlen, seqused,
                          row_table: bool = True) -> bool:
    """Whether a Hopper forward writes the table of its rows' first key blocks within reach for its training step's
    backward (``TABLE``; ``FORWARD_TABLE``): dense and causal, with unscaled maxima (``raw_scores``), ALiBi from
    slopes alone or a bias row over the keys alone (``ROW_KEYS``; at most ``BLOCK_N`` key blocks, the table's
    search; not with ``row_table`` False: a key padding mask's row, ``launch.forward``), over
    ``REACH_MIN_KEYS // 4`` to ``3 * REACH_MIN_KEYS // 4`` keys. The forward then reads every block (from
    ``REACH_MIN_KEYS // 2`` keys instead of the norms' reach, ``reach_applies``)."""
    if bias is None:
        terms = alibi_mode == 1 and slopes is not None
    else:
        terms = (row_table and alibi_mode == 0 and slopes is None and bias.shape[2] == 1
                 and cdiv(s_k, BLOCK_N) <= BLOCK_N)
    return bool(FORWARD_TABLE and training and causal and raw and terms and not varlen and not seqused
                and REACH_MIN_KEYS // 4 <= s_k < 3 * (REACH_MIN_KEYS // 4))


def forward_plan(q, k, v, bias, slopes, softmax_scale, causal, alibi_mode, cu_q=None, max_q=0, max_k=0,
                 seqused: bool = False, training: bool = False, row_table: bool = True) -> ForwardPlan:
    """The Hopper forward's launch for inputs as ``forward`` takes them: a function of their signature alone
    (shapes, strides, dtypes, 16-byte alignment, the scalars; for packed sequences ``cu_q``'s size, the longest
    lengths and whether some rows are unused, ``seqused``; ``training``: the backward takes this forward's norm
    maxima, ``reach_applies``), not of their data or addresses, so ``launch.forward`` keeps one per signature."""
    varlen = cu_q is not None
    bias_full = bias is not None and bias.shape[2] != 1
    raw = raw_scores(softmax_scale, bias, alibi_mode)
    row_keys = raw and bias is not None
    bias_row = bias is not None and not bias_full and not row_keys
    width = tile_dim(q.shape[-1])
    consumers = forward_consumers(width, varlen, raw)
    if varlen:  # the packed tensors as one batch row (1, T, H, D); a grid row per (sequence, head)
        n_tokens, n_heads, head_dim = q.shape
        n_kv, batch, s_q, s_k = k.shape[1], cu_q.numel() - 1, max_q, max_k
        lse_shape, lse_strides = (n_heads, n_tokens), (0, n_tokens)
        group = packed_heads_per_group(n_heads, 2 * max_k * head_dim * q.element_size() * n_kv / n_heads)
        n_tiles = (cdiv(n_tokens, BLOCK_M) + batch) * n_heads  # at most
    else:
        batch, s_q, n_heads, head_dim = q.shape
        s_k, n_kv = k.shape[1], k.shape[2]
        lse_shape, lse_strides = (batch, n_heads, s_q), (n_heads * s_q, s_q)
        n_tiles = cdiv(s_q, HALF_M * consumers) * batch * n_heads
        group = heads_per_group(k, n_heads, batch * n_heads)
    out_shape = tuple(q.shape)  # contiguous
    out_strides = [q.shape[-3] * n_heads * head_dim, n_heads * head_dim, head_dim, 1]  # as a (B|1, S|T, H, D) row
    descs = [(*rows_view(x, varlen), [1, rows, 1, width], TILE_LAYOUT)
             for x, rows in ((q, HALF_M), (k, BLOCK_N), (v, BLOCK_N))]
    descs.append(([1, *out_shape] if varlen else list(out_shape), out_strides, [1, HALF_M, 1, width], TILE_LAYOUT))
    bias_desc, b_on, h_on, keys = None, 0, 0, None
    qk_scale2 = softmax_scale * LOG2E
    if row_keys:  # the row's per-key terms (row_keys_kernel), read with K in [1, 1, BLOCK_N, 16] boxes
        b_on, h_on = bias_dims_on(bias)
        shape = [bias.shape[0] if b_on else 1, bias.shape[1] if h_on else 1, bias.shape[3], 16]
        bias_desc = (shape, [shape[1] * shape[2] * 16, shape[2] * 16, 16, 1], [1, 1, BLOCK_N, 16], _ROW_KEYS_LAYOUT)
        block = min(256, max(16, next_power_of_2(shape[2])))
        keys = (tuple(shape), PlannedLaunch(row_keys_kernel, (cdiv(shape[2], block), shape[1], shape[0]),
                                            dict(BLOCK=block)),
                (bias.stride(0) * b_on, bias.stride(1) * h_on, shape[2], qk_scale2, soft_row_key(qk_scale2)))
    elif bias_full:  # in q's dtype, read in [64, BLOCK_N] boxes, one per consumer warpgroup
        shape, strides, b_on, h_on = bias_matrix_view(bias)
        bias_desc = (shape, strides, [1, HALF_M, BLOCK_N], MATRIX_LAYOUT)
    elif bias is not None:  # launch.forward has converted it (launch._log2_bias_rows): float32, aligned rows
        shape, strides, b_on, h_on = bias_row_view(bias)
        bias_desc = (shape, strides, [1, 1, BLOCK_N], _BIAS_ROW_LAYOUTS[8 * bias.element_size()])
    descs.append(bias_desc)
    # Persistent: a program's registers fill an SM (ncu: one per SM), so one program per SM at most, taking
    # tiles until none is left. ``tiles``: [0] counts the tiles taken after the first round; from 16 on, PROGRAM_WORDS
    # per program for the coordinates the loader publishes to the consumers (hopper_tiles.info_slot).
    grid = (max(1, min(n_tiles, sm_count(q.device.index))),)
    # packed sequences: one row of norm maxima per head over every token (reach.norm_row); s_k the longest sequence.
    # (not with unused rows, which may hold anything)
    table = forward_table_applies(bias, slopes, causal, alibi_mode, raw, s_k, training, varlen, seqused, row_table)
    slope_strides, row_terms = slope_args(slopes, None)[1], None
    if table and bias is not None:  # the row's block terms (reach.row_block_terms) in the slopes' place
        n_kb = cdiv(s_k, BLOCK_N)
        slope_strides = (bias.shape[1] * 2 * n_kb * b_on, 2 * n_kb * h_on)
        row_terms = (qk_scale2, soft_row_key(qk_scale2))
    scalars = (*lse_strides, *slope_strides, out_strides[1], out_strides[2], n_heads, n_heads // n_kv,
               batch * n_heads, s_q, s_k, qk_scale2, b_on, h_on, group, head_dim)
    reach = 0 if seqused or table else reach_applies(bias, slopes, causal, alibi_mode, 1 if varlen else batch, s_k,
                                                     training)
    launch = PlannedLaunch(_hopper_fwd_kernel, grid, dict(
        IS_CAUSAL=causal, ALIBI=alibi_mode, BLOCK_N=BLOCK_N, HEAD_DIM=width,
        BIAS_ROW=bias_row, TAIL=forward_tail(head_dim), QK_COLS=qk_cols(head_dim), BIAS_FULL=bias_full,
        VARLEN=packed_kind(varlen, seqused), RAW=raw, ROW_KEYS=row_keys, CONSUMERS=consumers, REACH=reach, num_warps=4,
        **({"TABLE": True} if table else {})))
    counters = 16 + grid[0] * PROGRAM_WORDS
    norms = row_table = None
    if table:  # per (batch, head) and 64 query rows, after the program slots (hopper_loaders.forward_loader)
        table = (counters, batch * n_heads * cdiv(s_q, HALF_M))
        counters += table[1]
    if reach:  # the heads' norm maxima after the program slots (hopper_tiles.reach_first_block): q's, then k's
        norms = norm_launch(q, k, counters)
        counters += norms[2]
    if reach == REACH_ROW:  # then each tile's first key block (hopper_tiles.row_reach_first_block)
        n_m = cdiv(s_q, HALF_M * consumers)
        row_table = row_reach_launch(bias, bias_dims_on(bias), q, k, qk_scale2, n_m, HALF_M * consumers, BLOCK_N,
                                     norms[1][-1], counters, False)
        counters += batch * n_heads * (n_m + 1)  # (and the row's end: hopper_tiles.row_reach_end_block)
    clear = clear_unused_rows_launch(out_shape, batch) if varlen and seqused else None
    return ForwardPlan(out_shape, lse_shape, counters, tuple(descs), scalars, launch, keys, norms, row_table, clear,
                       table or None, row_terms)


def run_forward(plan: ForwardPlan, q, k, v, bias, slopes, cu_q=None, cu_k=None, reach_norms: dict | None = None,
                used_q=None, used_k=None):
    """``out`` and ``lse`` of inputs of ``plan``'s signature (``forward``). ``reach_norms``: where the reach applies,
    receives the heads' norm maxima under ``"norms"`` (a view of this call's buffer) for the backward of the same
    q and k (``run_dkdv``), and where the kernel writes the table of its rows' first key blocks (``TABLE``), that
    under ``"table"``. ``used_q``, ``used_k``: as ``forward``."""
    device = q.device
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=device)
    if used_q is None:
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=device)
    else:  # the kernel writes the used rows (the unused ones' output: clear_unused_rows below)
        lse = torch.full(plan.lse_shape, float("-inf"), dtype=torch.float32, device=device)
    tiles = torch.zeros(plan.counters, dtype=torch.int32, device=device)
    if cu_q is not None:
        cu_tiles = packed_tiles(cu_q, used_q)
        ends_q, ends_k = sequence_ends(cu_q, used_q), sequence_ends(cu_k, used_k)
    else:
        cu_q = cu_k = cu_tiles = ends_q = ends_k = tiles  # never read
    dq, dk, dv, do, db = plan.descs
    rows = bias  # (the converted row, before row_keys)
    prefix = None if plan.row_table is None else row_prefix_max(rows)
    if plan.row_keys is not None:  # the bias row as its per-key terms (row_keys_kernel)
        shape, convert, args = plan.row_keys

        def row_keys(rows=bias):
            keys = torch.empty(shape, dtype=torch.bfloat16, device=device)
            convert(rows, keys, *args)
            return keys
        # kept on the converted row, itself kept on the caller's bias (launch._log2_bias_rows): made once for a
        # model's layers, which share MPT's bias row
        bias = kept_on(bias, "_mpt_attention_row_keys", row_keys, key=args, on_device=True)
    if plan.norms is not None:
        norms, args, n_words = plan.norms
        norms(q, k, tiles, *args)
        if reach_norms is not None:
            first = args[-1]
            reach_norms["norms"] = tiles[first:first + n_words]
    if plan.row_table is not None:
        table, args = plan.row_table
        table(tiles, prefix, rows, row_ends(rows, BLOCK_N), tiles, *args)
    slope_terms = lse if slopes is None else slopes  # (never read without slopes or a row's table)
    if plan.row_terms is not None:
        slope_terms = row_block_terms(rows, *plan.row_terms, BLOCK_N)
    plan.launch(descriptor(q, *dq), descriptor(k, *dk), descriptor(v, *dv), descriptor(out, *do),
                None if db is None else descriptor(bias, *db), lse, slope_terms, tiles,
                out, cu_q, cu_k, ends_q, ends_k, cu_tiles, *plan.scalars)
    if plan.table is not None and reach_norms is not None:
        first, n_words = plan.table
        reach_norms["table"] = tiles[first:first + n_words]
    if used_q is not None:
        clear_unused_rows(out, cu_q, ends_q, plan.clear)
    return out, lse


def forward(q, k, v, bias, slopes, softmax_scale, causal, alibi_mode, cu_q=None, cu_k=None, max_q=0, max_k=0,
            reach_norms=None, used_q=None, used_k=None, row_table: bool = True):
    """``out`` (q's shape, contiguous) and ``lse`` ``(B, H, S_q)`` float32; inputs as ``unsupported`` allows.
    Packed sequences (``cu_q``, ``cu_k``: int32 cumulative lengths, the longest ``max_q``/``max_k``): q, k, v
    ``(T, H, D)``, ``lse`` ``(H, T_q)``; ``used_q``/``used_k`` (int32 ``(B,)``, FA3's ``seqused``, or None): only
    each sequence's first ``used[b]`` rows take part, the rest are never read (output 0, log-sum-exp -inf), and
    ``max_q``/``max_k`` bound the used lengths. ``reach_norms``: as ``run_forward`` takes it (given, the call is a
    training step's: ``reach_applies``); ``row_table``: as ``forward_table_applies`` takes it. The plan is built for
    this call (``launch.forward`` keeps them)."""
    plan = forward_plan(q, k, v, bias, slopes, softmax_scale, causal, alibi_mode, cu_q, max_q, max_k,
                        used_q is not None or used_k is not None, reach_norms is not None, row_table)
    return run_forward(plan, q, k, v, bias, slopes, cu_q, cu_k, reach_norms, used_q, used_k)
