"""The ``torch`` backend: readable eager attention, the ground truth the fused backends are held to.

Two entry points with the same math and different conventions:

* :func:`mpt_eager` is the seed's ``torch`` path step for step (masked scores filled with
  ``finfo(q.dtype).min``, so a fully masked row becomes a uniform average; float32 bias promotion;
  attention weights returned on request). The seed-compatible functions use it.
* :func:`attention` is the modern op's ``torch`` backend: masks *remove* keys, a row with no key
  left gives 0 and a log-sum-exp of ``-inf``; the log-sum-exp can be returned.

Masks and ALiBi come from :mod:`mpt_attention.masks`, shared with the other backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpt_attention import masks


def _expand_kv_heads(x: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """Serve query head ``h`` with kv head ``h // (H_q // H_kv)`` by repeating along ``dim``."""
    n_kv = x.shape[dim]
    if n_kv == n_heads or n_kv == 1:
        return x  # identity, or plain broadcasting (MQA)
    return x.repeat_interleave(n_heads // n_kv, dim=dim)


def mpt_eager(
    q: torch.Tensor,
    k_t: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    attn_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    training: bool,
    needs_weights: bool,
):
    """The seed's eager attention.

    Args:
        q: ``(B, H, S_q, D)``; k_t: ``(B, H_kv, D, S_k)`` (transposed key); v: ``(B, H_kv, S_k, D)``.
        attn_bias: already sliced to broadcast against ``(B, H, S_q, S_k)``.
        key_padding_mask: bool ``(B, S_k)``, True = keep.

    Returns:
        ``(out (B, H, S_q, D), weights (B, H, S_q, S_k) or None)``.
    """
    n_heads, s_q = q.shape[1], q.shape[2]
    if key_padding_mask is not None:  # garbage in padded keys must not leak through 0 * NaN
        batch, s_k = key_padding_mask.shape
        k_t = k_t.masked_fill(~key_padding_mask.view(batch, 1, 1, s_k), 0.0)
        v = v.masked_fill(~key_padding_mask.view(batch, 1, s_k, 1), 0.0)
    k_t = _expand_kv_heads(k_t, n_heads, 1)
    v = _expand_kv_heads(v, n_heads, 1)
    s_k = k_t.shape[-1]
    weights = q.matmul(k_t) * softmax_scale
    if attn_bias is not None:
        weights = weights + attn_bias
    min_val = torch.finfo(q.dtype).min
    if key_padding_mask is not None:
        weights = weights.masked_fill(~key_padding_mask.view(-1, 1, 1, s_k), min_val)
    if is_causal and s_q != 1:
        future = ~masks.keep_mask(1, s_q, s_k, causal=True, device=q.device)
        weights = weights.masked_fill(future, min_val)
    weights = torch.softmax(weights, dim=-1)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p, training=training)
    out = weights.to(v.dtype).matmul(v)
    return out, (weights if needs_weights else None)


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
    return_lse: bool = False,
):
    """Eager version of :func:`mpt_attention.attention` (inputs already validated).

    Args:
        q: ``(B, S_q, H_q, D)``; k, v: ``(B, S_k, H_kv, D)``.

    Returns:
        ``out (B, S_q, H_q, D)`` in q's dtype, and with ``return_lse`` also ``lse (B, H_q, S_q)`` float32.
    """
    batch, s_q, n_heads, head_dim = q.shape
    s_k = k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if s_k == 0:  # nothing to attend to: zeros, tied to every input so each gradient is a defined 0
        out = q * 0.0 + (k.sum() + v.sum()) * 0.0
        lse = torch.full((batch, n_heads, s_q), float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if key_padding_mask is not None:  # padding may hold garbage (NaN); 0 * NaN would leak through P @ V
        pad = ~key_padding_mask.view(batch, 1, s_k, 1)
        kh, vh = kh.masked_fill(pad, 0.0), vh.masked_fill(pad, 0.0)
    kh, vh = _expand_kv_heads(kh, n_heads, 1), _expand_kv_heads(vh, n_heads, 1)
    scores = qh.float().matmul(kh.float().transpose(-1, -2)) * scale
    if alibi_slopes is not None:
        scores = scores + masks.alibi_bias(alibi_slopes, s_q, s_k, causal and prefix_mask is None)
    if attn_bias is not None:
        scores = scores + attn_bias.float()
    keep = masks.keep_mask(
        batch, s_q, s_k, causal=causal, key_padding_mask=key_padding_mask,
        sequence_id=sequence_id, prefix_mask=prefix_mask, device=q.device,
    )
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    # A row whose every score is -inf (all keys masked) has no softmax; keep it out of the
    # exp/logsumexp so neither the values nor the gradients see -inf - -inf = NaN, and give it 0.
    # the shift is a constant for autograd: d lse / d s must be P, not P plus the argmax indicator
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    live = row_max != float("-inf")  # (a NaN score is not a mask: its row stays NaN, as every backend's)
    # normalise by the sum rather than exp(scores - lse): at float32's min, min + log(n) rounds to min
    weights = torch.exp(scores - torch.where(live, row_max, 0.0))
    total = weights.sum(dim=-1, keepdim=True)
    probs = (weights / torch.where(live, total, 1.0)).masked_fill(~live, 0.0)
    lse = torch.where(live, row_max + torch.log(torch.where(live, total, 1.0)), float("-inf")).squeeze(-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = probs.matmul(vh.float()).to(q.dtype).transpose(1, 2)
    return (out, lse) if return_lse else out
