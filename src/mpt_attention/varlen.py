"""Packed sequences of different lengths, :func:`attention_varlen`: :func:`mpt_attention.attention`'s semantics on
each sequence, validated here and dispatched as ``api.attention`` dispatches (no silent fallback).

Shape legend: T_q, T_k total query / key rows over the batch, B number of sequences, H_q query heads, H_kv key/value
heads, D head dim.
"""

from __future__ import annotations

import torch

from mpt_attention import ops
from mpt_attention.api import _check_aux, _check_triton_grid, _validate
from mpt_attention.impl import reference, sdpa
from mpt_attention.kept import kept_on

__all__ = ["attention_varlen"]


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    backend: str,
    causal: bool = False,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    deterministic: bool | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
):
    """:func:`attention` over a batch of sequences of different lengths, packed without padding.

    Sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of ``q`` and rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of ``k``/``v``; each attends only within itself, with the
    semantics of :func:`attention` on that sequence alone (causal aligned to its own bottom-right
    corner, ALiBi from its own positions). No padded row is stored or computed, so a batch with half
    its tokens padding costs about half (``mpt_attention.padding.unpad`` packs a padded batch).

    With ``seqused_q``/``seqused_k`` (FA3's arguments) only the first ``seqused[b]`` rows of sequence ``b`` take
    part: a right-padded batch ``(B, S, H, D)`` runs flattened to ``(B * S, H, D)`` with ``cu_seqlens = b * S``
    and its lengths as ``seqused`` (``padding.right_padded``), without gathering its rows; a static KV cache
    gives its filled lengths as ``seqused_k``. The other rows are never read (they may hold anything), their
    output is 0, their log-sum-exp -inf and their gradients 0. On the ``triton`` backend these calls take the Hopper
    kernels where they apply (which zero such rows in shared memory where a block reaches them), else the general
    kernels (which never load them).

    Args:
        q: ``(T_q, H_q, D)``; k, v: ``(T_k, H_kv, D)``; T = total tokens over the batch.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)``, 0 first, non-decreasing, ``T_q``/``T_k`` last.
        max_seqlen_q, max_seqlen_k: the longest sequence (at least); ``None`` reads it from the
            lengths (a device sync; pass them under ``torch.compile``).
        alibi_slopes: float ``(H_q,)`` or ``(B, H_q)``.
        deterministic: as for :func:`attention`.
        seqused_q, seqused_k: int32 ``(B,)``, at most each sequence's length, or None (every row).

    Returns:
        ``out (T_q, H_q, D)``, and with ``return_lse`` also ``lse (H_q, T_q)`` float32.
    """
    if not torch.compiler.is_compiling():
        max_seqlen_q, max_seqlen_k = _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, alibi_slopes, seqused_q, seqused_k)
        # the per-sequence checks of attention(), on one sequence's worth of shapes
        one_row = None if alibi_slopes is None or alibi_slopes.numel() == 0 else alibi_slopes.reshape(-1, q.shape[1])[0]
        _validate(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), backend, causal, softmax_scale, one_row,
                  None, None, None, None, dropout_p, return_lse)
        if backend == "triton":
            _check_triton_grid(cu_seqlens_q.numel() - 1, q.shape[1])
    elif max_seqlen_q is None or max_seqlen_k is None:
        raise ValueError("attention_varlen under torch.compile needs max_seqlen_q and max_seqlen_k")
    if backend == "triton":
        out, lse = ops.triton_attention(
            q, k, v, causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            seqused_q=seqused_q, seqused_k=seqused_k, deterministic=deterministic, return_lse=return_lse,
        )
        return (out, lse) if return_lse else out
    # torch and sdpa: one call per sequence (readable, not fast; reads the lengths on the host)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    ends_q = cu_q[1:] if seqused_q is None else [a + u for a, u in zip(cu_q, seqused_q.tolist())]
    ends_k = cu_k[1:] if seqused_k is None else [a + u for a, u in zip(cu_k, seqused_k.tolist())]
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        rows_q, rows_k = slice(cu_q[b], ends_q[b]), slice(cu_k[b], ends_k[b])
        kwargs = dict(causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                      alibi_slopes=alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b])
        one = (q[rows_q][None], k[rows_k][None], v[rows_k][None])
        if backend == "torch":
            out, lse = reference.attention(*one, return_lse=True, **kwargs)
            lses.append(lse[0])
        else:
            out = sdpa.attention(*one, **kwargs)
        outs.append(out[0])
        unused = cu_q[b + 1] - ends_q[b]
        if unused:  # rows past the used ones: output 0, log-sum-exp -inf
            outs.append(q.new_zeros((unused, *q.shape[1:])))
            if backend == "torch":
                lses.append(q.new_full((q.shape[1], unused), float("-inf"), dtype=torch.float32))
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    if not return_lse:
        return out
    return out, (torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32))


