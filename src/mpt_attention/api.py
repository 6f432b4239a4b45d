"""The modern functional op, :func:`attention`: one semantics, explicit backends, no silent fallback.

Shape legend: B batch, S_q query length, S_k key length (cache included), H_q query heads,
H_kv key/value heads, D head dim.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from mpt_attention import ops, packed_rows
from mpt_attention.impl import reference, sdpa
from mpt_attention.impl.device import release, sm_major

__all__ = ["BACKENDS", "attention", "backend_status", "TRITON_MAX_HEAD_DIM"]

BACKENDS = ("torch", "sdpa", "flash", "triton")
TRITON_MAX_HEAD_DIM = 256  # any D up to this; multiples of 16 run fastest
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the triton kernels' grids are (blocks, heads, batch): CUDA's limit on a grid's second and third axes
_TRITON_MAX_BATCH_OR_HEADS = 65535
_FLASH_MISSING = (
    "the 'flash' backend (flash-attn family kernels) is not implemented yet in mpt-attention; "
    "use backend 'triton' (fused, ALiBi and masks in-kernel), 'sdpa' or 'torch'"
)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# the oldest Triton the kernels compile and run with: 3.5's compiler fails on the backward kernels with ALiBi or a bias
# (a TritonGPUCoalesce pass error) and its Gluon has another ``warp_specialize``; 3.6 and 3.7 run the GPU tests,
# 3.8 and 3.9 compile every kernel (tools/compile_kernels.py, benchmarks/NOTES.md session 53)
TRITON_MIN_VERSION = (3, 6)


@functools.lru_cache(maxsize=8)  # asked on every call, with the same string
def triton_too_old(version: str) -> str | None:
    """Why Triton ``version`` (``triton.__version__``) cannot run this backend's kernels, or ``None``."""
    found = release(version)
    if found >= TRITON_MIN_VERSION:
        return None
    need = ".".join(map(str, TRITON_MIN_VERSION))
    return (f"Triton {version} is older than the {need} the kernels need (torch >= 2.10 brings it; on CPU "
            f"pip install 'triton>={need}')")


# the triton backend's status per CUDA device index: asked on every call (api._validate), and the availability
# query alone cost ~10 us of host time on the H200 machine's CPU
_CUDA_TRITON_STATUS: dict[int, str | None] = {}


