"""``key_padding_mask`` on the Hopper kernels, which take no mask: the mask as a bias row over the keys.

A padded key is a key every query row scores at -inf, i.e. a per-key term, which the Hopper kernels add from a bias
row ``(B, H|1, 1, S_k)``; MPT's causal ALiBi (``slope * (j - (S_k - 1))``) is a per-key term too, so both fold into
one row, in the kernels' float32 log2 units, the ALiBi term rounded as the kernels round it from the slope
(``slope * log2(e)``, then times the distance). A row whose every key is padding then sees only -inf: its output is 0
and its log-sum-exp -inf, as the general kernels give it.

The general kernels never read a padded key; the Hopper kernels read K and V in blocks through the copy engine, the
padded rows of a block that also holds kept keys included, and garbage there (NaN, inf in unwritten cache slots)
would pass through ``score + (-inf)`` and ``0 * NaN`` in P V. So the route reads copies of K and V with the padded
rows zeroed (``kept_keys_kernel``: one pass that reads the kept rows and writes every row, O(B * S_k * H_kv * D)).
Their gradients are those of K and V: a padded key's probability is exactly 0, so its dK and dV rows are 0, as the
mask's gradient would make them.

Over at least ``hopper.REACH_MIN_KEYS`` keys (half as many in a training step) the row's reach tables
(``reach.row_reach_kernel``) skip what the mask removes: forward tiles end after the row's last kept key's block (a
right-padded batch row's padding is not read), and the dK/dV kernel bounds each key block by its own maximum, so a
block of padded keys takes one query step. Padded query rows are still computed: they are rows of the output (over
the kept keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpt_attention.impl.triton import hopper
from mpt_attention.impl.triton.hopper_views import aligned_row
from mpt_attention.impl.triton.lean_launch import cdiv, launch_kernel, next_power_of_2
from mpt_attention.kept import kept_on

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


@triton.jit
def kept_keys_kernel(
    K, V, Kpm, KOut, VOut,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_wb, stride_ws, stride_wh, stride_mb,
    seqlen_k, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``KOut``, ``VOut`` (B, S_k, H_kv, D): K and V where ``Kpm`` (B, S_k) uint8 is nonzero, 0 where it is 0. A
    padded row is only written, never read (garbage there may be NaN). Grid ``(cdiv(S_k, BLOCK_S), H_kv, B)``."""
    keys = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :]
    in_seq = keys < seqlen_k
    kept = tl.load(Kpm + b * stride_mb + keys, mask=in_seq, other=0) != 0
    rows = keys.to(tl.int64)[:, None]
    # [BLOCK_S, BLOCK_D]
    written = in_seq[:, None] & (cols < head_dim)
    read = written & kept[:, None]
    x = tl.load(K + b * stride_kb + rows * stride_ks + h * stride_kh + cols, mask=read, other=0.0)
    tl.store(KOut + b * stride_ob + rows * stride_os + h * stride_oh + cols, x, mask=written)
    x = tl.load(V + b * stride_vb + rows * stride_vs + h * stride_vh + cols, mask=read, other=0.0)
    tl.store(VOut + b * stride_wb + rows * stride_ws + h * stride_wh + cols, x, mask=written)


def kept_keys(k, v, kpm):
    """``(k_kept, v_kept)``: K and V (B, S_k, H_kv, D), D innermost, with the padded keys' rows zeroed, each laid
    out as its source (``torch.empty_like``; gradients then keep the layout ``launch_backward`` gives K's and V's)."""
    batch, s_k, n_kv, head_dim = k.shape
    k_kept, v_kept = torch.empty_like(k), torch.empty_like(v)
    if k.numel() == 0:
        return k_kept, v_kept
    mask = kpm.contiguous().view(torch.uint8)
    block_d = next_power_of_2(head_dim)
    block_s = max(16, min(64, 8192 // block_d))
    launch_kernel(kept_keys_kernel, (cdiv(s_k, block_s), n_kv, batch), k, v, mask, k_kept, v_kept,
                  *k.stride()[:3], *v.stride()[:3], *k_kept.stride()[:3], *v_kept.stride()[:3], mask.stride(0),
                  s_k, head_dim, BLOCK_S=block_s, BLOCK_D=block_d)
    return k_kept, v_kept


def as_bias_row(k, v, kpm, slopes, n_heads):
    """``(k, v, rows)``: K and V with the padded keys' rows zeroed, in the layout the kernels take them in (so their
    gradients keep the layout ``launch_backward`` gives K's and V's), and the mask (with MPT's causal ALiBi from
    ``slopes``, (H,) or (B, H)) as a bias row ``(B, H|1, 1, S_k)`` in float32 log2 units: 0 (or the ALiBi term) for
    a kept key, -inf for a padded one; rows padded to 16 bytes for the copy engine, as the kernels' converted rows
    are (``launch._log2_bias_rows``)."""
    from mpt_attention.impl.triton.launch import head_contiguous  # (launch imports this module)

    k_kept, v_kept = kept_keys(head_contiguous(k), head_contiguous(v), kpm)
    key = (n_heads, _Same(slopes), None if slopes is None else slopes._version)
    return k_kept, v_kept, kept_on(kpm, "_mpt_attention_kpm_row", lambda: _bias_row(kpm, slopes, n_heads), key=key,
                                   on_device=True)


class _Same:
    """A tensor (or None) in a key by identity; the key keeps it alive, so its id is not reused while kept."""
    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t

    def __hash__(self):
        return id(self.t)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.t is self.t


def _bias_row(kpm, slopes, n_heads):
    """``as_bias_row``'s row. Kept on the mask (``kept.kept_on``, per slopes tensor and version): a model hands one
    mask to all its layers, which then share one row, and with it the row's prefix maxima, ends and per-key terms,
    each kept on the row (``reach.row_prefix_max``, ``reach.row_ends``, ``hopper.run_forward``), forward and
    backward."""
    batch, s_k = kpm.shape
    heads = 1 if slopes is None else n_heads
    rows = torch.empty(batch, heads, 1, aligned_row(s_k, 4), dtype=torch.float32, device=kpm.device)[..., :s_k]
    if slopes is None:
        rows.zero_()
    else:
        slope2 = slopes.to(torch.float32) * LOG2E
        dist = torch.arange(1 - s_k, 1, device=kpm.device, dtype=torch.float32)  # key - (S_k - 1), exact
        torch.mul(slope2.view(-1, n_heads, 1, 1).expand(batch, n_heads, 1, 1), dist, out=rows)
    rows.masked_fill_(~kpm.view(batch, 1, 1, s_k), float("-inf"))
    return rows
