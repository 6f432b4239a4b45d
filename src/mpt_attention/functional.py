"""The seed's attention functions, one per ``attn_impl``, with the seed's signature and layouts.

Inputs are packed ``(B, S, H*D)`` (head-major), key/value ``(B, S, H_kv*D)``. Each function returns
``(output (B, S_q, H*D), attn_weights or None, past_key_value)``.

KV caches, as in the seed: ``torch`` keeps ``(key (B, H_kv, D, S_k), value (B, H_kv, S_k, D))`` (the
key transposed); ``sdpa``, ``flash`` and ``triton`` keep packed ``(B, S_k, H_kv*D)`` tensors.
``past_key_value=()`` starts a cache, ``None`` keeps none. A passed cache is never modified.

``attn_bias`` is sliced to its bottom-right ``(S_q, S_k)`` window (MPT builds it for max_seq_len).
Extra keyword arguments beyond the seed: ``kv_n_heads`` (grouped-query attention; ``multiquery``
means ``kv_n_heads=1``) and ``alibi_slopes`` ``(H,)`` (ALiBi computed by the backend).
"""

from __future__ import annotations

import math
import warnings

import torch

from mpt_attention import api, masks
from mpt_attention.impl import reference

__all__ = [
    "scaled_multihead_dot_product_attention",
    "sdpa_attn_fn",
    "flash_attn_fn",
    "triton_flash_attn_fn",
    "ATTN_FN_REGISTRY",
]

_TORCH_PADDING_WARNING = (
    "Propogating key_padding_mask to the attention module and applying it within the attention module "
    "can cause unneccessary computation/memory usage. Consider integrating into attn_bias once and "
    "passing that to each attention module instead."
)


def _kv_heads(n_heads: int, multiquery: bool, kv_n_heads: int | None) -> int:
    if multiquery:
        if kv_n_heads not in (None, 1):
            raise ValueError(f"multiquery=True means kv_n_heads=1, got kv_n_heads={kv_n_heads}")
        return 1
    kv = n_heads if kv_n_heads is None else kv_n_heads
    if kv < 1 or kv > n_heads or n_heads % kv:
        raise ValueError(f"kv_n_heads={kv} must divide n_heads={n_heads}")
    return kv


def _check_packed(query, key, value, n_heads: int, kv_heads: int) -> int:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed (B, S, heads*head_dim), got shape {tuple(t.shape)}")
    if query.shape[-1] % n_heads:
        raise ValueError(f"query width {query.shape[-1]} is not divisible by n_heads={n_heads}")
    head_dim = query.shape[-1] // n_heads
    want = kv_heads * head_dim
    if key.shape != value.shape or key.shape[-1] != want or key.shape[0] != query.shape[0]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must be (B={query.shape[0]}, S, "
            f"kv_n_heads*head_dim={want}) for query {tuple(query.shape)} with n_heads={n_heads}"
        )
    return head_dim


def _check_cache(past_key_value, expected: list[tuple], impl: str):
    if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2:
        raise ValueError(f"past_key_value must be () or a (key, value) pair, got {type(past_key_value).__name__} "
                         f"of length {len(past_key_value) if hasattr(past_key_value, '__len__') else '?'}")
    for name, t, shape in zip(("key", "value"), past_key_value, expected):
        ok = isinstance(t, torch.Tensor) and t.dim() == len(shape)
        ok = ok and all(want is None or got == want for got, want in zip(t.shape, shape))
        if not ok:
            layout = "(B, H_kv, D, S) key / (B, H_kv, S, D) value" if impl == "torch" else "(B, S, H_kv*D)"
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"cached {name} has shape {got}; attn_impl={impl!r} caches are {layout}, "
                             f"expected {tuple('S' if s is None else s for s in shape)}")


def _slice_bias(attn_bias, batch, n_heads, s_q, s_k):
    """The seed's bottom-right window of the bias, and its broadcast check (seed message)."""
    if attn_bias is None:
        return None
    full = torch.Size((batch, n_heads, s_q, s_k))
    if attn_bias.dim() == 4:
        attn_bias = attn_bias[:, :, max(0, attn_bias.size(2) - s_q):, max(0, attn_bias.size(3) - s_k):]
        if all(b in (1, f) for b, f in zip(attn_bias.shape, full)):
            return attn_bias
    raise RuntimeError(f"attn_bias (shape: {attn_bias.shape}) is expected to broadcast to shape: {full}.")