def backend_status(backend: str, device: torch.device | str | None = None) -> str | None:
    """``None`` if ``backend`` can run on ``device`` here, else the reason it cannot."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend in ("torch", "sdpa"):
        return None
    if backend == "flash":
        return _FLASH_MISSING
    if backend != "triton":
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    try:
        import triton
    except ImportError as exc:
        return f"cannot import triton ({exc}); pip install 'mpt-attention[triton]'"
    too_old = triton_too_old(triton.__version__)
    if too_old is not None:
        return too_old
    if device.type == "cuda":
        if device.index in _CUDA_TRITON_STATUS:
            return _CUDA_TRITON_STATUS[device.index]
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        index = device.index if device.index is not None else torch.cuda.current_device()
        major = sm_major(index)
        _CUDA_TRITON_STATUS[index] = None if major >= 8 else f"needs a GPU of compute capability >= 8.0, got {major}.x"
        return _CUDA_TRITON_STATUS[index]
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing"
    return f"device type {device.type!r} is not supported by the triton backend"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str,
    causal: bool = False,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sequence_id: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    deterministic: bool | None = None,
):
    """Scaled dot-product attention with MPT's masks and ALiBi, on the backend you name.

    Scores are ``softmax_scale * q.k + alibi + attn_bias`` (the bias is not scaled), softmax over the
    keys a query may see, then ``@ v``. ``softmax_scale=None`` means ``1/sqrt(D)``; ``0`` is honoured.

    Causal masking is aligned to the bottom-right corner, so a chunk of ``S_q`` queries appended to
    a cache sees everything before it. With ``S_q=2, S_k=5`` (1 = may attend)::

        1 1 1 1 0
        1 1 1 1 1

    With ``S_q > S_k`` the first ``S_q - S_k`` rows see nothing.

    ALiBi, from ``alibi_slopes`` (positive, one per query head, or per batch and head):
    ``+ slope * (j - (S_k - 1))`` when causal (MPT's form), ``- slope * |i + S_k - S_q - j|``
    otherwise and with ``prefix_mask`` (MPT's full form).

    GQA/MQA: query head ``h`` uses key/value head ``h // (H_q // H_kv)``; K/V are never repeated.

    A row with no key left (all masked, or all scores ``-inf``) returns 0 and a log-sum-exp of ``-inf``.
    Key/value rows excluded by ``key_padding_mask`` are never used, so they may hold anything (NaN).
    Finite bias values are added as they are, ``finfo(float32).min`` included.

    Args:
        q: ``(B, S_q, H_q, D)``; k, v: ``(B, S_k, H_kv, D)``; any strides.
        backend: ``'torch'``, ``'sdpa'``, ``'flash'`` or ``'triton'``.
        alibi_slopes: float ``(H_q,)`` or ``(B, H_q)``.
        attn_bias: float, broadcastable to ``(B, H_q, S_q, S_k)`` (e.g. MPT's ``(1, H, 1, S_k)``).
        key_padding_mask: bool ``(B, S_k)``, True = keep.
        sequence_id: integer ``(B, S_k)``; keys of another sequence are masked; the queries carry
            the ids of the last ``S_q`` positions (so ``S_q <= S_k``).
        prefix_mask: bool ``(B, S_k)``, needs ``causal``: prefix keys are visible from every query.
        dropout_p: probability of dropping an attention weight (pass 0 in eval).
        return_lse: also return the natural-log log-sum-exp of the scores.
        deterministic: ``triton`` only: whether the backward must be bitwise reproducible. None (the
            default) follows ``torch.use_deterministic_algorithms``: reproducible while it is on; while
            it is off, dQ may be summed in any order where that is the fastest backward (on Hopper, D 64
            or 72-128: the dK/dV kernel forms dQ too and adds it by float32 bulk reductions; forward+backward
            1.11-1.25x the reproducible one on an H200), so dQ's last bits vary between runs there;
            elsewhere the reproducible passes run. True: always
            reproducible (no atomics; two passes). False: as None when off, and the general kernels
            may also fold dQ into one pass with float32 atomics (slower than the default on an H200,
            benchmarks/NOTES.md). dK, dV, dbias and the forward are reproducible in every mode.
            Other backends follow ``torch.use_deterministic_algorithms``.

    Returns:
        ``out (B, S_q, H_q, D)``, and with ``return_lse`` also ``lse (B, H_q, S_q)`` float32.
    """
    if not torch.compiler.is_compiling():
        # Checked in eager; a compiled graph was traced from an eager-valid call (symbolic sizes
        # would turn these Python checks into guards or graph breaks).
        _validate(q, k, v, backend, causal, softmax_scale, alibi_slopes, attn_bias, key_padding_mask,
                  sequence_id, prefix_mask, dropout_p, return_lse)
    kwargs = dict(
        causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes, attn_bias=attn_bias,
        key_padding_mask=key_padding_mask, sequence_id=sequence_id, prefix_mask=prefix_mask, dropout_p=dropout_p,
    )
    if backend == "torch":
        return reference.attention(q, k, v, return_lse=return_lse, **kwargs)
    if backend == "sdpa":
        return sdpa.attention(q, k, v, **kwargs)
    if backend == "triton":
        # MPT's packed rows as packed sequences where that is exact and faster (packed_rows.py)
        packed = packed_rows.attention(q, k, v, deterministic=deterministic, return_lse=return_lse, **kwargs)
        out, lse = packed if packed is not None else ops.triton_attention(
            q, k, v, deterministic=deterministic, return_lse=return_lse, **kwargs)
        return (out, lse) if return_lse else out
    raise NotImplementedError(_FLASH_MISSING)


def _validate(q, k, v, backend, causal, softmax_scale, alibi_slopes, attn_bias, key_padding_mask,
              sequence_id, prefix_mask, dropout_p, return_lse) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, S, H, D), got {got}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, s_q, n_heads, head_dim = q.shape
    s_k, n_kv = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch and head dim")
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"query heads H_q={n_heads} must be a multiple of key/value heads H_kv={n_kv}")
    if q.dtype != k.dtype or q.dtype != v.dtype or not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if alibi_slopes is not None:
        _check_aux("alibi_slopes", alibi_slopes, q.device)
        if tuple(alibi_slopes.shape) not in ((n_heads,), (batch, n_heads)) or not alibi_slopes.is_floating_point():
            raise ValueError(f"alibi_slopes must be float (H_q,)=({n_heads},) or (B, H_q)=({batch}, {n_heads}), "
                             f"got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    if attn_bias is not None:
        _check_aux("attn_bias", attn_bias, q.device)
        full = (batch, n_heads, s_q, s_k)
        if (attn_bias.dim() != 4 or not attn_bias.is_floating_point()
                or any(b not in (1, f) for b, f in zip(attn_bias.shape, full))):
            raise ValueError(f"attn_bias must be a float tensor broadcastable to (B, H_q, S_q, S_k)={full}, "
                             f"got {attn_bias.dtype} {tuple(attn_bias.shape)}")
    for name, mask in (("key_padding_mask", key_padding_mask), ("prefix_mask", prefix_mask)):
        if mask is not None:
            _check_aux(name, mask, q.device)
            if mask.dtype != torch.bool or tuple(mask.shape) != (batch, s_k):
                raise ValueError(f"{name} must be bool (B, S_k)=({batch}, {s_k}) with True = keep, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
    if prefix_mask is not None and not causal:
        raise ValueError("prefix_mask makes prefix keys visible to a causal mask: it needs causal=True")
    if sequence_id is not None:
        _check_aux("sequence_id", sequence_id, q.device)
        if (sequence_id.is_floating_point() or sequence_id.dtype == torch.bool
                or tuple(sequence_id.shape) != (batch, s_k)):
            raise ValueError(f"sequence_id must be an integer tensor (B, S_k)=({batch}, {s_k}), "
                             f"got {sequence_id.dtype} {tuple(sequence_id.shape)}")
        if s_q > s_k:
            raise ValueError(f"sequence_id needs S_q <= S_k (queries take the ids of the last S_q keys), "
                             f"got S_q={s_q} > S_k={s_k}")
    if backend == "flash":
        raise NotImplementedError(_FLASH_MISSING)
    if backend == "sdpa" and return_lse:
        raise NotImplementedError("backend 'sdpa' cannot return the log-sum-exp; use 'triton' or 'torch'")
    if backend == "triton":
        reason = backend_status("triton", q.device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is unavailable for {q.device} tensors: {reason}")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend 'triton' supports {_TRITON_DTYPES}, got {q.dtype}")
        if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("backend 'triton' computes ALiBi from fixed slopes and gives them no gradient, but "
                             "alibi_slopes requires grad; pass alibi_slopes.detach() or use backend 'torch'/'sdpa'")
        if not 1 <= head_dim <= TRITON_MAX_HEAD_DIM:
            raise ValueError(f"backend 'triton' supports head dims from 1 to {TRITON_MAX_HEAD_DIM}, got D={head_dim}")
        _check_triton_grid(batch, n_heads)


def _check_triton_grid(batch: int, n_heads: int) -> None:
    if max(batch, n_heads) > _TRITON_MAX_BATCH_OR_HEADS:
        raise ValueError(f"backend 'triton' takes at most {_TRITON_MAX_BATCH_OR_HEADS} sequences and as many heads "
                         f"(CUDA's grid limit), got B={batch}, H_q={n_heads}; split the batch into smaller calls")


def _check_aux(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
