"""MPT's attention layers: ``GroupedQueryAttention`` with MHA and MQA as its two special cases.

Parameter names, shapes and the fused ``Wqkv`` row order (q rows, then k, then v; head ``i`` owns
rows ``[i*D, (i+1)*D)`` in each block) are MPT's, so MPT checkpoints load, and a state dict moves
between ``attn_impl`` values unchanged.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from mpt_attention.functional import ATTN_FN_REGISTRY
from mpt_attention.masks import gen_slopes
from mpt_attention.norm import LPLayerNorm

__all__ = ["GroupedQueryAttention", "MultiheadAttention", "MultiQueryAttention", "ATTN_CLASS_REGISTRY"]


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``kv_n_heads`` key/value heads shared by groups of query heads.

    Query head ``h`` uses key/value head ``h // (n_heads // kv_n_heads)``.

    Args:
        d_model: model width D_model; ``head_dim = d_model // n_heads``.
        n_heads, kv_n_heads: query heads and key/value heads (``kv_n_heads`` divides ``n_heads``).
        attn_impl: ``'torch'``, ``'sdpa'``, ``'flash'`` or ``'triton'``.
        clip_qkv: clamp the fused projection output to ``[-clip_qkv, clip_qkv]`` (falsy: off).
        qk_ln: LayerNorm over the query width (D_model) and the key width (kv_n_heads * head_dim).
        softmax_scale: ``None`` means ``1/sqrt(head_dim)``; 0 is honoured.
        attn_pdrop: attention dropout probability, applied in training only.
        low_precision_layernorm: use :class:`LPLayerNorm` for ``qk_ln``.
        alibi, alibi_bias_max: apply MPT's ALiBi inside the layer (slopes on the fused backends,
            a bias on ``torch``/``sdpa``); equal to passing the bias MPT builds.
        bias: give ``Wqkv`` and ``out_proj`` biases (MPT's ``no_bias=True`` checkpoints have none).

    ``forward(x (B, S, D_model), past_key_value=None, attn_bias=None, attention_mask=None (bool
    (B, S_k), True = keep), is_causal=True, needs_weights=False)`` returns ``(context (B, S, D_model),
    attn_weights or None, past_key_value)``.
    """

    def __init__(self, d_model: int, n_heads: int, kv_n_heads: int, attn_impl: str = "triton", clip_qkv=None,
                 qk_ln: bool = False, softmax_scale: float | None = None, attn_pdrop: float = 0.0,
                 low_precision_layernorm: bool = False, verbose: int = 0, device=None,
                 alibi: bool = False, alibi_bias_max: float = 8, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if kv_n_heads <= 0:
            raise ValueError("kv_n_heads should be greater than zero.")
        if kv_n_heads > n_heads:
            raise ValueError("The number of KV heads should be less than or equal to Q heads.")
        if n_heads % kv_n_heads:
            raise ValueError("Each Q head should get the same number of KV heads, "
                             "so n_heads must be divisible by kv_n_heads.")
        if attn_impl not in ATTN_FN_REGISTRY:
            raise ValueError(f"attn_impl={attn_impl!r} is an invalid setting.")
        if not 0.0 <= attn_pdrop < 1.0:
            raise ValueError(f"attn_pdrop must be in [0, 1), got {attn_pdrop}")
        self.d_model, self.n_heads, self.kv_n_heads = d_model, n_heads, kv_n_heads
        self.head_dim = d_model // n_heads
        self.attn_impl = attn_impl
        self.clip_qkv = clip_qkv
        self.qk_ln = qk_ln
        self.softmax_scale = 1 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.attn_dropout_p = attn_pdrop
        self.alibi, self.alibi_bias_max = alibi, alibi_bias_max

        kv_width = kv_n_heads * self.head_dim
        self.Wqkv = nn.Linear(d_model, d_model + 2 * kv_width, bias=bias, device=device)
        self.Wqkv._fused = (0, (d_model, d_model + kv_width))  # split points for MPT's param init
        if qk_ln:
            norm = LPLayerNorm if low_precision_layernorm else nn.LayerNorm
            self.q_ln = norm(d_model, device=device)
            self.k_ln = norm(kv_width, device=device)
        self.attn_fn = ATTN_FN_REGISTRY[attn_impl]
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device)
        self.out_proj._is_residual = True
        if verbose:
            _warn_impl_choice(attn_impl)

    def forward(self, x, past_key_value=None, attn_bias=None, attention_mask=None, is_causal=True, needs_weights=False):
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_width = self.kv_n_heads * self.head_dim
        query, key, value = qkv.split([self.d_model, kv_width, kv_width], dim=2)
        if self.qk_ln:
            # the norms return float32 under autocast; the attention runs in the activations' dtype
            dtype = query.dtype
            query, key = self.q_ln(query).to(dtype), self.k_ln(key).to(dtype)
        slopes = None
        if self.alibi:
            slopes = gen_slopes(self.n_heads, self.alibi_bias_max, device=x.device, return_1d=True)
        context, attn_weights, past_key_value = self.attn_fn(
            query, key, value, self.n_heads, past_key_value=past_key_value, softmax_scale=self.softmax_scale,
            attn_bias=attn_bias, key_padding_mask=attention_mask, is_causal=is_causal,
            dropout_p=self.attn_dropout_p, training=self.training, needs_weights=needs_weights,
            kv_n_heads=self.kv_n_heads, alibi_slopes=slopes,
        )
        return self.out_proj(context), attn_weights, past_key_value


