"""Semantics shared by every backend: ALiBi slopes and biases, MPT's bias builders, dense masks.

Everything here is plain torch and is used unchanged by more than one backend (the ``torch`` and
``sdpa`` backends build dense tensors from it; the Triton kernels compute the same formulas
in-kernel and are tested against these tensors).

Shape legend (used by every docstring in the package):
    B: batch, S_q: query length, S_k: key length (cache included), H / H_q: query heads,
    H_kv: key/value heads, D: head dim, L: the length a bias was built for (MPT's max_seq_len).

Position alignment: query ``i`` of a chunk of ``S_q`` queries sits at absolute position
``i + S_k - S_q`` (bottom-right alignment), so a chunk appended to a cache lines up with the
last ``S_q`` keys.
"""

from __future__ import annotations

import math

import torch

from mpt_attention.kept import kept_on

__all__ = [
    "gen_slopes",
    "build_alibi_bias",
    "alibi_bias",
    "attn_bias_shape",
    "build_attn_bias",
    "build_mpt_attn_bias",
    "keep_mask",
]

_BIAS_IMPLS = ("torch", "sdpa", "triton")
_ALL_IMPLS = ("torch", "sdpa", "flash", "triton")


def _check_attn_impl(attn_impl: str) -> None:
    if attn_impl not in _ALL_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is an invalid setting.")


def gen_slopes(n_heads: int, alibi_bias_max: float = 8, device=None, return_1d: bool = False) -> torch.Tensor:
    """MPT's ALiBi slopes: ``2^(-i * alibi_bias_max / P)`` for ``i = 1..P``, ``P`` = next power of two.

    For a head count that is not a power of two the slopes of the ``P`` grid are interleaved
    (odd positions first, then even ones) and the first ``n_heads`` kept, which is the Bloom /
    ALiBi-paper rule when ``alibi_bias_max == 8``.

    Returns:
        float32 slopes of shape ``(1, H, 1, 1)``, or ``(H,)`` with ``return_1d``.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got n_heads={n_heads}")
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    exponents = torch.arange(1, n_pow2 + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n_pow2)
    slopes = 1.0 / torch.pow(2, exponents)
    if n_pow2 != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes if return_1d else slopes.view(1, n_heads, 1, 1)


def build_alibi_bias(
    n_heads: int, seq_len: int, full: bool = False, alibi_bias_max: float = 8, device=None, dtype=None
) -> torch.Tensor:
    """MPT's ALiBi bias for ``seq_len`` positions.

    * causal form (``full=False``): ``bias[0, h, 0, j] = slope_h * (j - (L - 1))``, shape ``(1, H, 1, L)``;
      it differs from the paper's ``slope * (j - i)`` by a per-row constant, which softmax ignores.
    * full form (``full=True``): ``bias[0, h, i, j] = -slope_h * |i - j|``, shape ``(1, H, L, L)``.
    """
    positions = torch.arange(1 - seq_len, 1, dtype=torch.int32, device=device).view(1, 1, 1, seq_len)
    distance = positions
    if full:
        distance = -(positions - positions.view(1, 1, seq_len, 1)).abs()
    bias = distance * gen_slopes(n_heads, alibi_bias_max, device=device)
    return bias.to(dtype=dtype)


def alibi_bias(slopes: torch.Tensor, s_q: int, s_k: int, causal: bool) -> torch.Tensor:
    """Dense float32 ALiBi bias from slopes, with bottom-right alignment.

    * ``causal=True``: MPT's causal form ``slope * (j - (S_k - 1))``, shape ``(1|B, H, 1, S_k)``.
    * ``causal=False``: the symmetric form ``-slope * |i + S_k - S_q - j|``, shape ``(1|B, H, S_q, S_k)``.

    This is exactly the bottom-right ``(S_q, S_k)`` window of :func:`build_alibi_bias` built for any
    ``L >= max(S_q, S_k)``, so slopes and MPT's materialised bias give identical scores.

    Args:
        slopes: ``(H,)`` or ``(B, H)``, any float dtype.
    """
    slopes = slopes.to(torch.float32)
    slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
    keys = torch.arange(s_k, device=slopes.device, dtype=torch.float32)
    if causal:
        return slopes * (keys - (s_k - 1)).view(1, 1, 1, s_k)
    queries = torch.arange(s_q, device=slopes.device, dtype=torch.float32) + (s_k - s_q)
    return -slopes * (queries.view(s_q, 1) - keys.view(1, s_k)).abs()


def attn_bias_shape(attn_impl, n_heads, seq_len, alibi, prefix_lm, causal, use_sequence_id):
    """The shape of the bias an MPT model keeps for ``seq_len`` positions, or ``None`` (seed table).

    ``flash`` keeps no bias; ``torch``, ``sdpa`` and ``triton`` keep ``(1, H, L, L)`` with ALiBi and any
    of prefix-LM / non-causal / sequence-id, ``(1, H, 1, L)`` for plain causal ALiBi, ``(1, 1, L, L)``
    for prefix-LM or sequence-id without ALiBi, and none otherwise.
    """
    _check_attn_impl(attn_impl)
    if attn_impl == "flash":
        return None
    if alibi:
        if prefix_lm or not causal or use_sequence_id:
            return (1, n_heads, seq_len, seq_len)
        return (1, n_heads, 1, seq_len)
    if prefix_lm or use_sequence_id:
        return (1, 1, seq_len, seq_len)
    return None


def build_attn_bias(attn_impl, attn_bias, n_heads, seq_len, causal=False, alibi=False, alibi_bias_max=8):
    """Add MPT's ALiBi to ``attn_bias`` (seed behaviour; ``flash`` returns ``None``)."""
    _check_attn_impl(attn_impl)
    if attn_impl == "flash":
        return None
    if alibi:
        device, dtype = attn_bias.device, attn_bias.dtype
        return attn_bias.add(
            build_alibi_bias(n_heads, seq_len, full=not causal, alibi_bias_max=alibi_bias_max, device=device,
                             dtype=dtype)
        )
    return attn_bias


