"""Operator registration (torch only): the Triton kernels behind ``torch.library`` custom ops.

The ops are opaque to the compiler and carry fake kernels, so ``torch.compile(fullgraph=True)``
traces through them (forward and backward) without running or even importing Triton. Triton is
imported on first real call only, which keeps ``import mpt_attention`` free of it.

Eager calls skip the dispatcher: an ``autograd.Function`` runs the same launches, and a call with nothing to
differentiate (grad mode off, or no input that needs a gradient) runs the forward's launches alone. The custom-op
path (argument defaulting and alias checks per call, a second op for the backward) cost 0.2-0.4 ms of host
time per training step on the H200 machine's CPU, which a 0.3 ms kernel cannot hide
(``benchmarks/host_overhead.py``, benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpt_attention.masks import sequence_ends

__all__ = ["alibi_from_diagonal", "public_lse", "triton_attention", "triton_dropout_mask"]

_SOFT_LSE = -2.0 ** 100  # common.SOFT_LSE: at or below it a soft-masked row's encoded count, kept as it is


def _launch():
    from mpt_attention.impl.triton import launch

    return launch


def _launch_bwd():
    from mpt_attention.impl.triton import launch_backward

    return launch_backward


@torch.library.custom_op("mpt_attention::triton_fwd", mutates_args=())
def _triton_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    bias: Tensor | None, slopes: Tensor | None, key_padding_mask: Tensor | None,
    sequence_id: Tensor | None, prefix_mask: Tensor | None, seed: Tensor | None,
    softmax_scale: float, causal: bool, dropout_p: float,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    seqused_q: Tensor | None, seqused_k: Tensor | None, deterministic: bool | None,
) -> tuple[Tensor, Tensor]:
    return _launch().forward(q, k, v, bias, slopes, key_padding_mask, sequence_id, prefix_mask, seed,
                             softmax_scale, causal, dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             seqused_q, seqused_k)


@_triton_fwd.register_fake
def _(q, k, v, bias, slopes, key_padding_mask, sequence_id, prefix_mask, seed, softmax_scale, causal, dropout_p,
      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, deterministic):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens_q is not None:  # packed (T_q, H, D): LSE (H, T_q)
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    batch, s_q, n_heads, _ = q.shape
    return out, q.new_empty((batch, n_heads, s_q), dtype=torch.float32)


@torch.library.custom_op("mpt_attention::triton_bwd", mutates_args=())
def _triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    bias: Tensor | None, slopes: Tensor | None, key_padding_mask: Tensor | None,
    sequence_id: Tensor | None, prefix_mask: Tensor | None, seed: Tensor | None,
    softmax_scale: float, causal: bool, dropout_p: float, bias_grad: bool,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    deterministic: bool | None, seqused_q: Tensor | None, seqused_k: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _launch_bwd().backward(dout, q, k, v, out, lse, dlse, bias, slopes, key_padding_mask,
                                               sequence_id, prefix_mask, seed, softmax_scale, causal, dropout_p,
                                               bias_grad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               deterministic, seqused_q, seqused_k)
    return dq, dk, dv, (q.new_empty(0) if dbias is None else dbias)  # an op returns tensors


@_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, bias, slopes, key_padding_mask, sequence_id, prefix_mask, seed,
      softmax_scale, causal, dropout_p, bias_grad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      deterministic, seqused_q, seqused_k):
    # the layout launch_backward.backward allocates them in: the inputs' own, once D is innermost
    grads = [torch.empty_like(_launch().head_contiguous(t)) for t in (q, k, v)]
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)  # contiguous, as launch_backward.backward's
    return (*grads, dbias)


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, slopes, kpm, seqid, prefix, seed, softmax_scale, causal, dropout_p,
     cu_q, cu_k, max_q, max_k, used_q, used_k, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, slopes, kpm, seqid, prefix, seed, cu_q, cu_k, used_q, used_k)
    ctx.args = (softmax_scale, causal, dropout_p)
    ctx.max_lens = (max_q, max_k)
    ctx.deterministic = deterministic
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward_with(bwd, eager=False):
    """The backward of both paths; ``bwd`` is the op (compiled graphs) or the launch (eager), which also
    takes the bias row the forward converted."""
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias, slopes, kpm, seqid, prefix, seed, cu_q, cu_k, used_q, used_k = ctx.saved_tensors
        softmax_scale, causal, dropout_p = ctx.args
        if dout is None:  # only the log-sum-exp was used
            dout = torch.zeros_like(out)
        extra = {"bias_rows": ctx.bias_rows, "reach_norms": ctx.reach_norms.get("norms"),
                 "reach_table": ctx.reach_norms.get("table")} if eager else {}
        dq, dk, dv, dbias = bwd(dout, q, k, v, out, lse, dlse, bias, slopes, kpm, seqid, prefix, seed,
                                softmax_scale, causal, dropout_p, ctx.bias_grad, cu_q, cu_k, *ctx.max_lens,
                                ctx.deterministic, used_q, used_k, **extra)
        return (dq, dk, dv, (dbias if ctx.bias_grad else None)) + (None,) * 15
    return backward


torch.library.register_autograd("mpt_attention::triton_fwd", _backward_with(_triton_bwd), setup_context=_setup_context)


def _launch_backward(*args, bias_rows=None, reach_norms=None, reach_table=None):
    return _launch_bwd().backward(*args, bias_rows=bias_rows, reach_norms=reach_norms, reach_table=reach_table)


class _EagerTritonAttention(torch.autograd.Function):
    """``triton_fwd`` and its backward without the dispatcher (see the module docstring). MPT's bias row
    is converted for the kernels once per step here, not in the forward and again in the backward, and the heads'
    norm maxima of causal ALiBi's reach are read once per step."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first: a separate setup_context costs a signature binding per call
        launch = _launch()
        # an internal buffer, so not saved for backward: a change to the bias in between fails the bias's
        # own saved-tensor check first
        ctx.bias_rows = None if inputs[3] is None else launch.log2_bias_row(inputs[3])
        # the heads' norm maxima, where the forward reads them for causal ALiBi's reach, or the table of first key
        # blocks its kernel writes (``hopper.forward_table_applies``), for the backward's reach (q and k are saved
        # for backward: a change to them in between fails their saved-tensor check); given, the forward takes the
        # reach from a training step's length (``hopper.reach_applies``)
        ctx.reach_norms = {}
        output = launch.forward(*inputs[:18], bias_rows=ctx.bias_rows,  # ``deterministic`` is the backward's
                                reach_norms=ctx.reach_norms)
        ctx.set_materialize_grads(False)  # None for an unused output, as the op's backward expects
        _setup_context(ctx, inputs, output)
        return output

    # the kernels' gradients are not themselves differentiable: a second derivative raises, naming this
    backward = staticmethod(torch.autograd.function.once_differentiable(_backward_with(_launch_backward, eager=True)))


