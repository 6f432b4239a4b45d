"""MPT's packed rows (``attention(..., sequence_id=...)``) on the triton backend as packed sequences.

A batch row holding several sequences, each id one run of positions, is what ``attention_varlen`` computes on
the flattened ``(B * S, H, D)`` tensors: a key of another sequence is masked either way, causal alignment and
ALiBi distances within a run are the run's own (MPT's causal ALiBi, ``slope * (j - (S - 1))``, differs from
the run's ``slope * (j - (end - 1))`` by a constant per row, which the softmax drops and the log-sum-exp gets
back below). The packed kernels skip what the masked dense ones must still walk tile by tile, and on an H100/H200
they are the Hopper kernels, which take no ``sequence_id``: forward+backward of packed sequences ran 1.25-1.5x
the general kernels (``benchmarks/varlen.py``, benchmarks/NOTES.md session 28).

Taken only where exact and known to be faster, so results never depend on it beyond rounding: ``S_q == S_k``;
no bias, key padding, prefix mask or dropout; ids non-decreasing along each row (so each id is one run); q, k, v
viewable as ``(B * S, H, D)``; eager, outside CUDA-graph capture (the runs are read on the host: one device sync
per ``sequence_id`` tensor, kept on it until it is modified); and the Hopper forward takes the packed inputs.
Rows that each hold one sequence mask nothing: those run dense, without ``sequence_id``.
"""

from __future__ import annotations

import torch

from mpt_attention import ops

ROUTE: bool | None = None  # None: as above; True: whenever exact (CPU tests, through the general kernels); False: never
_MAX_SEQUENCES = 65535  # api._TRITON_MAX_BATCH_OR_HEADS


def attention(q, k, v, *, causal, softmax_scale, alibi_slopes, attn_bias, key_padding_mask, sequence_id,
              prefix_mask, dropout_p, deterministic, return_lse):
    """``(out, lse or None)`` of the triton backend computed as packed sequences, or None where the caller's
    dense path runs (validated inputs of :func:`mpt_attention.attention`)."""
    if ROUTE is False or sequence_id is None or attn_bias is not None or key_padding_mask is not None \
            or prefix_mask is not None or dropout_p > 0.0 or q.shape[1] != k.shape[1]:
        return None
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    batch, seq, n_heads, head_dim = q.shape
    flat = [_flat_view(x) for x in (q, k, v)]
    if any(x is None for x in flat) or batch * seq == 0:
        return None
    if ROUTE is None and not _hopper_forward_takes(flat, causal, seq):
        return None
    runs = _runs(sequence_id)
    if runs is None:
        return None
    cu, max_len, seq_rows, end_shift = runs
    if cu.numel() - 1 > _MAX_SEQUENCES:  # the general kernels' grid has a sequence axis
        return None
    if cu.numel() - 1 == batch:  # one sequence per row: nothing is masked
        return ops.triton_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                                    deterministic=deterministic, return_lse=return_lse)
    slopes = alibi_slopes
    if slopes is not None and slopes.dim() == 2:  # (B, H): each sequence its row's
        slopes = slopes.index_select(0, seq_rows)
    out, lse = ops.triton_attention(*flat, causal=causal, softmax_scale=softmax_scale, alibi_slopes=slopes,
                                    cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                                    deterministic=deterministic, return_lse=return_lse)
    out = out.view(batch, seq, n_heads, head_dim)
    if not return_lse:
        return out, None
    lse = lse.view(n_heads, batch, seq).transpose(0, 1)
    if alibi_slopes is not None and causal:  # the dense row's ALiBi is the run's plus slope * (end - S)
        lse = lse + alibi_slopes.float().view(-1, n_heads, 1) * end_shift.unsqueeze(1)
    return out, lse.contiguous()


def _flat_view(x: torch.Tensor):
    """``x`` (B, S, H, D) as (B * S, H, D) without a copy, or None."""
    batch, seq = x.shape[:2]
    if batch > 1 and seq > 1 and x.stride(0) != seq * x.stride(1):
        return None
    return x.view(batch * seq, *x.shape[2:])


def _hopper_forward_takes(flat, causal, seq) -> bool:
    if not flat[0].is_cuda:
        return False
    from mpt_attention.impl.triton import hopper

    return hopper.unsupported(*flat, None, None, None, None, 0.0, causal, True, max_q=seq) is None


def _runs(sequence_id: torch.Tensor):
    """``(cu_seqlens, longest, each sequence's batch row, end shift)`` of the runs of equal ids over the flattened
    positions, or None if some row's ids decrease (an id might come back: not one run). ``end shift`` (B, S)
    float32: the end of the position's run less S (at most 0). One host read (a device sync) per tensor version."""
    tracked = not sequence_id.is_inference()
    cached = getattr(sequence_id, "_mpt_attention_runs", None) if tracked else None
    if cached is not None and cached[0] == sequence_id._version:
        return cached[1]
    batch, seq = sequence_id.shape
    ids = sequence_id.long()
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = starts.flatten()
    positions = torch.arange(batch * seq, device=ids.device)
    run_start = torch.cummax(torch.where(starts, positions, 0), 0).values  # each position's run's first
    in_order = (ids[:, 1:] >= ids[:, :-1]).all() if seq > 1 else torch.ones((), dtype=torch.bool, device=ids.device)
    # the one host read: whether each row's ids are sorted, how many runs, the longest
    ordered, n_runs, longest = torch.stack([in_order.long(), starts.sum(), (positions - run_start).max() + 1]).tolist()
    runs = None
    if ordered:
        first = torch.nonzero_static(starts, size=n_runs).flatten()
        cu = torch.cat([first, first.new_full((1,), batch * seq)])
        run_of = torch.cumsum(starts.long(), 0) - 1
        ends = cu[1:].index_select(0, run_of).view(batch, seq)
        row_ends = torch.arange(1, batch + 1, device=ids.device).view(batch, 1) * seq
        runs = (cu.to(torch.int32), longest, torch.div(first, seq, rounding_mode="floor"), (ends - row_ends).float())
    if tracked:
        sequence_id._mpt_attention_runs = (sequence_id._version, runs)
    return runs
