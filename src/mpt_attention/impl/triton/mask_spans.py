"""Where masks leave tiles nothing to do, found on the host side before the general kernels run: the keys a query
tile's sequences span (``sequence_id``), the queries a key block's sequences span, each batch row's live keys
(``key_padding_mask``), and packed sequences' first and end rows. All on the device, without a synchronisation.
"""

import torch

from mpt_attention.masks import sequence_ends


def sequence_spans(seqid: torch.Tensor):
    """Per position, the [start, end) of its sequence, and whether each batch row's ids are sorted.

    Packed sequences have non-decreasing ids, so a tile only needs the keys its own sequences span;
    unsorted ids get the whole range. Computed on the device (no synchronisation).
    """
    batch, s_k = seqid.shape
    idx = torch.arange(s_k, device=seqid.device)
    new_seq = torch.ones_like(seqid, dtype=torch.bool)
    new_seq[:, 1:] = seqid[:, 1:] != seqid[:, :-1]
    last_of_seq = torch.ones_like(new_seq)
    last_of_seq[:, :-1] = new_seq[:, 1:]
    start = torch.cummax(torch.where(new_seq, idx, 0), dim=1).values
    end = torch.cummin(torch.where(last_of_seq, idx + 1, s_k).flip(1), dim=1).values.flip(1)
    ordered = (seqid[:, 1:] >= seqid[:, :-1]).all(dim=1, keepdim=True)
    return start, end, ordered


def query_tile_key_spans(spans, s_q: int, block_m: int) -> torch.Tensor:
    """(B, query tiles, 2) int32: the keys a query tile's sequences span (forward and dQ)."""
    start, end, ordered = spans
    s_k = start.shape[1]
    first = torch.arange(0, s_q, block_m, device=start.device) + (s_k - s_q)  # absolute positions
    last = torch.clamp(first + block_m, max=s_k) - 1
    lo = torch.where(ordered, start[:, first], 0)
    hi = torch.where(ordered, end[:, last], s_k)
    return torch.stack([lo, hi], dim=2).to(torch.int32).contiguous()


def key_block_query_spans(spans, s_q: int, block_n: int) -> torch.Tensor:
    """(B, key blocks, 2) int32: the query rows whose sequences a key block spans (dK/dV)."""
    start, end, ordered = spans
    s_k = start.shape[1]
    first = torch.arange(0, s_k, block_n, device=start.device)
    last = torch.clamp(first + block_n, max=s_k) - 1
    diag = s_k - s_q
    lo = torch.where(ordered, (start[:, first] - diag).clamp(min=0), 0)
    hi = torch.where(ordered, (end[:, last] - diag).clamp(min=0), s_q)
    return torch.stack([lo, hi], dim=2).to(torch.int32).contiguous()


def live_key_range(kpm: torch.Tensor) -> torch.Tensor:
    """(B, 2) int32: the first live key and one past the last, per batch row (on device, no sync)."""
    batch, s_k = kpm.shape
    if s_k == 0:
        return torch.zeros((batch, 2), dtype=torch.int32, device=kpm.device)
    idx = torch.arange(s_k, device=kpm.device)
    live = kpm.bool()
    first = torch.where(live, idx, s_k).amin(dim=1)
    last = torch.where(live, idx + 1, 0).amax(dim=1)
    return torch.stack([first, last], dim=1).to(torch.int32).contiguous()


def sequence_args(q, cu_q, cu_k, used_q, used_k) -> tuple:
    """The general kernels' ``CuSeqQ, CuSeqK, EndSeqQ, EndSeqK`` (never-read dummies without packed sequences)."""
    if cu_q is None:
        return q, q, q, q
    return cu_q, cu_k, sequence_ends(cu_q, used_q), sequence_ends(cu_k, used_k)
