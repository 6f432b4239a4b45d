"""mpt-attention: MPT-family attention (ALiBi, masks, MQA/GQA, KV cache) with fused Triton kernels.

Importing the package needs torch only; Triton is imported when the ``triton`` backend first runs.
"""

from mpt_attention import padding
from mpt_attention.api import BACKENDS, attention, backend_status
from mpt_attention.functional import (
    flash_attn_fn,
    scaled_multihead_dot_product_attention,
    sdpa_attn_fn,
    triton_flash_attn_fn,
)
from mpt_attention.masks import (
    attn_bias_shape,
    build_alibi_bias,
    build_attn_bias,
    build_mpt_attn_bias,
    gen_slopes,
)
from mpt_attention.modules import (
    ATTN_CLASS_REGISTRY,
    GroupedQueryAttention,
    MultiheadAttention,
    MultiQueryAttention,
)
from mpt_attention.norm import LPLayerNorm
from mpt_attention.varlen import attention_varlen

__version__ = "0.1.0"

__all__ = [
    "ATTN_CLASS_REGISTRY",
    "BACKENDS",
    "GroupedQueryAttention",
    "LPLayerNorm",
    "MultiQueryAttention",
    "MultiheadAttention",
    "attention",
    "attention_varlen",
    "attn_bias_shape",
    "backend_status",
    "build_alibi_bias",
    "build_attn_bias",
    "build_mpt_attn_bias",
    "flash_attn_fn",
    "gen_slopes",
    "padding",
    "scaled_multihead_dot_product_attention",
    "sdpa_attn_fn",
    "triton_flash_attn_fn",
]
