"""``key_padding_mask`` on the Hopper kernels, which take no mask: the mask as a bias row over the keys.

A padded key is a key every query row scores at -inf, i.e. a per-key term, which the Hopper kernels add from a bias
row ``(B, H|1, 1, S_k)``; MPT's causal ALiBi (``slope * (j - (S_k - 1))``) is a per-key term too, so both fold into
one row, in the kernels' float32 log2 units, the ALiBi term rounded as the kernels round it from the slope
(``slope * log2(e)``, then times the distance). A row whose every key is padding then sees only -inf: its output is 0
and its log-sum-exp -inf, as the general kernels give it.

The general kernels never read a padded key; the Hopper kernels read K and V in blocks through the copy engine, the
padded rows of a block that also holds kept keys included, and garbage there (NaN, inf in unwritten cache slots)
would pass through ``score + (-inf)`` and ``0 * NaN`` in P V. So the route reads copies of K and V with the padded
rows zeroed (two elementwise passes, O(B * S_k * H_kv * D)). Their gradients are those of K and V: a padded key's
probability is exactly 0, so its dK and dV rows are 0, as the mask's gradient would make them.
"""

from __future__ import annotations

import torch

from mpt_attention.impl.triton import hopper

LOG2E = 1.4426950408889634


def takes_hopper(q, k, v, bias, slopes, kpm, seqid, prefix, dropout_p, causal, cu_q) -> bool:
    """Whether this call's ``key_padding_mask`` goes to the Hopper kernels as a bias row (``as_bias_row``): dense
    inputs, no other bias, mask or dropout, ALiBi only in its causal form (the symmetric one is not a per-key term),
    and inputs the Hopper forward takes (a bias row always suits it where they do)."""
    if kpm is None or bias is not None or seqid is not None or prefix is not None or dropout_p or cu_q is not None:
        return False
    if slopes is not None and not causal:
        return False
    return hopper_applies(q, k, v, causal)


def hopper_applies(q, k, v, causal) -> bool:
    """Whether the Hopper forward takes q, k, v without a mask (tests force the route onto the CPU's general kernels
    by replacing this)."""
    return hopper.unsupported(q, k, v, None, None, None, None, 0.0, causal, False, max_q=q.shape[1]) is None


def as_bias_row(k, v, kpm, slopes, n_heads):
    """``(k, v, rows)``: K and V with the padded keys' rows zeroed, in the layout the kernels take them in (so their
    gradients keep the layout ``launch.backward`` gives K's and V's), and the mask (with MPT's causal ALiBi from
    ``slopes``, (H,) or (B, H)) as a bias row ``(B, H|1, 1, S_k)`` in float32 log2 units: 0 (or the ALiBi term) for
    a kept key, -inf for a padded one; rows padded to 16 bytes for the copy engine, as the kernels' converted rows
    are (``launch._log2_bias_rows``)."""
    from mpt_attention.impl.triton.launch import head_contiguous  # (launch imports this module)

    batch, s_k = kpm.shape
    keep = kpm.view(batch, s_k, 1, 1)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k_kept, v_kept = (torch.where(keep, x, zero, out=torch.empty_like(head_contiguous(x))) for x in (k, v))
    heads = 1 if slopes is None else n_heads
    rows = torch.empty(batch, heads, 1, hopper.aligned_row(s_k, 4), dtype=torch.float32, device=k.device)[..., :s_k]
    if slopes is None:
        rows.zero_()
    else:
        slope2 = slopes.to(torch.float32) * LOG2E
        dist = torch.arange(1 - s_k, 1, device=k.device, dtype=torch.float32)  # key - (S_k - 1), exact
        torch.mul(slope2.view(-1, n_heads, 1, 1).expand(batch, n_heads, 1, 1), dist, out=rows)
    rows.masked_fill_(~kpm.view(batch, 1, 1, s_k), float("-inf"))
    return k_kept, v_kept, rows