def build_mpt_attn_bias(
    attn_impl: str,
    n_heads: int,
    max_seq_len: int,
    *,
    alibi: bool = False,
    alibi_bias_max: float = 8,
    prefix_lm: bool = False,
    attn_uses_sequence_id: bool = False,
    attention_mask: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    sequence_id: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor | None:
    """The bias an MPT model passes to its attention layers (``MPTModel._attn_bias``).

    ALiBi (over ``max_seq_len``), prefix-LM, sequence-id and the padding ``attention_mask`` are folded
    into one additive tensor, masked entries holding ``finfo(dtype).min``. For ``attn_impl='flash'``
    it returns ``None`` and, as in MPT, the caller passes ``attention_mask`` as ``key_padding_mask``.

    Args:
        attention_mask: bool ``(B, S_k)``, True = keep (S_k may include a cache).
        prefix_mask: bool ``(B, S)``, True = prefix token (visible from every query); needs ``prefix_lm``.
        sequence_id: int ``(B, S)``; used only with ``attn_uses_sequence_id``.

    Returns:
        float ``(1|B, 1|H, 1|S, L|S_k)``, to be sliced bottom-right by the attention function.
    """
    causal = not prefix_lm
    shape = attn_bias_shape(attn_impl, n_heads, max_seq_len, alibi, prefix_lm, causal, attn_uses_sequence_id)
    if attn_impl == "flash":
        return None
    bias = None
    if shape is not None:
        bias = torch.zeros(shape, dtype=torch.float32, device=device)
        bias = build_attn_bias(attn_impl, bias, n_heads, max_seq_len, causal=causal, alibi=alibi,
                               alibi_bias_max=alibi_bias_max)
        bias = bias.to(dtype=dtype, device=device)
    min_val = torch.finfo(dtype).min
    if prefix_lm:
        if prefix_mask is None:
            raise ValueError("prefix_mask is a required argument when MPT is configured with prefix_lm=True.")
        bias = _apply_prefix_mask(bias, prefix_mask.bool(), max_seq_len, min_val)
    if attn_uses_sequence_id and sequence_id is not None:
        bias = _apply_sequence_id(bias, sequence_id, max_seq_len, min_val)
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
        s_k = attention_mask.shape[-1]
        if bias is None:
            bias = torch.zeros((1, 1, 1, s_k), device=device, dtype=dtype)
        else:
            bias = bias[:, :, :, max(0, bias.size(-1) - s_k):]
        if prefix_mask is not None and attention_mask.shape != prefix_mask.shape:
            raise ValueError(
                f"attention_mask shape={attention_mask.shape} and prefix_mask shape={prefix_mask.shape} are not equal."
            )
        bias = bias.masked_fill(~attention_mask.view(-1, 1, 1, s_k), min_val)
    return bias


def _apply_prefix_mask(bias, prefix_mask, max_seq_len, min_val):
    s_k, s_q = bias.shape[-2:]
    if s_k != max_seq_len or s_q != max_seq_len:
        # The seed printed HF's generic ``max_length`` here; we print the real setting.
        raise ValueError(
            "attn_bias does not match the expected shape. The last two dimensions should both be "
            f"{max_seq_len} but are {s_k} and {s_q}."
        )
    seq_len = prefix_mask.shape[-1]
    if seq_len > max_seq_len:
        raise ValueError(f"prefix_mask sequence length cannot exceed max_seq_len={max_seq_len}")
    bias = bias[..., :seq_len, :seq_len]
    causal = torch.tril(torch.ones((seq_len, seq_len), dtype=torch.bool, device=prefix_mask.device))
    can_attend = causal.view(1, 1, seq_len, seq_len) | prefix_mask.view(-1, 1, 1, seq_len)
    return bias.masked_fill(~can_attend, min_val)


def _apply_sequence_id(bias, sequence_id, max_seq_len, min_val):
    seq_len = sequence_id.shape[-1]
    if seq_len > max_seq_len:
        raise ValueError(f"sequence_id sequence length cannot exceed max_seq_len={max_seq_len}")
    bias = bias[..., :seq_len, :seq_len]
    other_sequence = sequence_id.view(-1, seq_len, 1) != sequence_id.view(-1, 1, seq_len)
    return bias.masked_fill(other_sequence.unsqueeze(1), min_val)


def keep_mask(
    batch: int,
    s_q: int,
    s_k: int,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    sequence_id: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor | None:
    """Dense bool keep-mask ``(1|B, 1, S_q, S_k)`` of the masks ``attention()`` computes, or ``None``.

    Query ``i`` may see key ``j`` iff all of these hold:
      * causal: ``j <= i + S_k - S_q`` (bottom-right), or ``prefix_mask[b, j]`` (prefix-LM);
      * ``key_padding_mask[b, j]``;
      * ``sequence_id[b, j] == sequence_id[b, i + S_k - S_q]`` (queries take the ids of the last S_q keys).
    """
    keep = None
    offset = s_k - s_q
    if causal:
        rows = torch.arange(s_q, device=device).view(s_q, 1) + offset
        keep = (torch.arange(s_k, device=device).view(1, s_k) <= rows).view(1, 1, s_q, s_k)
        if prefix_mask is not None:
            keep = keep | prefix_mask.view(batch, 1, 1, s_k)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(batch, 1, 1, s_k)
        keep = kpm if keep is None else keep & kpm
    if sequence_id is not None:
        same = sequence_id[:, offset:].view(batch, 1, s_q, 1) == sequence_id.view(batch, 1, 1, s_k)
        keep = same if keep is None else keep & same
    return keep


def sequence_ends(cu: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
    """Each packed sequence's end row, as the kernels read it (``common.sequence_bounds``' ``EndSeqQ/K``) and
    ``ops.public_lse`` counts rows back from it: ``cu[1:]`` (a view), or with ``used`` (int32 ``(B,)``, FA3's
    ``seqused``) ``cu[:-1] + used``: only the first ``used[b]`` rows of sequence ``b`` take part; the rest are never
    read, and their outputs and gradients are 0. Kept on ``used`` for this ``cu`` (``kept.kept_on``): a step's forward
    and backward, and a model's layers, ask for the same ends four times per layer."""
    if used is None:
        return cu[1:]
    if cu.is_inference():  # (no version to key on)
        return cu[:-1] + used
    return kept_on(used, "_mpt_attention_sequence_ends", lambda: cu[:-1] + used, key=(cu.data_ptr(), cu._version),
                   on_device=True)
