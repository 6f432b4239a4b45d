"""Between a padded batch and the packed (varlen) layout of :func:`mpt_attention.attention_varlen`.

Shape legend: B batch, S padded length, T live tokens in the whole batch, ``...`` any trailing dims.
"""

from __future__ import annotations

import torch

__all__ = ["cu_seqlens_from_sequence_id", "pad", "right_padded", "unpad"]


def unpad(x: torch.Tensor, keep: torch.Tensor):
    """Pack the live rows of a padded batch.

    Args:
        x: ``(B, S, ...)``.
        keep: bool ``(B, S)``, True = a real token (any positions: left, right or scattered padding).

    Returns:
        ``packed (T, ...)``, ``indices`` int64 ``(T,)`` into the flattened ``B * S`` rows,
        ``cu_seqlens`` int32 ``(B + 1,)`` and ``max_seqlen`` (an int: one device sync).
    """
    if keep.dtype != torch.bool or keep.shape != x.shape[:2]:
        raise ValueError(f"keep must be bool (B, S)={tuple(x.shape[:2])}, got {keep.dtype} {tuple(keep.shape)}")
    lengths = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    return x.flatten(0, 1).index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad`: ``(T, ...)`` back to ``(B, S, ...)`` with zeros in the padding."""
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_copy(0, indices, packed)
    return out.view(batch, seqlen, *packed.shape[1:])


def right_padded(keep: torch.Tensor):
    """A right-padded batch as :func:`mpt_attention.attention_varlen` takes it without moving its rows: each batch row
    one sequence of the flattened ``(B * S, ...)`` tensors, of which only the first ``seqused`` rows take part.

    Args:
        keep: bool ``(B, S)``, True = a real token; each row's real tokens first (MPT trains this way).

    Returns:
        ``cu_seqlens`` int32 ``(B + 1,)`` (``b * S``), ``seqused`` int32 ``(B,)`` and ``max_seqlen`` (an int: one
        device sync, which also checks the padding). Pass ``cu_seqlens`` and ``seqused`` for both q and k (and
        ``max_seqlen`` for both) with ``x.flatten(0, 1)``; the output's padded rows are 0.

    Raises:
        ValueError: ``keep`` is not bool ``(B, S)``, or a row has a real token after a padded one (use :func:`unpad`).
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be bool (B, S), got {keep.dtype} {tuple(keep.shape)}")
    batch, seq = keep.shape
    used = keep.sum(dim=1, dtype=torch.int32)
    prefix = torch.arange(seq, device=keep.device)[None, :] < used[:, None]
    longest, ok = (torch.stack([used.max().long(), (keep == prefix).all().long()]).tolist() if batch * seq
                   else (0, 1))
    if not ok:
        raise ValueError("keep has a real token after a padded one in some row: not right padding "
                         "(padding.unpad packs any padding)")
    cu_seqlens = torch.arange(batch + 1, device=keep.device, dtype=torch.int32) * seq
    return cu_seqlens, used, longest


def cu_seqlens_from_sequence_id(sequence_id: torch.Tensor):
    """Cumulative lengths of packed sequences, for ``attention_varlen`` on ``x.flatten(0, 1)``.

    Each maximal run of equal ids in a batch row is one sequence (a row boundary always starts a new
    one). For packed data, where every id occupies one run, ``attention_varlen`` on the flattened
    tensors gives what ``attention(..., sequence_id=sequence_id)`` gives, at varlen speed; an id that
    comes back after another one would be one sequence for ``attention`` and two here.

    Args:
        sequence_id: integer ``(B, S)``.

    Returns:
        ``cu_seqlens`` int32 ``(N + 1,)`` over the ``B * S`` flattened positions and ``max_seqlen``
        (an int: one device sync).
    """
    if sequence_id.dim() != 2 or sequence_id.is_floating_point() or sequence_id.dtype == torch.bool:
        raise ValueError(f"sequence_id must be an integer (B, S) tensor, got {sequence_id.dtype} "
                         f"{tuple(sequence_id.shape)}")
    batch, seq = sequence_id.shape
    starts = torch.ones_like(sequence_id, dtype=torch.bool)
    starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
    first = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.cat([first, first.new_full((1,), batch * seq)]).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max().item()) if cu_seqlens.numel() > 1 else 0
    return cu_seqlens, max_seqlen
