"""Host side of the Hopper forward kernel (``hopper_forward.py``, Gluon): when it applies, and its launch.

The general kernel (``forward.py``) computes the same function for every input; this one is faster on
sm_90 for the common case and is chosen automatically where it applies. ``ENABLED = False`` (or the
environment variable ``MPT_ATTENTION_HOPPER_KERNEL=0`` at import) keeps the general kernel everywhere:
tests and benchmarks compare the two that way.
"""

from __future__ import annotations

import os

import torch
import triton

try:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from mpt_attention.impl.triton.hopper_forward import _hopper_fwd_kernel
    _IMPORT_ERROR = None
except Exception as exc:  # a Triton without Gluon's Hopper module
    _hopper_fwd_kernel, _IMPORT_ERROR = None, f"{type(exc).__name__}: {exc}"

ENABLED = os.environ.get("MPT_ATTENTION_HOPPER_KERNEL", "1") != "0"
BLOCK_M, BLOCK_N, HALF_M = 128, 128, 64  # two consumer warpgroups of 64 query rows (hopper_forward._HALF_M)
LOG2E = 1.4426950408889634


def tma_aligned(t: torch.Tensor) -> bool:
    """The copy engine's rules: unit last stride, 16-byte aligned base and strides (also launch.py's)."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1])


def unsupported(q, k, v, bias, kpm, seqid, prefix, dropout_p, causal, varlen) -> str | None:
    """Why the Hopper kernel does not apply to these inputs (None: it does)."""
    if not ENABLED:
        return "disabled"
    if _hopper_fwd_kernel is None:
        return f"Gluon unavailable ({_IMPORT_ERROR})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]}"
    if varlen or bias is not None or kpm is not None or seqid is not None or prefix is not None or dropout_p > 0:
        return "varlen, a bias tensor, masks or dropout"
    s_q, s_k = q.shape[1], k.shape[1]
    if s_q == 0 or s_k == 0 or (causal and s_q > s_k):
        return "rows without keys"  # the kernel assumes every row sees a key
    if s_q < BLOCK_M:
        # decode and short chunks: most of a 128-row tile would be idle, and the per-launch host work
        # (four copy-engine descriptors encoded) is not hidden behind so short a kernel
        return f"fewer than {BLOCK_M} query rows"
    if not all(tma_aligned(t) for t in (q, k, v)):
        return "strides not 16-byte aligned"
    if any(t.stride(2) != t.shape[3] for t in (q, k, v)):
        return "heads not adjacent in memory (stride(2) != head_dim)"  # the (B, S, H * D) view below
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not an sm_90 GPU"  # checked last, so CPU tests see the reasons above
    return None


def _descriptor(x: torch.Tensor, rows: int) -> "TensorDescriptor":
    """Copy-engine descriptor of ``x`` (B, S, H, D) seen as (B, S, H * D), boxes of [1, rows, D]."""
    batch, seq, heads, dim = x.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    return TensorDescriptor(x, [batch, seq, heads * dim], [x.stride(0), x.stride(1), 1], [1, rows, dim], layout)


def forward(q, k, v, slopes, softmax_scale, causal, alibi_mode):
    """``out`` (q's shape, contiguous) and ``lse`` ``(B, H, S_q)`` float32; inputs as ``unsupported`` allows."""
    batch, s_q, n_heads, head_dim = q.shape
    s_k, n_kv = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, n_heads, s_q), dtype=torch.float32, device=q.device)
    if slopes is not None:
        slope_strides = (0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride()
    else:
        slopes, slope_strides = lse, (0, 0)  # dummy, never read
    grid = (triton.cdiv(s_q, BLOCK_M), batch * n_heads)
    _hopper_fwd_kernel[grid](
        _descriptor(q, HALF_M), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N), _descriptor(out, HALF_M),
        lse, slopes, n_heads * s_q, s_q, *slope_strides,
        n_heads, n_heads // n_kv, s_q, s_k, softmax_scale * LOG2E,
        IS_CAUSAL=causal, ALIBI=alibi_mode, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim, num_warps=4,
    )
    return out, lse