def _check_padding_mask(key_padding_mask, batch, s_k):
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (batch, s_k)):
        raise ValueError(f"key_padding_mask must be bool (B, S_k)=({batch}, {s_k}) with True = keep, "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def scaled_multihead_dot_product_attention(
    query, key, value, n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
    key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False,
    multiquery=False, kv_n_heads=None, alibi_slopes=None,
):
    """``attn_impl='torch'``: the seed's eager path (masked scores filled with ``finfo(q.dtype).min``)."""
    kv_heads = _kv_heads(n_heads, multiquery, kv_n_heads)
    head_dim = _check_packed(query, key, value, n_heads, kv_heads)
    batch, s_q, _ = query.shape
    q = query.view(batch, s_q, n_heads, head_dim).transpose(1, 2)
    k_t = key.view(batch, key.shape[1], kv_heads, head_dim).permute(0, 2, 3, 1)
    v = value.view(batch, value.shape[1], kv_heads, head_dim).transpose(1, 2)
    if past_key_value is not None:
        if len(past_key_value) != 0:
            _check_cache(past_key_value, [(batch, kv_heads, head_dim, None), (batch, kv_heads, None, head_dim)],
                         "torch")
            k_t = torch.cat([past_key_value[0], k_t], dim=3)
            v = torch.cat([past_key_value[1], v], dim=2)
        past_key_value = (k_t, v)
    s_k = k_t.shape[-1]
    scale = 1 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    if alibi_slopes is not None:
        alibi = masks.alibi_bias(alibi_slopes, s_q, s_k, is_causal)
        attn_bias = alibi if attn_bias is None else _slice_bias(attn_bias, batch, n_heads, s_q, s_k) + alibi
    attn_bias = _slice_bias(attn_bias, batch, n_heads, s_q, s_k)
    _check_padding_mask(key_padding_mask, batch, s_k)
    if key_padding_mask is not None and attn_bias is not None:
        warnings.warn(_TORCH_PADDING_WARNING)
    out, weights = reference.mpt_eager(
        q, k_t, v, softmax_scale=scale, attn_bias=attn_bias, key_padding_mask=key_padding_mask,
        is_causal=is_causal, dropout_p=dropout_p, training=training, needs_weights=needs_weights,
    )
    return out.transpose(1, 2).reshape(batch, s_q, n_heads * head_dim), weights, past_key_value


def _fused(backend, query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
           is_causal, dropout_p, training, needs_weights, multiquery, kv_n_heads, alibi_slopes):
    """Shared body of the packed-cache backends: cache, bias window, then :func:`api.attention`."""
    if needs_weights:
        raise NotImplementedError(f"attn_impl: {backend} cannot return attn weights.")
    kv_heads = _kv_heads(n_heads, multiquery, kv_n_heads)
    head_dim = _check_packed(query, key, value, n_heads, kv_heads)
    batch, s_q, _ = query.shape
    if past_key_value is not None:
        if len(past_key_value) != 0:
            width = kv_heads * head_dim
            _check_cache(past_key_value, [(batch, None, width), (batch, None, width)], backend)
            key = torch.cat([past_key_value[0], key], dim=1)
            value = torch.cat([past_key_value[1], value], dim=1)
        past_key_value = (key, value)
    s_k = key.shape[1]
    attn_bias = _slice_bias(attn_bias, batch, n_heads, s_q, s_k)
    _check_padding_mask(key_padding_mask, batch, s_k)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.reshape(-1).to(query.device)
    out = api.attention(
        query.view(batch, s_q, n_heads, head_dim),
        key.view(batch, s_k, kv_heads, head_dim),
        value.view(batch, s_k, kv_heads, head_dim),
        backend=backend, causal=is_causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
        attn_bias=attn_bias, key_padding_mask=key_padding_mask, dropout_p=dropout_p if training else 0.0,
    )
    return out.reshape(batch, s_q, n_heads * head_dim), None, past_key_value


def sdpa_attn_fn(query, key, value, n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
                 key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False,
                 multiquery=False, kv_n_heads=None, alibi_slopes=None):
    """``attn_impl='sdpa'``: torch's scaled_dot_product_attention; packed cache."""
    return _fused("sdpa", query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
                  is_causal, dropout_p, training, needs_weights, multiquery, kv_n_heads, alibi_slopes)


def triton_flash_attn_fn(query, key, value, n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
                         key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False,
                         needs_weights=False, multiquery=False, kv_n_heads=None, alibi_slopes=None):
    """``attn_impl='triton'``: our fused kernels; packed cache; bias, masks and ALiBi in-kernel."""
    return _fused("triton", query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
                  is_causal, dropout_p, training, needs_weights, multiquery, kv_n_heads, alibi_slopes)


def flash_attn_fn(query, key, value, n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
                  key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False,
                  multiquery=False, kv_n_heads=None, alibi_slopes=None):
    """``attn_impl='flash'``: the flash-attn family backend, not implemented yet (raises)."""
    raise NotImplementedError(api._FLASH_MISSING)


ATTN_FN_REGISTRY = {
    "torch": scaled_multihead_dot_product_attention,
    "sdpa": sdpa_attn_fn,
    "flash": flash_attn_fn,
    "triton": triton_flash_attn_fn,
}