def triton_attention(q, k, v, *, causal, softmax_scale, alibi_slopes, attn_bias=None, key_padding_mask=None,
                     sequence_id=None, prefix_mask=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
                     max_seqlen_q=0, max_seqlen_k=0, seqused_q=None, seqused_k=None, deterministic=None,
                     return_lse=True):
    """Validated inputs in, ``(out, lse)`` out (``lse`` None without ``return_lse``: float32 causal ALiBi's is then
    not converted); see :func:`mpt_attention.attention` and :func:`mpt_attention.attention_varlen`."""
    deterministic = backward_determinism(deterministic)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    seed = None
    if dropout_p > 0.0:
        # drawn from torch's generator of q's device, so torch.manual_seed makes dropout reproducible; on
        # the device itself: no host-to-device copy per call, and a CUDA graph can capture the draw
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    args = (q, k, v, attn_bias, alibi_slopes, key_padding_mask, sequence_id, prefix_mask, seed, scale, causal,
            float(dropout_p), cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seqused_q, seqused_k,
            deterministic)
    if torch.compiler.is_compiling():
        out, lse = _triton_fwd(*args)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        out, lse = _EagerTritonAttention.apply(*args)
    else:  # nothing to differentiate: no autograd node, and a forward alone's reach (``launch.forward``)
        out, lse = _launch().forward(*args[:18])
    if not return_lse:
        return out, None
    return out, public_lse(lse, q.dtype, alibi_slopes, causal, prefix_mask, cu_seqlens_q, seqused_q)


