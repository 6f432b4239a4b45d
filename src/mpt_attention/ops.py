"""Operator registration (torch only): the Triton kernels behind ``torch.library`` custom ops.

The ops are opaque to the compiler and carry fake kernels, so ``torch.compile(fullgraph=True)``
traces through them (forward and backward) without running or even importing Triton. Triton is
imported on first real call only, which keeps ``import mpt_attention`` free of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["triton_attention", "triton_dropout_mask"]


def _launch():
    from mpt_attention.impl.triton import launch

    return launch


@torch.library.custom_op("mpt_attention::triton_fwd", mutates_args=())
def _triton_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    bias: Tensor | None, slopes: Tensor | None, key_padding_mask: Tensor | None,
    sequence_id: Tensor | None, prefix_mask: Tensor | None, seed: Tensor | None,
    softmax_scale: float, causal: bool, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    return _launch().forward(q, k, v, bias, slopes, key_padding_mask, sequence_id, prefix_mask, seed,
                             softmax_scale, causal, dropout_p)


@_triton_fwd.register_fake
def _(q, k, v, bias, slopes, key_padding_mask, sequence_id, prefix_mask, seed, softmax_scale, causal, dropout_p):
    batch, s_q, n_heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((batch, n_heads, s_q), dtype=torch.float32)


@torch.library.custom_op("mpt_attention::triton_bwd", mutates_args=())
def _triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    bias: Tensor | None, slopes: Tensor | None, key_padding_mask: Tensor | None,
    sequence_id: Tensor | None, prefix_mask: Tensor | None, seed: Tensor | None,
    softmax_scale: float, causal: bool, dropout_p: float, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch().backward(dout, q, k, v, out, lse, dlse, bias, slopes, key_padding_mask, sequence_id,
                              prefix_mask, seed, softmax_scale, causal, dropout_p, bias_grad)


@_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, bias, slopes, key_padding_mask, sequence_id, prefix_mask, seed,
      softmax_scale, causal, dropout_p, bias_grad):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    dbias = torch.empty_like(bias, dtype=bias.dtype) if bias_grad else q.new_empty(0)
    return (*grads, dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, slopes, kpm, seqid, prefix, seed, softmax_scale, causal, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, slopes, kpm, seqid, prefix, seed)
    ctx.args = (softmax_scale, causal, dropout_p)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, slopes, kpm, seqid, prefix, seed = ctx.saved_tensors
    softmax_scale, causal, dropout_p = ctx.args
    if dout is None:  # only the log-sum-exp was used
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = _triton_bwd(dout, q, k, v, out, lse, dlse, bias, slopes, kpm, seqid, prefix, seed,
                                    softmax_scale, causal, dropout_p, ctx.bias_grad)
    return dq, dk, dv, (dbias if ctx.bias_grad else None), None, None, None, None, None, None, None, None


torch.library.register_autograd("mpt_attention::triton_fwd", _backward, setup_context=_setup_context)


def triton_attention(q, k, v, *, causal, softmax_scale, alibi_slopes, attn_bias, key_padding_mask,
                     sequence_id, prefix_mask, dropout_p):
    """Validated inputs in, ``(out, lse)`` out; see :func:`mpt_attention.attention`."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    seed = None
    if dropout_p > 0.0:
        # drawn from torch's generator, so torch.manual_seed makes dropout reproducible
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(q.device)
    return _triton_fwd(q, k, v, attn_bias, alibi_slopes, key_padding_mask, sequence_id, prefix_mask, seed,
                       scale, causal, float(dropout_p))


def triton_dropout_mask(batch, n_heads, s_q, s_k, seed: Tensor, dropout_p: float) -> Tensor:
    """The keep-mask ``(B, H, S_q, S_k)`` the kernels draw for ``seed``: lets tests check dropout exactly."""
    return _launch().dropout_keep_mask(batch, n_heads, s_q, s_k, seed, dropout_p, seed.device)