class MultiheadAttention(GroupedQueryAttention):
    """MPT's multi-head attention: ``Wqkv`` is ``(3*d_model, d_model)``."""

    def __init__(self, d_model: int, n_heads: int, attn_impl: str = "triton", clip_qkv=None, qk_ln: bool = False,
                 softmax_scale=None, attn_pdrop: float = 0.0, low_precision_layernorm: bool = False, verbose: int = 0,
                 device=None, alibi: bool = False, alibi_bias_max: float = 8, bias: bool = True):
        super().__init__(d_model, n_heads, n_heads, attn_impl, clip_qkv, qk_ln, softmax_scale, attn_pdrop,
                         low_precision_layernorm, verbose, device, alibi, alibi_bias_max, bias)


class MultiQueryAttention(GroupedQueryAttention):
    """MPT's multi-query attention: one key/value head, ``Wqkv`` is ``(d_model + 2*head_dim, d_model)``."""

    def __init__(self, d_model: int, n_heads: int, attn_impl: str = "triton", clip_qkv=None, qk_ln: bool = False,
                 softmax_scale=None, attn_pdrop: float = 0.0, low_precision_layernorm: bool = False, verbose: int = 0,
                 device=None, alibi: bool = False, alibi_bias_max: float = 8, bias: bool = True):
        super().__init__(d_model, n_heads, 1, attn_impl, clip_qkv, qk_ln, softmax_scale, attn_pdrop,
                         low_precision_layernorm, verbose, device, alibi, alibi_bias_max, bias)


def _warn_impl_choice(attn_impl: str) -> None:
    if attn_impl == "triton":
        warnings.warn(
            "While `attn_impl: triton` can be faster than `attn_impl: flash` it uses more memory. When training "
            "larger models this can trigger alloc retries which hurts performance. If encountered, we recommend "
            "using `attn_impl: flash` if your model does not use `alibi` or `prefix_lm`."
        )
    elif attn_impl == "torch" and torch.cuda.is_available():
        warnings.warn(
            "Using `attn_impl: torch`. If your model does not use `alibi` or `prefix_lm` we recommend using "
            "`attn_impl: flash` otherwise we recommend using `attn_impl: triton`."
        )


ATTN_CLASS_REGISTRY = {
    "multihead_attention": MultiheadAttention,
    "multiquery_attention": MultiQueryAttention,
    "grouped_query_attention": GroupedQueryAttention,
}
