"""Between a padded batch and the packed (varlen) layout of :func:`mpt_attention.attention_varlen`.

Shape legend: B batch, S padded length, T live tokens in the whole batch, ``...`` any trailing dims.
"""

from __future__ import annotations

import torch

__all__ = ["pad", "unpad"]


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