def alibi_from_diagonal(dtype, slopes, causal, prefix_mask) -> bool:
    """Whether the kernels measure causal ALiBi from each row's diagonal, ``slope * (j - i - (S_k - S_q))``, instead
    of MPT's ``slope * (j - (S_k - 1))``: in float32, which only the general kernels take. The softmax is the same;
    the scores and log-sum-exps that float32 must round stay near 0, where MPT's form makes them large far from the
    last key and the backward inherits their rounding (docs/errors.md, "Precision")."""
    return dtype == torch.float32 and slopes is not None and causal and prefix_mask is None


def public_lse(lse: Tensor, dtype, slopes, causal, prefix_mask, cu_seqlens_q, seqused_q=None) -> Tensor:
    """The kernels' log-sum-exp (the one their backward takes) as MPT's scores give it: where ALiBi was measured
    from each row's diagonal (``alibi_from_diagonal``), less ``slope * (S_q - 1 - i)`` for query i of a sequence
    S_q long (packed: its used rows, ``seqused_q``). Differentiable (the gradient passes through); rows without a
    key (-inf) and soft-masked rows (an encoded count, ``common.SOFT_LSE``) are kept."""
    if not alibi_from_diagonal(dtype, slopes, causal, prefix_mask):
        return lse
    # in float64, so the result rounds once: its magnitude, up to slope * S, is where float32 rounds coarsely
    slopes = slopes.double()
    if cu_seqlens_q is None:  # (B, H, S_q); slopes (H,) or (B, H)
        s_q = lse.shape[-1]
        rows_after = torch.arange(s_q - 1, -1, -1, device=lse.device, dtype=torch.float64)
        shift = slopes.unsqueeze(-1) * rows_after
    else:  # (H, T_q); slopes (H,) or (sequences, H)
        tokens = torch.arange(lse.shape[-1], device=lse.device, dtype=cu_seqlens_q.dtype)
        # (clamped: tokens outside every sequence have no log-sum-exp to convert)
        sequence = (torch.searchsorted(cu_seqlens_q, tokens, right=True) - 1).clamp(0, cu_seqlens_q.numel() - 2)
        ends = sequence_ends(cu_seqlens_q, seqused_q)
        rows_after = (ends[sequence] - 1 - tokens).double()
        per_token = slopes.unsqueeze(-1) if slopes.dim() == 1 else slopes.index_select(0, sequence).t()
        shift = per_token * rows_after
    return torch.where(lse > _SOFT_LSE, (lse.double() - shift).float(), lse)


def backward_determinism(deterministic: bool | None) -> bool | None:
    """The public ``deterministic`` as the backward takes it (``launch_backward.backward``): None (the default)
    becomes True while ``torch.use_deterministic_algorithms`` is on, else stays None (dQ in any order
    where that is the fastest backward); True and False pass through."""
    if deterministic is None and torch.are_deterministic_algorithms_enabled():
        return True
    return None if deterministic is None else bool(deterministic)


def triton_dropout_mask(batch, n_heads, s_q, s_k, seed: Tensor, dropout_p: float) -> Tensor:
    """The keep-mask ``(B, H, S_q, S_k)`` the kernels draw for ``seed``: lets tests check dropout exactly."""
    return _launch().dropout_keep_mask(batch, n_heads, s_q, s_k, seed, dropout_p, seed.device)