def _validate_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, used_q=None, used_k=None):
    """Shape/dtype/device checks of the packed inputs and the lengths; returns the max lengths."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention_varlen: {name} must be a 3-D packed tensor (T, H, D), got {got}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        _check_aux(name, cu, q.device)
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be int32 (B + 1,) cumulative lengths, got {cu.dtype} {tuple(cu.shape)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {cu_q.numel() - 1} and {cu_k.numel() - 1}")
    batch = cu_q.numel() - 1
    maxes = []
    sides = (("q", cu_q, used_q, q.shape[0], max_q), ("k", cu_k, used_k, k.shape[0], max_k))
    for side, cu, used, total, given in sides:
        first, last, shortest, longest = _length_stats(cu)
        if first != 0 or last != total or shortest < 0:
            raise ValueError(f"cu_seqlens_{side} must start at 0, never decrease and end at the packed length "
                             f"{total}, got {cu.tolist() if cu.numel() <= 16 else f'first {first}, last {last}'}")
        what = "the longest sequence"
        if used is not None:
            _check_aux(f"seqused_{side}", used, q.device)
            if used.dtype != torch.int32 or tuple(used.shape) != (batch,):
                raise ValueError(f"seqused_{side} must be int32 (B,)=({batch},) (B = number of sequences), got "
                                 f"{used.dtype} {tuple(used.shape)}")
            fewest, spare, longest = _used_stats(used, cu)
            if fewest < 0 or spare < 0:
                raise ValueError(f"seqused_{side} must be between 0 and each sequence's length (cu_seqlens[b + 1] - "
                                 f"cu_seqlens[b]), got {used.tolist() if batch <= 16 else f'smallest {fewest}'}"
                                 + ("" if spare >= 0 else f", {-spare} past a sequence's end"))
            what = "the most rows a sequence uses"
        if given is not None and (not isinstance(given, int) or given < longest):
            raise ValueError(f"max_seqlen_{side}={given!r} is shorter than {what} ({longest})")
        maxes.append(longest if given is None else given)
    if alibi_slopes is not None:
        n_heads = q.shape[1]
        _check_aux("alibi_slopes", alibi_slopes, q.device)
        if tuple(alibi_slopes.shape) not in ((n_heads,), (batch, n_heads)):
            raise ValueError(f"alibi_slopes must be (H_q,)=({n_heads},) or (B, H_q)=({batch}, {n_heads}) "
                             f"(B = number of sequences), got {tuple(alibi_slopes.shape)}")
    return maxes[0], maxes[1]


def _length_stats(cu: torch.Tensor) -> tuple[int, int, int, int]:
    """(first, last, shortest, longest) of cumulative lengths: one device-to-host copy (a sync), kept on
    the tensor until it is modified (``kept.kept_on``), so a model's layers sharing one ``cu_seqlens`` pay it
    once. Tensors made under ``torch.inference_mode`` have no version counter to tell: those are checked every
    call."""
    def stats():
        c = cu.long()
        lengths = c.diff() if c.numel() > 1 else c.new_zeros(1)
        return tuple(torch.stack([c[0], c[-1], lengths.min(), lengths.max()]).tolist())
    return kept_on(cu, "_mpt_attention_length_stats", stats)


def _used_stats(used: torch.Tensor, cu: torch.Tensor) -> tuple[int, int, int]:
    """(fewest used rows, fewest spare rows (length - used), most used rows): one sync, kept on ``used`` per ``cu``
    and its version as ``_length_stats`` keeps the lengths; made every call where ``cu`` is an inference tensor (no
    version counter tells its changes)."""
    def stats():
        used64 = used.long()
        spare = cu.diff().long() - used64
        return tuple(torch.stack([used64.min(), spare.min(), used64.max()]).tolist()) if used.numel() else (0, 0, 0)
    if cu.is_inference():
        return stats()
    return kept_on(used, "_mpt_attention_used_stats", stats, key=(cu.data_ptr(), cu._version))
