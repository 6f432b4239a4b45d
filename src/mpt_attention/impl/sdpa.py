"""The ``sdpa`` backend: :func:`torch.nn.functional.scaled_dot_product_attention` with MPT semantics.

SDPA's own ``is_causal`` is top-left aligned and its boolean masks leave fully masked rows
undefined, so causal-with-cache, key padding, sequence ids, prefix-LM, ALiBi and the bias are folded
into one ``attn_mask`` here (dense, O(S_q * S_k): this backend is the compatibility path, the fused
one is ``triton``). Rows with no key left are computed on a dummy mask and returned as 0, matching
the other backends. GQA uses ``enable_gqa`` so K/V are not repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpt_attention import masks


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sequence_id: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA version of :func:`mpt_attention.attention` (inputs already validated).

    Args:
        q: ``(B, S_q, H_q, D)``; k, v: ``(B, S_k, H_kv, D)``.

    Returns:
        ``(B, S_q, H_q, D)``.
    """
    batch, s_q, n_heads, _ = q.shape
    s_k = k.shape[1]
    if key_padding_mask is not None:  # padded keys may hold garbage (NaN): never let 0 * NaN through
        pad = ~key_padding_mask.view(batch, s_k, 1, 1)
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    enable_gqa = kh.shape[1] != n_heads
    sdpa = dict(dropout_p=dropout_p, scale=softmax_scale, enable_gqa=enable_gqa)

    plain_causal = causal and s_q == s_k and prefix_mask is None
    bias = None
    if alibi_slopes is not None:
        bias = masks.alibi_bias(alibi_slopes, s_q, s_k, causal and prefix_mask is None)
    if attn_bias is not None:
        bias = attn_bias.float() if bias is None else bias + attn_bias.float()
    no_masks = key_padding_mask is None and sequence_id is None
    if bias is None and no_masks and (plain_causal or not causal):
        # SDPA's own causal flag is exact here (top-left == bottom-right when S_q == S_k).
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=plain_causal, **sdpa)
        return out.transpose(1, 2)

    keep = masks.keep_mask(
        batch, s_q, s_k, causal=causal, key_padding_mask=key_padding_mask,
        sequence_id=sequence_id, prefix_mask=prefix_mask, device=q.device,
    )
    if bias is None:
        mask = keep
        dead = ~keep.any(dim=-1, keepdim=True)
        mask = mask | dead
    else:
        # SDPA wants the mask in q's dtype: keep finite values finite there (float32's min, MPT's mask
        # value, would become -inf in half precision and empty rows the other backends keep)
        mask = torch.where(torch.isneginf(bias), bias, bias.clamp(min=torch.finfo(q.dtype).min)).to(q.dtype)
        if keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
        dead = (mask == float("-inf")).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, **sdpa)
    return out.masked_fill(dead, 0.0).transpose(1, 2)
